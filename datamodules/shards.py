"""WebDataset tar shards: write them, and read them back as a seeded, rank/worker-split stream.

A shard ``shard-000000.tar`` holds, per sample ``{key}``:

- ``{key}.png`` (or ``.jpg``/``.jpeg``/``.webp``): the image;
- ``{key}.json``: ``{"id": ..., "captions": {"alt": ..., "short": ..., "long": ...}, "objects": [...]}``
  (``objects`` optional). A caption value may be a string or a list of strings. A sample with
  only a ``{key}.txt`` (img2dataset's layout) is read with that text as its ``alt`` caption.

Reading uses webdataset's tar iteration and grouping. A sample whose image does not decode, whose
caption json is missing or not valid, or a tar that is truncated, is skipped, counted in
``ShardDataset.skipped`` and logged with its key; it never stops the stream.

Order is a function of ``(seed, pass)``: the shard list is shuffled per pass, split over
*slots* (one per rank x data-loader worker), and each slot shuffles its samples through a
seeded buffer.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from tipslab.errors import TipslabError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
SHARD_PATTERN = "shard-{:06d}.tar"


# -- writing ----------------------------------------------------------------------------------


def _image_bytes(image, fmt: str) -> bytes:
    """PNG/JPEG bytes of a PIL image, a uint8 [H,W,3] array or a float [3,H,W] tensor in [0,1]."""
    if isinstance(image, torch.Tensor):
        image = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TipslabError(f"write_shards: image of type {type(image).__name__}; expected PIL, uint8 array or tensor")
    buffer = io.BytesIO()
    if fmt == "png":
        image.convert("RGB").save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _tar_key(sample_id: str) -> str:
    # webdataset splits a member name at the first dot of its basename: keys must have none.
    return re.sub(r"[^A-Za-z0-9_\-]", "_", sample_id)


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, samples_per_shard: int = 1000,
                 image_format: str = "png") -> list[Path]:
    """Write ``samples`` (dicts with ``id``, ``image``, ``captions`` and optional ``objects``) as shards.

    Each shard is written to a temporary name and renamed when complete, so a reader never sees a
    partial shard. Returns the shard paths in order.
    """
    if image_format not in ("png", "jpg"):
        raise TipslabError(f"write_shards: image_format={image_format!r}; expected 'png' or 'jpg'")
    if samples_per_shard < 1:
        raise TipslabError(f"write_shards: samples_per_shard={samples_per_shard}; expected at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer, tmp, count = None, None, 0
    seen: set[str] = set()

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            final = out / SHARD_PATTERN.format(len(paths))
            os.replace(tmp, final)
            paths.append(final)
            writer = None

    try:
        for sample in samples:
            for field in ("id", "image", "captions"):
                if field not in sample:
                    raise TipslabError(f"write_shards: a sample lacks {field!r}; expected id, image and captions")
            key = _tar_key(str(sample["id"]))
            if key in seen:
                raise TipslabError(f"write_shards: sample id {sample['id']!r} gives key {key!r} twice; "
                                   "ids must be unique")
            seen.add(key)
            if writer is None:
                tmp = out / f".{SHARD_PATTERN.format(len(paths))}.tmp"
                # mtime fixed: the same samples give byte-identical shards.
                writer = wds.TarWriter(str(tmp), encoder=False, mtime=0)
                count = 0
            meta = {"id": str(sample["id"]), "captions": sample["captions"]}
            if sample.get("objects") is not None:
                meta["objects"] = sample["objects"]
            writer.write({
                "__key__": key,
                image_format: _image_bytes(sample["image"], image_format),
                "json": json.dumps(meta).encode("utf-8"),
            })
            count += 1
            if count >= samples_per_shard:
                close()
        close()
    finally:
        if writer is not None:  # an error mid-shard: leave no temporary file behind
            writer.close()
            Path(tmp).unlink(missing_ok=True)
    return paths


def write_scene_shards(dataset, out_dir: str | os.PathLike, samples_per_shard: int = 1000,
                       with_objects: bool = True, image_format: str = "png") -> list[Path]:
    """Write a `ScenesDataset` as shards, with per-object metadata (class, box, mask runs) if asked."""
    from tipslab.datamodules.scenes_export import rle_encode

    def samples():
        for index in range(len(dataset)):
            scene = dataset.scene(index)
            objects = None
            if with_objects:
                objects = [{"class_name": o.class_name, "bbox": list(o.bbox), "position": o.position,
                            "size": o.size, "texture": o.texture, "mask_rle": rle_encode(o.mask)}
                           for o in scene.objects]
            yield {"id": scene.id, "image": scene.image, "captions": scene.captions, "objects": objects}

    return write_shards(samples(), out_dir, samples_per_shard=samples_per_shard, image_format=image_format)


# -- reading ----------------------------------------------------------------------------------


def resolve_shards(urls_or_dir) -> list[str]:
    """The shard list named by a folder, one tar, a brace pattern (``a-{000..009}.tar``) or a list."""
    if isinstance(urls_or_dir, (list, tuple)):
        urls = [str(u) for u in urls_or_dir]
        if not urls:
            raise TipslabError("shards: the shard list is empty; expected at least one .tar")
    else:
        spec = str(urls_or_dir)
        path = Path(spec)
        if "{" in spec:
            urls = list(braceexpand.braceexpand(spec))
        elif path.is_dir():
            urls = sorted(str(p) for p in path.glob("*.tar"))
            if not urls:
                raise TipslabError(f"shards: no *.tar shards in {path}; expected files like {SHARD_PATTERN.format(0)}")
            return urls
        elif "://" in spec or path.is_file():
            urls = [spec]
        else:
            raise TipslabError(f"shards: {spec} does not exist; expected a folder of .tar shards, a .tar or a pattern")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise TipslabError(f"shards: {len(missing)} shard(s) not found, first {missing[0]}")
    return urls


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence), stable across processes."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples ``{"image": PIL RGB, "captions": dict, "id": str, "key": str, "objects": list | None}``.

    One iteration is one pass over the shards this process's slot owns (rank x worker). The order
    is fixed by ``seed`` and ``epoch`` (``set_epoch``). ``skipped`` counts corrupt samples skipped
    in this process (data-loader workers count their own; every skip is also logged with its key).
    """

    def __init__(self, urls_or_dir, seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000,
                 rank: int | None = None, world_size: int | None = None, epoch: int = 0):
        self.urls = resolve_shards(urls_or_dir)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.shuffle_buffer = int(shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.epoch = int(epoch)
        self.skipped = 0
        self.skipped_samples: list[tuple[str, str]] = []  # (key or url, reason)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- corrupt input ------------------------------------------------------------------------
    def _skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        self.skipped_samples.append((where, reason))
        log.warning("shards: skipped %s: %s", where, reason)

    def _tar_error(self, exn: Exception) -> bool:
        # webdataset's handler protocol: True means "go on with the next file or shard". It
        # appends the stream and url to the exception's args; one broken tar can raise twice
        # (inside the member loop, then in the loop itself), so it is counted once per pass.
        url = next((str(a) for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), None)
        if url is None:
            found = re.search(r"name='([^']*)'", " ".join(str(a) for a in exn.args))
            url = found.group(1) if found else "a shard"
        message = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
        if (url, message) not in self._tar_errors:
            self._tar_errors.add((url, message))
            self._skip(f"shard {url}", f"unreadable tar data, rest of the shard skipped ({message})")
        return True

    # -- order --------------------------------------------------------------------------------
    def slot_samples(self, slot: int, num_slots: int, pass_index: int) -> Iterator[dict]:
        """Raw samples (bytes per extension) of ``slot`` out of ``num_slots`` in pass ``pass_index``."""
        self._tar_errors: set[tuple[str, str]] = set()
        urls = list(self.urls)
        if self.shuffle:
            random.Random(derive_seed(self.seed, pass_index)).shuffle(urls)
        if len(urls) >= num_slots:
            mine, stride = urls[slot::num_slots], 1
        else:
            # Fewer shards than slots: every slot reads every shard and keeps every num_slots-th
            # sample, so no slot is starved (at the cost of reading each shard num_slots times).
            mine, stride = urls, num_slots
        raw = wds.tarfile_samples(iter([{"url": u} for u in mine]), handler=self._tar_error)
        if stride > 1:
            raw = (s for j, s in enumerate(raw) if j % stride == slot)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, pass_index, slot))
            raw = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(iter(raw))
        return raw

    def decode(self, raw: dict) -> dict | None:
        """The sample of one raw tar group, or None (skipped and counted) if it is corrupt."""
        key = raw.get("__key__", "?")
        where = f"sample {key} in {raw.get('__url__', '?')}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            self._skip(where, f"no image (expected one of .{', .'.join(IMAGE_EXTENSIONS)})")
            return None
        if "json" in raw:
            try:
                meta = json.loads(raw["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                self._skip(where, f"caption json is not valid json ({err})")
                return None
            captions = meta.get("captions") if isinstance(meta, dict) else None
            if not isinstance(captions, dict) or not any(_has_text(v) for v in captions.values()):
                self._skip(where, "caption json has no 'captions' object with at least one text")
                return None
        elif "txt" in raw:
            meta = {}
            captions = {"alt": raw["txt"].decode("utf-8", errors="replace").strip()}
            if not captions["alt"]:
                self._skip(where, "empty .txt caption")
                return None
        else:
            self._skip(where, "missing caption json")
            return None
        try:
            with Image.open(io.BytesIO(raw[ext])) as handle:
                image = handle.convert("RGB")  # convert() forces a full decode here, inside the try
        except Exception as err:  # PIL raises many types for corrupt data
            self._skip(where, f"image does not decode ({type(err).__name__}: {err})")
            return None
        return {"image": image, "captions": captions, "id": str(meta.get("id", key)), "key": key,
                "objects": meta.get("objects")}

    def samples(self, slot: int, num_slots: int, pass_index: int) -> Iterator[dict]:
        """Decoded, valid samples of one slot in one pass."""
        for raw in self.slot_samples(slot, num_slots, pass_index):
            sample = self.decode(raw)
            if sample is not None:
                yield sample

    def __iter__(self) -> Iterator[dict]:
        rank, world = _distributed()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from self.samples(rank * workers + worker, world * workers, self.epoch)


def _has_text(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list):
        return any(isinstance(v, str) and v.strip() for v in value)
    return False
