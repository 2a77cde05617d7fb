"""Running the encoder over a stream of images at the model's speed, chosen by the device.

On a GPU: bf16 autocast under inference mode, a batch size sized to the device, images stacked
into pinned host buffers by a prefetch thread (decode and resize overlap the forward), copies to
the device and patches back to the host (as float16, what the index stores) issued
non-blocking (the patches on a copy stream of their own), and results handed out one batch
late, so batch i+1 computes while batch i is copied and written. On a CPU: float32 (CPU bf16
autocast is slower without AMX and would change vectors for no gain), the same prefetch thread,
no pinning. `ExtractionStats` says how long the loop waited for pixels and for the device.
`plan_for(device)` picks; any plan runs on any device, which is how the GPU path is tested on a
CPU (the copy stream alone needs CUDA).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from tipslab.datamodules.transforms import as_float

PREFETCH = 3  # stacked batches waiting for the device
CPU_BATCH = 16
GPU_BATCH_PER_GIB = 4  # images (224 px, B/14, bf16) per GiB of free GPU memory, leaving room for activations
GPU_BATCH_RANGE = (32, 512)


@dataclass(frozen=True)
class ExtractionPlan:
    """How a batch runs: the device, bf16 autocast, pinned buffers, float16 results, batch size."""

    device: torch.device
    autocast: bool
    pinned: bool
    host_dtype: torch.dtype
    batch_size: int


def plan_for(device: torch.device | str, batch_size: int | None = None) -> ExtractionPlan:
    """The plan for ``device``; ``batch_size`` None = sized to the device."""
    device = torch.device(device)
    if device.type == "cuda":
        if batch_size is None:
            free, _ = torch.cuda.mem_get_info(device)
            low, high = GPU_BATCH_RANGE
            batch_size = max(low, min(high, int(free / 2**30 * GPU_BATCH_PER_GIB)))
        return ExtractionPlan(device, autocast=True, pinned=True, host_dtype=torch.float16, batch_size=batch_size)
    return ExtractionPlan(device, autocast=False, pinned=False, host_dtype=torch.float32,
                          batch_size=batch_size or CPU_BATCH)


def _prefetch(batches: Iterable, pinned: bool) -> Iterator:
    """Stack each batch's pixels in a background thread (pinned when asked); re-raises its errors."""
    out: queue.Queue = queue.Queue(maxsize=PREFETCH)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for batch in batches:
                if stop.is_set():
                    return
                first = batch[0].pixels
                # Stacked straight into pinned memory: one host copy, not a stack and then a pin.
                pixels = torch.empty((len(batch), *first.shape), dtype=first.dtype, pin_memory=pinned)
                torch.stack([image.pixels for image in batch], out=pixels)
                out.put((batch, pixels))
            out.put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            out.put(err)

    thread = threading.Thread(target=work, name="extract-prefetch", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


@dataclass
class ExtractionStats:
    """Where a run's time went, so one GPU run says what bounds it: ``data_wait_s`` waiting for
    pixels (decode-bound: the device may idle), ``device_wait_s`` waiting for a batch's forward
    and copy back to finish (device-bound: the goal); the rest is launching work and the
    caller's own work per batch. On a CPU the forward runs inline and ``device_wait_s`` stays 0."""

    batches: int = 0
    images: int = 0
    data_wait_s: float = 0.0
    device_wait_s: float = 0.0


def run_batches(encoder, batches: Iterable, plan: ExtractionPlan, dense: bool,
                stats: ExtractionStats | None = None) -> Iterator[tuple]:
    """(batch, patches [B, N, D] on the host in ``plan.host_dtype``, L2-normalised, grid) per batch,
    in order; on CUDA each batch is handed out after the next one has been queued, and its patches
    travel to the host on a copy stream of their own while the next batch computes."""
    cuda = plan.device.type == "cuda"
    stats = stats if stats is not None else ExtractionStats()
    copy_stream = torch.cuda.Stream(plan.device) if cuda else None
    pending = None
    with torch.inference_mode():
        stream = _prefetch(batches, plan.pinned)
        try:
            while True:
                waited = time.perf_counter()
                item = next(stream, None)
                stats.data_wait_s += time.perf_counter() - waited
                if item is None:
                    break
                batch, pixels = item
                stats.batches += 1
                stats.images += len(batch)
                pixels = pixels.to(plan.device, non_blocking=plan.pinned)
                if pixels.dtype == torch.uint8:  # a folder's (a quarter of the bytes to copy): / 255 on the device
                    pixels = as_float(pixels)
                with torch.autocast(plan.device.type, dtype=torch.bfloat16, enabled=plan.autocast):
                    out = encoder.encode_image(pixels, dense=dense)
                patches = torch.nn.functional.normalize(out.patches.float(), dim=-1).to(plan.host_dtype)
                grid = (int(out.grid[0]), int(out.grid[1]))
                if cuda:
                    host = torch.empty(patches.shape, dtype=plan.host_dtype, pin_memory=plan.pinned)
                    copy_stream.wait_stream(torch.cuda.current_stream(plan.device))  # the patches are computed
                    with torch.cuda.stream(copy_stream):
                        host.copy_(patches, non_blocking=plan.pinned)
                        event = torch.cuda.Event()
                        event.record(copy_stream)
                    # Not reused by the next batch's forward until the copy has read it.
                    patches.record_stream(copy_stream)
                    if pending is not None:
                        yield _finish(pending, stats)
                    pending = (batch, host, grid, event)
                else:
                    yield batch, patches.cpu(), grid
            if pending is not None:
                yield _finish(pending, stats)
        finally:
            stream.close()  # stops the prefetch thread also when the caller stops early


def _finish(pending, stats: ExtractionStats) -> tuple:
    batch, host, grid, event = pending
    waited = time.perf_counter()
    event.synchronize()  # the copy of this batch has landed; later batches keep the GPU busy
    stats.device_wait_s += time.perf_counter() - waited
    return batch, host, grid
