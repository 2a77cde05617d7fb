"""What a run holds and uses, logged to MLflow: trained / EMA / frozen parameter counts (head-only
EMA vs a full EMA backbone shows here) and peak memory (GPU allocator peak, else process RSS)."""

from __future__ import annotations

import resource

import lightning as L
import torch


def peak_memory_mb(device: torch.device | None = None) -> dict[str, float]:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's resident set otherwise."""
    if device is not None and device.type == "cuda":
        return {"memory/peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"memory/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class ResourceUsage(L.Callback):
    def __init__(self):
        self.logged: dict[str, float] = {}

    def _log(self, trainer, metrics: dict[str, float]) -> None:
        self.logged.update(metrics)
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_start(self, trainer, pl_module):
        counts = getattr(pl_module, "parameter_counts", None)
        if counts is not None:
            # Under FSDP2 these are the full (global) sizes: DTensor.numel() is the global numel.
            self._log(trainer, {k: float(v) for k, v in counts().items()})

    def on_train_end(self, trainer, pl_module):
        self._log(trainer, peak_memory_mb(pl_module.device))
