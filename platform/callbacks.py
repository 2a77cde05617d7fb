"""Training callbacks: loss history for the end-of-run summary, throughput, pictures for MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor

log = logging.getLogger(__name__)


class LossHistory(L.Callback):
    """The loss of the global batch per step, logged as `train/global_loss` (each rank's
    `train/loss` covers its own rows only), and the first and last of it, averaged over a few
    steps so one noisy batch does not decide. Its curve is the same at any world size for the same
    global batch, which is how a sharded run is checked against a single-process one."""

    def __init__(self, window: int = 5):
        self.window = window
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach()
        if trainer.world_size > 1:  # every rank reaches here each step: the collective is safe
            loss = trainer.strategy.reduce(loss.clone(), reduce_op="mean")
        self.losses.append(float(loss))
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"train/global_loss": self.losses[-1]}, step=trainer.global_step)

    @property
    def first(self) -> float | None:
        return sum(self.losses[: self.window]) / len(self.losses[: self.window]) if self.losses else None

    @property
    def last(self) -> float | None:
        return sum(self.losses[-self.window :]) / len(self.losses[-self.window :]) if self.losses else None


def StepThroughput(window_size: int = 10) -> ThroughputMonitor:
    """Lightning's throughput monitor, told how to count images in a tipslab Batch."""
    return ThroughputMonitor(batch_size_fn=lambda batch: batch.images.shape[0], window_size=window_size)


class PicturesCallback(L.Callback):
    """Logs to MLflow: the first training batch with its captions, and at the end patch-text
    heatmaps on scenes validation images (each object's class name against the patches)."""

    def __init__(self, cfg, tokenizer, num_images: int = 4):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.num_images = num_images

    def _log(self, trainer, path: Path) -> None:
        logger = trainer.logger
        if logger is not None and getattr(logger, "run_id", None):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="pictures")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != 1 or not trainer.is_global_zero:
            return
        from tipslab.platform.pictures import batch_preview

        captions = getattr(batch, "captions", None) or [""] * len(batch.images)
        path = batch_preview(batch.images, captions, Path(self.cfg.run_dir) / "pictures" / "batch.png")
        self._log(trainer, path)

    def on_train_end(self, trainer, pl_module):
        from tipslab.datamodules.scenes import ScenesDataset
        from tipslab.platform.eval_callback import gathered_encoder
        from tipslab.platform.pictures import heatmap_grid, patch_text_heatmaps

        encoder = gathered_encoder(pl_module)  # every rank: under FSDP2 the gather is a collective
        if not trainer.is_global_zero:
            return

        data = self.cfg.data
        val = ScenesDataset("val", num_images=max(int(data.num_val), 1), image_size=int(data.image_size),
                            seed=int(self.cfg.eval.seed))
        scenes = [val.scene(i) for i in range(min(self.num_images, len(val)))]
        images = torch.stack([s.to_tensor() for s in scenes]).to(pl_module.device)
        labels = [sorted(set(s.class_names))[:3] for s in scenes]
        maps = patch_text_heatmaps(encoder, self.tokenizer, images, labels)
        path = heatmap_grid(images, labels, maps, Path(self.cfg.run_dir) / "pictures" / "patch_text_heatmaps.png")
        self._log(trainer, path)


class PointingGameCallback(L.Callback):
    """Patch-text pointing accuracy on scenes val (dense and final patch features) with its chance
    level, so recipes can be compared on patch alignment: at the end of training and, as a curve,
    every `eval.every_n_steps` steps (it can rise early and fall later)."""

    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.every = int(cfg.eval.every_n_steps)
        self.results: dict[str, float] = {}
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # the same for each micro-batch of an accumulated step: once per step
        if self.every > 0 and step % self.every == 0 and 0 < step < int(self.cfg.trainer.max_steps) \
                and step != self._last_step:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer, pl_module):
        from tipslab.datamodules.scenes import ScenesDataset
        from tipslab.platform.eval_callback import gathered_encoder
        from tipslab.platform.evaluate import pointing_game

        self._last_step = trainer.global_step
        encoder = gathered_encoder(pl_module)  # every rank: under FSDP2 the gather is a collective
        if not trainer.is_global_zero:
            return

        val = ScenesDataset("val", num_images=int(self.cfg.eval.num_scenes),
                            image_size=int(self.cfg.data.image_size), seed=int(self.cfg.eval.seed))
        scenes = [val.scene(i) for i in range(len(val))]
        for feature, dense in (("dense", True), ("final", False)):
            result = pointing_game(encoder, self.tokenizer, scenes, dense=dense)
            self.results[f"eval/pointing_acc_{feature}"] = result.accuracy
            self.results[f"eval/pointing_any_object_{feature}"] = result.any_object
            self.results[f"eval/pointing_calibrated_{feature}"] = result.calibrated
        self.results["eval/pointing_chance"] = result.chance
        if trainer.logger is not None:
            trainer.logger.log_metrics(self.results, step=trainer.global_step)
