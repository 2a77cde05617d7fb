"""Writing webdataset tar shards: ``shard-000000.tar``..., each complete before it is visible.

Per sample ``{key}``: ``{key}.png`` or ``.jpg`` and ``{key}.json`` = ``{"id", "captions",
"objects"?}`` (the layout `shards.ShardDataset` reads). `tipslab shards` (`shard_cli.py`) writes
them from folders and manifests; tests and the scenes export write them from samples.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from tipslab.errors import TipslabError

SHARD_PATTERN = "shard-{:06d}.tar"


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


class ShardSink:
    """Sample members in, shards out: a shard closes at ``samples_per_shard`` samples or once it
    holds ``target_bytes`` (whichever first). Each is written to a temporary name and renamed when
    complete, so a reader never sees a partial shard; ``abort()`` leaves no temporary file."""

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int | None = 1000,
                 target_bytes: int | None = None):
        if samples_per_shard is not None and samples_per_shard < 1:
            raise TipslabError(f"shards: samples_per_shard={samples_per_shard}; expected at least 1")
        if target_bytes is not None and target_bytes < 1:
            raise TipslabError(f"shards: target shard size {target_bytes} bytes; expected a positive size")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard, self.target_bytes = samples_per_shard, target_bytes
        self.paths: list[Path] = []
        self.samples = 0
        self.bytes = 0  # of the finished shards
        self._writer, self._tmp, self._count = None, None, 0
        self._seen: set[str] = set()

    def key(self, sample_id: str) -> str:
        """The tar key of a sample id (unique in this output, or a TipslabError)."""
        key = _tar_key(str(sample_id))
        if key in self._seen:
            raise TipslabError(f"shards: sample id {sample_id!r} gives key {key!r} twice; ids must be unique")
        self._seen.add(key)
        return key

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: ``members`` maps extensions (``png``, ``json``, ``txt``) to bytes."""
        if self._writer is None:
            self._tmp = self.out / f".{SHARD_PATTERN.format(len(self.paths))}.tmp"
            # mtime fixed: the same samples give byte-identical shards.
            self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=0)
            self._count = 0
        self._writer.write({"__key__": key, **members})
        self._count += 1
        self.samples += 1
        full = self.samples_per_shard is not None and self._count >= self.samples_per_shard
        if full or (self.target_bytes is not None and self._tmp.stat().st_size >= self.target_bytes):
            self.close_shard()

    def close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            final = self.out / SHARD_PATTERN.format(len(self.paths))
            os.replace(self._tmp, final)
            self.paths.append(final)
            self.bytes += final.stat().st_size
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._writer = None


def sample_json(sample_id: str, captions: dict, objects=None) -> bytes:
    """The ``{key}.json`` member `shards.ShardDataset` reads by default."""
    meta = {"id": str(sample_id), "captions": captions}
    if objects is not None:
        meta["objects"] = objects
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, samples_per_shard: int = 1000,
                 image_format: str = "png") -> list[Path]:
    """Write ``samples`` (dicts with ``id``, ``image``, ``captions`` and optional ``objects``) as
    shards; returns the shard paths in order."""
    if image_format not in ("png", "jpg"):
        raise TipslabError(f"write_shards: image_format={image_format!r}; expected 'png' or 'jpg'")
    sink = ShardSink(out_dir, samples_per_shard=samples_per_shard)
    try:
        for sample in samples:
            for field in ("id", "image", "captions"):
                if field not in sample:
                    raise TipslabError(f"write_shards: a sample lacks {field!r}; expected id, image and captions")
            sink.add(sink.key(sample["id"]), {
                image_format: _image_bytes(sample["image"], image_format),
                "json": sample_json(sample["id"], sample["captions"], sample.get("objects")),
            })
        sink.close_shard()
    finally:
        sink.abort()  # an error mid-shard: leave no temporary file behind
    return sink.paths


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
