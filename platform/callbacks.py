"""Training callbacks: loss history for the end-of-run summary, throughput, pictures for MLflow."""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor

log = logging.getLogger(__name__)


class LossHistory(L.Callback):
    """First and last training loss, averaged over a few steps so one noisy batch does not decide."""

    def __init__(self, window: int = 5):
        self.window = window
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss.detach()))

    @property
    def first(self) -> float | None:
        return sum(self.losses[: self.window]) / len(self.losses[: self.window]) if self.losses else None

    @property
    def last(self) -> float | None:
        return sum(self.losses[-self.window :]) / len(self.losses[-self.window :]) if self.losses else None


def StepThroughput(window_size: int = 10) -> ThroughputMonitor:
    """Lightning's throughput monitor, told how to count images in a tipslab Batch."""
    return ThroughputMonitor(batch_size_fn=lambda batch: batch.images.shape[0], window_size=window_size)
