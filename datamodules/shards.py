"""Reading webdataset tar shards as a seeded, rank- and worker-split stream of samples.

A shard holds, per sample ``{key}``, an image member (any of `image_io.IMAGE_EXTENSIONS`) and a
caption member: ``{key}.json`` (``{"id", "captions": {"alt", "short", "long"}, "objects"?}``, the
layout `shard_writer` writes) and/or ``{key}.txt`` (img2dataset's layout); which fields feed which
granularity is `caption_fields.CaptionMapping` (``data.captions``).

Reading uses webdataset's tar iteration and grouping; shard lists and URLs (fsspec) are
shard_urls.py's. Images go through the one reader
(`image_io.read_image`: EXIF, 16-bit, alpha, bomb guard). A sample that cannot be used, or a tar
that is truncated, is skipped, counted by kind in ``ShardDataset.counts`` and logged with its
key; it never stops the stream.

Order is a function of ``(seed, pass)``: the shard list is shuffled per pass, split over
*slots* (one per rank x data-loader worker), and each slot shuffles its samples through a
seeded buffer. Several sources, by weight and with resampling: see mixing.py.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds

from tipslab.datamodules.caption_fields import CaptionMapping, CaptionProblem
from tipslab.datamodules.encoded_jpeg import EncodedJpeg
from tipslab.datamodules.image_io import IMAGE_EXTENSIONS, MAX_PIXELS, UnreadableImage, read_image_reduced
from tipslab.datamodules.mixing import ShardSource, check_unweighted, parse_sources, resampled_samples
from tipslab.datamodules.sample_quality import SkipCounter
from tipslab.datamodules.scene_captions import StoredSceneCaptions
from tipslab.datamodules.shard_urls import resolve_shards, tar_samples
from tipslab.datamodules.shard_writer import SHARD_PATTERN, write_scene_shards, write_shards  # noqa: F401 (re-exported)
from tipslab.errors import TipslabError

log = logging.getLogger(__name__)

# Tar member extensions of an image: the one extension list, without dots.
IMAGE_MEMBERS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


# -- reading ----------------------------------------------------------------------------------


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
                 rank: int | None = None, world_size: int | None = None, epoch: int = 0,
                 captions: CaptionMapping | None = None, max_pixels: int = MAX_PIXELS,
                 sources=None, resampled: bool = False, epoch_samples: int | None = None):
        # ``sources`` (``data.sources``) mixes several shard lists; see mixing.py.
        if sources:
            self.sources = parse_sources(sources, resolve_shards)
            self.urls = [u for source in self.sources for u in source.urls]
        else:
            self.urls = resolve_shards(urls_or_dir)
            self.sources = [ShardSource(tuple(self.urls), 1.0, str(urls_or_dir))]
        self.resampled = bool(resampled)
        if not self.resampled:
            check_unweighted(self.sources)
        elif not epoch_samples or int(epoch_samples) < 1:
            raise TipslabError(f"data.resampled=true needs data.epoch_samples (samples per pass over all ranks and "
                               f"workers, open_clip's --train-num-samples); got {epoch_samples}")
        self.epoch_samples = int(epoch_samples) if epoch_samples else None
        self.seed = int(seed)
        self.shuffle = shuffle
        self.shuffle_buffer = int(shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.epoch = int(epoch)
        self.captions = captions or CaptionMapping()
        self.max_pixels = int(max_pixels)
        # ``(width, height) -> factor``: how far a JPEG may decode smaller (`SampleProcessor.decode_scale`,
        # set by the data module with ``data.decode_draft``); None: full size.
        self.decode_scale = None
        # True: a plain JPEG stays encoded for the device to decode (``data.decode_on_device``).
        self.keep_jpeg = False
        self.counts = SkipCounter()  # since the last `counts.take()` (a batch stream takes them per batch)
        self.skipped = 0  # in this process, ever
        self.skipped_samples: list[tuple[str, str]] = []  # (key or url, reason)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- corrupt input ------------------------------------------------------------------------
    def _skip(self, where: str, reason: str, kind: str) -> None:
        self.counts.skip(kind)
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
            self._skip(f"shard {url}", f"unreadable tar data, rest of the shard skipped ({message})", "bad_tar")
        return True

    # -- order --------------------------------------------------------------------------------
    def slot_samples(self, slot: int, num_slots: int, pass_index: int) -> Iterator[dict]:
        """Raw samples (bytes per extension) of ``slot`` out of ``num_slots`` in pass ``pass_index``."""
        self._tar_errors: set[tuple[str, str]] = set()
        if self.resampled:
            raw = resampled_samples(self.sources, lambda *parts: derive_seed(self.seed, *parts), slot, num_slots,
                                    pass_index, self.epoch_samples, self._tar_error)
            return self._shuffled(raw, slot, pass_index)
        urls = list(self.urls)
        if self.shuffle:
            random.Random(derive_seed(self.seed, pass_index)).shuffle(urls)
        if len(urls) >= num_slots:
            mine, stride = urls[slot::num_slots], 1
        else:
            # Fewer shards than slots: every slot reads every shard and keeps every num_slots-th
            # sample, so no slot is starved (at the cost of reading each shard num_slots times).
            mine, stride = urls, num_slots
        raw = tar_samples(mine, handler=self._tar_error)
        if stride > 1:
            raw = (s for j, s in enumerate(raw) if j % stride == slot)
        return self._shuffled(raw, slot, pass_index)

    def _shuffled(self, raw: Iterator[dict], slot: int, pass_index: int) -> Iterator[dict]:
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, pass_index, slot))
            raw = wds.shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(iter(raw))
        return raw

    def decode(self, raw: dict) -> dict | None:
        """The sample of one raw tar group, or None (skipped and counted by kind) if it is unusable."""
        key = raw.get("__key__", "?")
        where = f"sample {key} in {raw.get('__url__', '?')}"
        ext = next((e for e in IMAGE_MEMBERS if e in raw), None)
        if ext is None:
            self._skip(where, f"no image (expected one of .{', .'.join(IMAGE_MEMBERS)})", "no_image")
            return None
        try:
            meta, text, conversions = self.captions.read_members(raw)
            captions = self.captions.captions(meta, text)
        except CaptionProblem as err:
            self._skip(where, str(err), err.kind)
            return None
        try:
            image, (width, height) = read_image_reduced(raw[ext], self.decode_scale, name=f".{ext} member",
                                                        max_pixels=self.max_pixels, conversions=conversions,
                                                        keep_jpeg=self.keep_jpeg)
        except UnreadableImage as err:
            self._skip(where, str(err), err.kind)
            return None
        self.counts.ok(conversions)
        if isinstance(image, EncodedJpeg):  # a device-side warning names the sample, not the member
            image = dataclasses.replace(image, name=where)
        meta = meta or {}
        sample = {"image": image, "captions": captions, "id": str(meta.get("id", key)), "key": key,
                  "objects": meta.get("objects"), "source": raw.get("__source__")}
        if image.size != (width, height):  # decoded smaller: crops are drawn on the full size
            sample["source_size"] = (width, height)
        if StoredSceneCaptions.usable(meta.get("objects")):  # scenes shards: captions follow the crop
            sample["crop_captions"] = StoredSceneCaptions(meta["objects"], height, width)
        return sample

    def first_captions(self, count: int = 32, url: str | None = None) -> list[tuple[dict | None, str | None]]:
        """The caption members of the first ``count`` samples of a shard (default the first; start-up checks)."""
        out = []
        for raw in tar_samples([url or self.urls[0]], handler=lambda exn: True):
            try:
                meta, text, _ = self.captions.read_members(raw)
            except CaptionProblem:
                continue
            out.append((meta, text))
            if len(out) >= count:
                break
        return out

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

