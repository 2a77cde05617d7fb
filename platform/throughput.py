"""Training speed you can see: images/s, the step time split into data wait and compute, achieved
FLOP/s and MFU, logged to MLflow (`perf/*`) and shown in the progress bar.

FLOPs are counted once, on the first training step, by torch's FlopCounterMode watching the real
step (forward + backward; no extra pass, so no state or random stream is touched); later steps of
the same shapes cost the same. MFU divides the achieved FLOP/s by the device's peak: a table of
common GPUs (dense bf16 tensor-core peaks from the vendors' data sheets), or on a CPU a bf16/fp32
matmul measured once in this process (`measured_matmul_peak`).
"""

from __future__ import annotations

import time

import lightning as L
import torch

# Dense (no sparsity) bf16 peak FLOP/s by device-name fragment, most specific first.
GPU_PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
)

_measured: dict[tuple[str, str], float] = {}


def measured_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """FLOP/s of a square matmul on `device`, best of a few (the practical peak a model could reach)."""
    key = (str(device), str(dtype))
    if key not in _measured:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        _measured[key] = 2 * n**3 / best
    return _measured[key]


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in GPU_PEAK_BF16:
            if fragment in name:
                return peak, f"{name} bf16 data sheet"
        return measured_matmul_peak(device, torch.bfloat16, 4096), f"{name} measured bf16 matmul"
    return measured_matmul_peak(device), "measured fp32 matmul"


def count_flops(step) -> tuple[float, object]:
    """FLOPs of `step()` (forward and backward inside it), and its result."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = step()
    return float(counter.get_total_flops()), result


class Throughput(L.Callback):
    """Per-step timing on every rank; rank 0 logs the window means every `log_every_n_steps`."""

    def __init__(self, log_every: int = 10, count_flops: bool = True):
        self.log_every = max(int(log_every), 1)
        # Not under torch.compile: compiled kernels bypass the dispatcher the counter watches, and
        # an active dispatch mode changes how Dynamo traces the first step (bench/ gives compiled MFU).
        self.count = count_flops
        self.flops_per_step: float | None = None  # this rank's, counted on the first step
        self.peak: tuple[float, str] | None = None
        self._counter = None
        self._first_done = False
        self._last_end: float | None = None
        self._start = 0.0
        self._window: list[tuple[float, float, int]] = []  # (data wait s, compute s, images)
        self.logged: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        self._wait = now - self._last_end if self._last_end is not None else 0.0
        self._start = now
        if self.count and self.flops_per_step is None and self._counter is None:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # kernels are asynchronous: time their end
        now = time.perf_counter()
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            # Counted per micro-batch: an optimizer step with accumulation is that many of these.
            self.flops_per_step = float(self._counter.get_total_flops())
            self._counter = None
            self.peak = device_peak_flops(pl_module.device)
        if self._first_done:
            self._window.append((self._wait, now - self._start, int(batch.images.shape[0])))
        self._first_done = True  # the first step (compile, allocator warm-up, counting) is no measure of speed
        self._last_end = now
        if len(self._window) >= self.log_every:
            self._log(trainer, pl_module)

    def _log(self, trainer, pl_module) -> None:
        wait = sum(w for w, _, _ in self._window)
        compute = sum(c for _, c, _ in self._window)
        images = sum(n for _, _, n in self._window)
        steps = len(self._window)
        self._window = []
        total = wait + compute
        world = trainer.world_size
        metrics = {
            "perf/images_per_sec": images * world / total,
            "perf/step_ms": 1e3 * total / steps,
            "perf/data_wait_ms": 1e3 * wait / steps,
            "perf/compute_ms": 1e3 * compute / steps,
            "perf/data_wait_share": wait / total,
        }
        if self.flops_per_step and self.peak:
            achieved = self.flops_per_step * steps / total  # per device
            metrics["perf/tflops_per_sec_per_device"] = achieved / 1e12
            metrics["perf/mfu"] = achieved / self.peak[0]
        self.logged = metrics
        pl_module.log("img/s", metrics["perf/images_per_sec"], prog_bar=True, logger=False, batch_size=1)
        if "perf/mfu" in metrics:
            pl_module.log("mfu", metrics["perf/mfu"], prog_bar=True, logger=False, batch_size=1)
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
