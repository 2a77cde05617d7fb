"""Lightning checkpoints that a kill cannot half-write, and that do not pile up.

Every save (a single file, or under FSDP2 a directory of per-rank shards plus `meta.pt`) is
written beside its final name as `.<name>.partial`, flushed to disk, then renamed into place:
a process killed mid-save leaves the previous checkpoint and a partial one that resume skips
(platform/runs.py). Only the newest `checkpoint.keep_last` step checkpoints are kept, plus
`last.ckpt`, every `checkpoint.pin_every_n_steps`-th one, and any the user renamed (pruning
touches only `step<N>.ckpt`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from weakref import proxy

from lightning.pytorch.callbacks import ModelCheckpoint

from tipslab.platform.runs import STEP_CHECKPOINT


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's files and the directory itself, to disk."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    directory = os.open(path if path.is_dir() else path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def replace_checkpoint(partial: Path, final: Path) -> None:
    """Move a finished save into place. A file is replaced in one rename; a directory cannot be
    renamed over a non-empty one, so the old one steps aside first (a kill in between leaves
    `.<name>.old` and resume falls back to the newest step checkpoint)."""
    if partial.is_file() and not final.is_dir():
        os.replace(partial, final)
        return
    old = final.with_name(f".{final.name}.old")
    _remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    _remove(old)


def prune(checkpoint_dir: Path, keep_last: int, pin_every: int) -> list[Path]:
    """Delete step checkpoints beyond the newest `keep_last`, sparing pinned steps; returns them."""
    steps = sorted((int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := STEP_CHECKPOINT.match(p.name)))
    removed = []
    for step, path in steps[:-keep_last] if keep_last > 0 else []:
        if pin_every > 0 and step % pin_every == 0:
            continue
        _remove(path)
        removed.append(path)
    return removed


class AtomicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with `step<N>.ckpt` every N steps and `last.ckpt`, each saved atomically."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep_last: int, pin_every: int = 0):
        # save_top_k=-1: Lightning prunes only by a monitored metric; `prune` keeps the newest instead.
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_steps, save_last=True, save_top_k=-1,
                         filename="step{step:07d}", auto_insert_metric_name=False,
                         enable_version_counter=False)  # each run has its own folder: no last-v1.ckpt
        self.keep_last = keep_last
        self.pin_every = pin_every

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        final = Path(filepath)
        partial = final.with_name(f".{final.name}.partial")
        if trainer.is_global_zero:
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove(partial)  # left by a save that was killed
        trainer.strategy.barrier("tipslab.checkpoint.clean")
        trainer.save_checkpoint(str(partial), self.save_weights_only)  # every rank; ends with a barrier
        if trainer.is_global_zero:
            _fsync(partial)
            replace_checkpoint(partial, final)
            prune(final.parent, self.keep_last, self.pin_every)
        trainer.strategy.barrier("tipslab.checkpoint.renamed")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
