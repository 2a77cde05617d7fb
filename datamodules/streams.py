"""Seeded batch streams: sources -> processed samples -> `Batch`es, split over ranks and workers.

A stream is an ``IterableDataset`` that yields whole batches (the ``DataLoader`` runs with
``batch_size=None``), because batching inside the worker is what makes the order exact:

- every random choice for a sample (crop, flip, caption) comes from a generator seeded with
  ``(seed, epoch, sample)``, never from a process's global RNG, so it does not matter which
  worker makes the sample;
- worker ``w`` of ``W`` makes the stream's batches ``w, w+W, w+2W, ...`` and PyTorch's data loader
  returns workers' outputs round-robin, so batches come out in stream order for any ``W``.

Both streams can start part-way (`set_position`), which is how `ResumableLoader` resumes
mid-epoch. Each yielded batch carries ``batch.stream_token`` so the loader that made it can be
told when it was consumed.

`MapBatchStream` (scenes, manifests): an epoch is a seeded permutation of the dataset; rank ``r``
takes global batches ``r, r+R, ...``; a last partial batch is dropped so every rank makes the
same number of steps (collectives must not hang).

`ShardBatchStream` (webdataset shards): endless, pass after pass over the shards, so no rank
ever runs out first. Resuming re-reads and decodes the consumed samples of the current pass
without transforming them (tar streams cannot seek).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from tipslab.datamodules.batch import Batch, collate
from tipslab.datamodules.captions import alt_caption, check_probs, sample_caption
from tipslab.datamodules.encoded_jpeg import EncodedJpeg, decode_jpegs
from tipslab.datamodules.sample import CorruptSample
from tipslab.datamodules.sample_quality import SkipCounter
from tipslab.datamodules.shards import ShardDataset
from tipslab.datamodules.transforms import PATCH_SIZE, check_scale, mirror_text, to_tensor
from tipslab.errors import TipslabError

log = logging.getLogger(__name__)

# How far a corrupt map-style sample may be replaced by its successors before giving up.
MAX_CONSECUTIVE_CORRUPT = 16


def sample_rng(seed: int, epoch: int, sample: int) -> np.random.Generator:
    """The generator of one sample's random choices in one epoch."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(sample) & 0xFFFFFFFF])


def key_number(key: str) -> int:
    """A stable number for a sample key (shard samples have keys, not indices)."""
    return zlib.crc32(key.encode("utf-8"))


class SampleProcessor:
    """One sample + its generator -> the item `collate` takes: views, masks, alt text, caption.

    Draw order (fixed, so a seed fixes everything and one-crop configs keep their old batches):
    first global crop, alt-text, caption, then the other global crops, the local crops, the
    block masks of the global crops and the hard-negative texts. With ``caption_crop_scale`` (user data, whose captions
    describe the whole image), the texts are drawn first and the first global crop after, at the
    scale given for the caption's granularity: a long, position-bearing caption gets a near-full
    crop. Samples that caption their crop (scenes) keep the crop-first order.
    """

    def __init__(self, view: Callable, granularities: Sequence[str] = ("short", "long"),
                 probs: Sequence[float] | None = None, masker=None, crop_captions: bool = True,
                 caption_crop_scale: Mapping | None = None, negatives: Callable | None = None):
        self.view = view
        # `hard_negatives.WordSwap`: each text gets a one-word-wrong twin, drawn last.
        self.negatives = negatives if negatives else None
        # Caption the crop, not the image, where the sample can (scenes carry `crop_captions`).
        self.crop_captions = bool(crop_captions)
        self.granularities = tuple(granularities)
        check_probs(self.granularities, probs)  # fail at construction, not in a worker
        self.probs = None if probs is None else [float(p) for p in probs]
        self.masker = masker
        self.caption_scales = {g: check_scale(v, f"data.caption_crop_scale.{g}")
                               for g, v in dict(caption_crop_scale or {}).items() if v is not None}
        # True: crops are planned here and cut on the device (`device_crops.py`, ``data.crops_on_device``).
        self.defer_crops = False

    def decode_scale(self, width: int, height: int) -> float:
        """How far an image may shrink before decoding and still give every crop its full size
        (`image_io.read_image_reduced`); 1.0 for views without crops."""
        need = getattr(self.view, "min_decode_scale", None)
        if need is None:
            return 1.0
        return need(height, width, tuple(self.caption_scales.values()))

    def for_batch(self, batch: int) -> SampleProcessor:
        """The processor of global batch ``batch`` (one for every batch; see `ResolutionStages`)."""
        return self

    def _texts(self, captions: Mapping, rng: np.random.Generator, sample_id: str) -> tuple[str, str, str]:
        alt = alt_caption(captions, rng, sample_id)
        granularity, caption = sample_caption(captions, rng, self.granularities, self.probs, sample_id)
        return alt, granularity, caption

    def _first(self, pixels, rng, scale, size, deferred: bool):
        """``(view or its CropPlan when deferred, flipped, box)`` of the first global crop."""
        if deferred:
            plan, box = self.view.first.draw(_height_width(pixels), rng, scale, size)
            return plan, plan.flipped, box
        return self.view.crop(pixels, rng, scale=scale, to_float=False, source_size=size)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        size = sample.get("source_size")  # (width, height) of the full image when it was decoded smaller
        sample_id = str(sample["id"])
        captions = sample["captions"]
        crops = hasattr(self.view, "crop")
        # Crops on the device (`device_crops.py`): the same draws, the views are cut after the transfer.
        deferred = crops and self.defer_crops and hasattr(self.view, "draw_rest")
        # Decoded to a tensor once, however many crops are cut from it; a JPEG left encoded for the
        # device (`encoded_jpeg.py`) travels as it is when its views are cut there too.
        pixels = sample["image"]
        if isinstance(pixels, EncodedJpeg) and not deferred:
            pixels = decode_jpegs([pixels], "cpu")[0]
        elif not isinstance(pixels, EncodedJpeg):
            pixels = to_tensor(pixels)
        captions_the_crop = self.crop_captions and sample.get("crop_captions") is not None
        if crops and self.caption_scales and not captions_the_crop:
            alt, granularity, caption = self._texts(captions, rng, sample_id)
            image, flipped, *box = self._first(pixels, rng, self.caption_scales.get(granularity), size, deferred)
        else:
            # A view with `crop` also says which box of the source it shows.
            image, flipped, *box = (self._first(pixels, rng, None, size, deferred) if crops
                                    else self.view(pixels, rng))
            if captions_the_crop and box:
                captions = sample["crop_captions"](box[0], rng)
            alt, granularity, caption = self._texts(captions, rng, sample_id)
        if flipped:  # the picture was mirrored: so are its words
            alt, caption = mirror_text(alt), mirror_text(caption)
        item = {"image": image, "alt": alt, "caption": caption, "granularity": granularity, "id": sample_id}
        if box:
            item["box"] = box[0]  # (top, left, height, width) of the first global crop in the source
        if deferred:
            more, local = self.view.draw_rest(_height_width(pixels), rng, source_size=size)
            item["source"], item["plans"], item["num_global"] = pixels, [image, *more, *local], 1 + len(more)
            grid = (image.size // PATCH_SIZE,) * 2
        else:
            rest = getattr(self.view, "rest", None)
            if rest is not None:
                more, local = rest(pixels, rng, to_float=False, source_size=size)
                item["globals"] = [image, *more]
                item["locals"] = local
            grid = (image.shape[-2] // PATCH_SIZE, image.shape[-1] // PATCH_SIZE)
        if self.masker is not None:
            item["masks"] = [torch.from_numpy(self.masker(grid, rng))
                             for _ in range(item.get("num_global", len(item.get("globals", [image]))))]
        if self.negatives is not None:
            item["alt_negative"], item["caption_negative"] = self.negatives(alt, rng), self.negatives(caption, rng)
        return item


def _height_width(pixels) -> tuple[int, int]:
    if isinstance(pixels, EncodedJpeg):
        return pixels.height, pixels.width
    return int(pixels.shape[-2]), int(pixels.shape[-1])


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class MapBatchStream(torch.utils.data.IterableDataset):
    """Batches of a map-style dataset, one seeded permutation per epoch (see module docstring)."""

    def __init__(self, dataset, batch_size: int, tokenizer, processor: SampleProcessor, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise TipslabError(f"data.batch_size={batch_size}; expected a positive number")
        self.dataset, self.batch_size, self.tokenizer, self.processor = dataset, int(batch_size), tokenizer, processor
        self.seed, self.shuffle, self.rank, self.world_size = int(seed), shuffle, int(rank), int(world_size)
        self.num_batches = len(dataset) // (self.batch_size * self.world_size)
        if self.num_batches == 0:
            raise TipslabError(f"data: {len(dataset)} samples make no full batch of {self.batch_size} on each of "
                               f"{self.world_size} rank(s); use more samples or a smaller data.batch_size")
        self.epoch, self.start_batch = 0, 0
        self.stream_token: str | None = None
        self.float_pixels = True  # False: uint8 views, made float on the device (see PretrainDataModule)
        self.skipped = 0
        self.counts = SkipCounter()  # since the last batch made; handed to it (`Batch.data_counts`)

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self.num_batches  # batches per epoch on this rank

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices in the order of ``epoch`` (all ranks)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), 0x5EED]).permutation(n)

    def _load(self, index: int) -> tuple[int, dict]:
        """The sample at ``index``, or its first readable successor (corrupt ones skipped, logged)."""
        n = len(self.dataset)
        for step in range(MAX_CONSECUTIVE_CORRUPT):
            candidate = (index + step) % n
            try:
                sample = self.dataset[candidate]
            except CorruptSample as err:
                self.skipped += 1
                self.counts.skip(getattr(err, "kind", "corrupt"))
                log.warning("data: skipped corrupt sample %d: %s", candidate, err)
                continue
            self.counts.ok(sample.pop("_conversions", ()) if isinstance(sample, dict) else ())
            return candidate, sample
        raise TipslabError(f"data: {MAX_CONSECUTIVE_CORRUPT} consecutive corrupt samples from index {index}; "
                           "the source looks broken")

    def make_batch(self, epoch: int, batch: int, order: np.ndarray) -> Batch:
        """Batch number ``batch`` (on this rank) of ``epoch``."""
        global_batch = batch * self.world_size + self.rank
        process = self.processor.for_batch(epoch * self.num_batches + batch)  # the step's image size
        items = []
        for index in order[global_batch * self.batch_size:(global_batch + 1) * self.batch_size]:
            index, sample = self._load(int(index))
            items.append(process(sample, sample_rng(self.seed, epoch, index)))
        out = collate(items, self.tokenizer, self.float_pixels)
        out.stream_token = self.stream_token
        out.data_counts = self.counts.take()
        return out

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        order = self.order(self.epoch)
        for batch in range(self.start_batch + worker, self.num_batches, workers):
            yield self.make_batch(self.epoch, batch, order)


class ShardBatchStream(torch.utils.data.IterableDataset):
    """Endless batches of webdataset shards (see module docstring); no ``len``."""

    def __init__(self, shards: ShardDataset, batch_size: int, tokenizer, processor: SampleProcessor,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0):
        if batch_size < 1:
            raise TipslabError(f"data.batch_size={batch_size}; expected a positive number")
        self.shards, self.batch_size, self.tokenizer, self.processor = shards, int(batch_size), tokenizer, processor
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        # The split over slots is fixed by the worker count the stream is built for.
        self.workers = max(int(num_workers), 1)
        self.epoch, self.start_batch = 0, 0
        self.stream_token: str | None = None
        self.float_pixels = True  # False: uint8 views, made float on the device (see PretrainDataModule)

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = 0, int(start_batch)  # endless: the position is the batch count

    def _slot_batches(self, slot: int) -> Iterator[list[dict]]:
        """Lists of ``batch_size`` decoded samples of one slot, pass after pass, forever."""
        pass_index, empty_passes = 0, 0
        pending: list[dict] = []
        while True:
            got = 0
            for sample in self.shards.samples(slot, self.world_size * self.workers, pass_index):
                got += 1
                sample["_pass"] = pass_index
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield pending
                    pending = []
            empty_passes = empty_passes + 1 if got == 0 else 0
            if empty_passes >= 2:
                raise TipslabError(f"shards: data slot {slot} read no valid sample in a whole pass over "
                                   f"{len(self.shards.urls)} shard(s); every sample is corrupt or the shards are empty")
            pass_index += 1

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        if workers != self.workers:
            raise TipslabError(f"shards: stream built for {self.workers} worker(s) runs in {workers}")
        # Global batch g is made by virtual worker g % W as its (g // W)-th batch. A resumed loader
        # starts its round-robin at real worker 0, so real worker w plays virtual worker
        # (start + w) % W: the first batch out is then batch `start`, the next start+1, ...
        virtual = (self.start_batch + worker) % workers
        first = self.start_batch + worker  # the first global batch this worker makes
        skip = (first - virtual) // workers  # local batches of the virtual worker already consumed
        slot = self.rank * workers + virtual
        for local, samples in enumerate(self._slot_batches(slot)):
            if local < skip:
                continue  # already consumed before the resume: decoded, not transformed
            process = self.processor.for_batch(virtual + local * workers)  # this batch's number on the rank
            items = [process(s, sample_rng(self.seed, s["_pass"], key_number(s["key"]))) for s in samples]
            out = collate(items, self.tokenizer, self.float_pixels)
            out.stream_token = self.stream_token
            # Counts since the last batch this worker yielded (resumed-over batches' included).
            out.data_counts = self.shards.counts.take()
            yield out
