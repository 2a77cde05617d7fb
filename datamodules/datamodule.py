"""`PretrainDataModule`: the ``data:`` config block -> a resumable stream of `Batch`es for training.

Sources (``data.source``):

- ``scenes``: the built-in seeded scenes (``num_train`` images; nothing to download);
- ``shards``: a folder (or pattern, or list) of webdataset tars, ``data.path``, or several
  sources mixed by weight (``data.sources``, ``data.resampled``: mixing.py);
- ``manifest``: a parquet file with ``image_path`` and caption columns, ``data.path``.

Each sample gets a DINOv2 global crop and two texts: its alt-text for CLS1 and one caption
sampled from ``caption_granularities`` (weights ``caption_probs``) for CLS2. Every random choice
is seeded by ``(seed, epoch, sample)``, so a seed fixes the batches, with any worker count.

The training loader is a `ResumableLoader`: Lightning stores its position in checkpoints and a
resumed run continues with exactly the batch after the last one trained on.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch

from tipslab.datamodules.batch import Batch
from tipslab.datamodules.caption_fields import CaptionMapping
from tipslab.datamodules.hard_negatives import WordSwap
from tipslab.datamodules.image_io import MAX_PIXELS
from tipslab.datamodules.loader import ResumableLoader
from tipslab.datamodules.masking import BlockMasker
from tipslab.datamodules.resolution_stages import ResolutionStages, parse_stages
from tipslab.datamodules.sample_quality import QualityGate
from tipslab.datamodules.streams import (
    MapBatchStream,
    SampleProcessor,
    ShardBatchStream,
)
from tipslab.datamodules.transforms import MultiCropViews, Resize, check_image_size
from tipslab.errors import TipslabError

SOURCES = ("scenes", "shards", "manifest")
DEFAULTS = {
    "source": "scenes",
    "path": None,
    "num_train": 2048,
    "num_val": 64,
    "image_size": 112,
    "batch_size": 32,
    "num_workers": 0,
    "caption_granularities": ["short", "long"],
    "caption_probs": None,
    "global_crops": {"count": 1, "scale": [0.32, 1.0]},
    "local_crops": {"count": 0, "size": 98, "scale": [0.05, 0.32]},
    "masking": {"enabled": False, "probability": 0.5, "ratio": [0.1, 0.5], "min_block": 4},
    "flip": False,
    "crop_captions": True,
    "resolution_stages": [],
    "caption_crop_scale": {"alt": None, "short": None, "long": [0.8, 1.0]},
    "shuffle_buffer": 1000,
    "root": None,
    "sources": [],
    "resampled": False,
    "epoch_samples": None,
    "captions": {"alt": None, "short": None, "long": None},
    "caption_check_samples": 32,
    "max_image_pixels": MAX_PIXELS,
    "decode_draft": True,
    "crops_on_device": "auto",
    "decode_on_device": "auto",
    "bad_samples": {"max_share": 0.1, "min_seen": 1000},
    "hard_negatives": {"words": []},
}
TINY_HINT = "to run the tiny built-in scenes experiment instead: make train EXP=tipsv2_tiny"


def _plain(cfg) -> dict:
    """The data config as a plain dict (OmegaConf DictConfig or any mapping)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise TipslabError(f"data config is a {type(cfg).__name__}; expected a mapping (the data: block)")
    # Unknown keys are the config loader's to reject (struct mode against defaults.yaml).
    return {**DEFAULTS, **dict(cfg)}


def _distributed(trainer) -> tuple[int, int]:
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _on_cuda(trainer) -> bool:
    from lightning.pytorch.accelerators import CUDAAccelerator

    return isinstance(trainer.accelerator, CUDAAccelerator)


class PretrainDataModule(L.LightningDataModule):
    def __init__(self, data_cfg, tokenizer, seed: int = 0):
        super().__init__()
        self.cfg = _plain(data_cfg)
        self.tokenizer = tokenizer
        self.seed = int(seed)
        cfg = self.cfg
        if cfg["source"] not in SOURCES:
            raise TipslabError(f"data.source={cfg['source']!r}; expected one of {', '.join(SOURCES)}")
        self.image_size = check_image_size(cfg["image_size"])
        for key in ("batch_size", "num_train", "num_val"):
            if int(cfg[key]) < (0 if key == "num_val" else 1):
                raise TipslabError(f"data.{key}={cfg[key]}; expected a positive number")
        if int(cfg["num_workers"]) < 0:
            raise TipslabError(f"data.num_workers={cfg['num_workers']}; expected 0 or more")
        if cfg["source"] == "manifest" or (cfg["source"] == "shards" and not cfg["sources"]):
            self._check_path()
        self.caption_mapping = CaptionMapping(dict(cfg["captions"] or {}), shards=cfg["source"] == "shards")
        bad = {**DEFAULTS["bad_samples"], **dict(cfg["bad_samples"] or {})}
        QualityGate(bad["max_share"], bad["min_seen"])  # bad values fail here, not at the first batch
        self._logged_at = -1
        for key in ("crops_on_device", "decode_on_device"):
            if cfg[key] not in ("auto", True, False):
                raise TipslabError(f"data.{key}={cfg[key]!r}; expected auto, true or false")
        if cfg["decode_on_device"] is True and cfg["crops_on_device"] is False:
            raise TipslabError("data.decode_on_device=true needs the views cut on the device too "
                               "(data.crops_on_device: auto or true): they are cut from the decoded pictures")
        stages = parse_stages(list(cfg["resolution_stages"] or []), self.image_size)
        self.processor = ResolutionStages(stages, self._processor) if len(stages) > 1 else self._processor(self.image_size)
        # Weak: the trainer holds the loader it trains from; loaders others asked for may go.
        self._train_loaders: weakref.WeakSet[ResumableLoader] = weakref.WeakSet()

    def _check_path(self) -> None:
        source, path = self.cfg["source"], self.cfg["path"]
        what = "a folder of webdataset .tar shards" if source == "shards" else "a parquet manifest"
        if not path:
            raise TipslabError(f"data.source={source} needs data.path ({what}) but the data path is missing; "
                               f"set data.path=..., or {TINY_HINT}")
        if isinstance(path, str) and "{" not in path and "://" not in path and not Path(path).exists():
            raise TipslabError(f"data.path={path}: the data path is missing (expected {what}); {TINY_HINT}")

    def image_size_at(self, step: int) -> int:
        """The global crops' size at training step ``step`` (``data.resolution_stages``)."""
        stages = self.processor
        return stages.image_size_at(step) if isinstance(stages, ResolutionStages) else self.image_size

    def _processor(self, image_size: int) -> SampleProcessor:
        cfg = self.cfg
        return SampleProcessor(self.views(image_size), cfg["caption_granularities"], cfg["caption_probs"],
                               masker=self.masker(), crop_captions=bool(cfg["crop_captions"]),
                               caption_crop_scale=dict(cfg["caption_crop_scale"] or {}),
                               negatives=WordSwap(self.negative_words()))

    def negative_words(self) -> list:
        """``data.hard_negatives.words``: groups of interchangeable words (empty: no negatives)."""
        return {**DEFAULTS["hard_negatives"], **dict(self.cfg["hard_negatives"] or {})}["words"] or []

    def views(self, image_size: int | None = None) -> MultiCropViews:
        """The crops of one sample: ``data.global_crops`` and ``data.local_crops`` (DINOv2's multi-crop)."""
        g = {**DEFAULTS["global_crops"], **dict(self.cfg["global_crops"])}
        loc = {**DEFAULTS["local_crops"], **dict(self.cfg["local_crops"])}
        return MultiCropViews(image_size or self.image_size, count=int(g["count"]), scale=tuple(g["scale"]),
                              local_count=int(loc["count"]), local_size=int(loc["size"]),
                              local_scale=tuple(loc["scale"]), flip=bool(self.cfg["flip"]))

    def masker(self) -> BlockMasker | None:
        """Block masks for the global crops (``data.masking``), or None when masking is off."""
        m = {**DEFAULTS["masking"], **dict(self.cfg["masking"])}
        if not m["enabled"]:
            return None
        return BlockMasker(float(m["probability"]), tuple(m["ratio"]), int(m["min_block"]))

    def provides(self) -> frozenset[str]:
        """What the batches carry beyond images and texts: ``local_crops``, ``masks``."""
        out = set()
        if int(dict(self.cfg["local_crops"]).get("count", 0)) > 0:
            out.add("local_crops")
        if dict(self.cfg["masking"]).get("enabled", False):
            out.add("masks")
        return frozenset(out)

    # -- sources ------------------------------------------------------------------------------
    def train_source(self):
        """The map-style dataset (scenes, manifest) or `ShardDataset` (shards) training reads."""
        cfg = self.cfg
        if cfg["source"] == "scenes":
            from tipslab.datamodules.scenes import ScenesDataset

            return ScenesDataset("train", int(cfg["num_train"]), self.image_size, seed=self.seed)
        if cfg["source"] == "manifest":
            from tipslab.datamodules.manifest import ManifestDataset

            manifest = ManifestDataset(cfg["path"], root=cfg["root"], captions=self.caption_mapping,
                                       max_pixels=int(cfg["max_image_pixels"]))
            if cfg["decode_draft"]:
                manifest.decode_scale = self.processor.decode_scale
            return manifest
        from tipslab.datamodules.shards import ShardDataset

        shards = ShardDataset(cfg["path"], seed=self.seed, shuffle_buffer=int(cfg["shuffle_buffer"]),
                              captions=self.caption_mapping, max_pixels=int(cfg["max_image_pixels"]),
                              sources=list(cfg["sources"] or []), resampled=bool(cfg["resampled"]),
                              epoch_samples=cfg["epoch_samples"])
        if cfg["decode_draft"]:
            shards.decode_scale = self.processor.decode_scale
        # A wrong data.captions key fails now, after a few samples, not after an epoch of fallbacks.
        for source in shards.sources:  # each source's first shard: sources may be laid out differently
            url = source.urls[0]
            self.caption_mapping.check_mapping(shards.first_captions(int(cfg["caption_check_samples"]), url), url)
        return shards

    def train_stream(self, rank: int = 0, world_size: int = 1):
        cfg = self.cfg
        source = self.train_source()
        if cfg["source"] == "shards":
            return ShardBatchStream(source, int(cfg["batch_size"]), self.tokenizer, self.processor, seed=self.seed,
                                    rank=rank, world_size=world_size, num_workers=int(cfg["num_workers"]))
        return MapBatchStream(source, int(cfg["batch_size"]), self.tokenizer, self.processor, seed=self.seed,
                              rank=rank, world_size=world_size)

    # -- loaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> ResumableLoader:
        # Lightning warns that an IterableDataset's __len__ "could be inaccurate" with workers;
        # ours is exact (batches are split over workers by construction, see streams.py).
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
        rank, world = _distributed(self.trainer)
        stream = self.train_stream(rank, world)
        # In a Trainer, crops travel as uint8 (4x fewer bytes through worker queues and to the
        # device) and become float on the device (`on_after_batch_transfer`); plain loops get floats.
        stream.float_pixels = self.trainer is None
        defer = self.crops_on_device()
        for processor in getattr(self.processor, "processors", [self.processor]):
            processor.defer_crops = defer
        source = getattr(stream, "shards", None) or getattr(stream, "dataset", None)
        if hasattr(source, "keep_jpeg"):  # shards, manifests: JPEG files
            source.keep_jpeg = defer and self.decode_on_device()
        workers = int(self.cfg["num_workers"])
        loader = ResumableLoader(
            stream,
            num_workers=workers,
            # Inside a Trainer, a batch counts once a training step takes it (see loader.py).
            count_on_yield=self.trainer is None,
            pin_memory=self.trainer is not None and _on_cuda(self.trainer),
            describe={"seed": self.seed, "batch_size": int(self.cfg["batch_size"]), "world_size": world,
                      "rank": rank, "num_workers": workers, "source": self.cfg["source"]},
            quality=QualityGate(**{**DEFAULTS["bad_samples"], **dict(self.cfg["bad_samples"] or {})}),
        )
        self._train_loaders.add(loader)
        return loader

    def crops_on_device(self) -> bool:
        """Whether the training views are cut on the device (``data.crops_on_device``): auto inside a
        Trainer on CUDA when a sample has several views (multi-crop: ten crops cost a worker more
        than the decode, a GPU little; one crop costs about what shipping the whole picture does);
        true always (a plain loop then calls `Batch.with_float_pixels` on its batches); auto is also
        on where ``data.decode_on_device`` is true: the views are cut from the pictures decoded there."""
        setting = self.cfg["crops_on_device"]
        if setting == "auto":
            if self.cfg["decode_on_device"] is True:
                return True
            views = self.views()
            several = views.count + views.local_count > 1
            return (several or self.decode_on_device()) and self.trainer is not None and _on_cuda(self.trainer)
        return bool(setting)

    def decode_on_device(self) -> bool:
        """Whether plain JPEGs travel encoded and are decoded on the device (``data.decode_on_device``,
        `encoded_jpeg.py`): auto inside a Trainer on CUDA for JPEG sources (shards, manifests), where
        a batch decodes in one nvJPEG call; true always (a plain loop decodes on the CPU, in
        `Batch.with_float_pixels`). The views are then cut on the device too."""
        setting = self.cfg["decode_on_device"]
        if setting == "auto":
            return (self.cfg["source"] in ("shards", "manifest") and self.trainer is not None
                    and _on_cuda(self.trainer))
        return bool(setting)

    def val_loader(self, batch_size: int | None = None) -> torch.utils.data.DataLoader:
        """Unaugmented batches of the scenes val split (whole image resized, seeded captions).

        Not a Lightning ``val_dataloader``: the pretraining system has no validation step, the
        evaluators call this when they want held-out scenes.
        """
        if self.cfg["source"] != "scenes" or int(self.cfg["num_val"]) < 1:
            raise TipslabError("data: a validation split exists only for data.source=scenes with data.num_val > 0")
        from tipslab.datamodules.scenes import ScenesDataset

        dataset = ScenesDataset("val", int(self.cfg["num_val"]), self.image_size, seed=self.seed)
        processor = SampleProcessor(Resize(self.image_size), self.cfg["caption_granularities"],
                                    self.cfg["caption_probs"])
        size = min(int(batch_size or self.cfg["batch_size"]), len(dataset))
        stream = MapBatchStream(dataset, size, self.tokenizer, processor, seed=self.seed, shuffle=False)
        return ResumableLoader(stream, num_workers=0)

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Lightning calls this for the batch a training step is about to use (after its own
        # one-batch prefetch): that is when the batch counts as consumed for resuming.
        trainer = self.trainer
        if trainer is not None and trainer.training:
            for loader in self._train_loaders:
                if loader.mark_consumed(batch):
                    self._log_quality(loader)
                    break
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, Batch) or (batch.deferred is None and batch.images.dtype != torch.uint8):
            return batch
        # Lightning casts a batch's floats to a "-true" precision (bf16-true...) before the transfer,
        # when these views were still uint8: the same cast, now that they are float.
        batch = batch.with_float_pixels()
        return self.trainer.precision_plugin.convert_input(batch) if self.trainer is not None else batch

    def _log_quality(self, loader: ResumableLoader) -> None:
        """Bad-sample counts to the run's logger (MLflow) every ``trainer.log_every_n_steps``."""
        trainer = self.trainer
        step = int(trainer.global_step)
        if trainer.logger is None or step == self._logged_at or step % max(int(trainer.log_every_n_steps), 1):
            return
        self._logged_at = step
        trainer.logger.log_metrics(loader.quality.metrics(), step=step)
