"""One folder per training run, and which run and checkpoint `checkpoint.resume` continues.

Layout (`run_dir` is the experiment's folder of runs):

    <run_dir>/<run name>/   config.yaml, mlflow_run_id.txt, checkpoints/, model/, eval/, pictures/
    <run_dir>/latest        a link to the run started or continued last

A run's name is `tracking.run_name`, else $TIPSLAB_RUN_NAME (rank 0 sets it for the processes
Lightning spawns; `make train` and the SLURM script set it for torchrun, so every rank on every
node agrees), else torchrun's rendezvous id, else the UTC time of the start.

`checkpoint.resume`: null starts a new run; `last` continues the newest run of the experiment
(the one whose newest checkpoint is newest); a run name or run folder continues that run; a
checkpoint path starts a new run from that checkpoint. A continued run resumes from its newest
*readable* checkpoint: a 0-byte or half-written `last.ckpt` (a kill during a save) is skipped,
and the log says so.
"""

from __future__ import annotations

import logging
import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from tipslab.errors import TipslabError

log = logging.getLogger(__name__)

RUN_NAME_ENV = "TIPSLAB_RUN_NAME"
LATEST = "latest"
STEP_CHECKPOINT = re.compile(r"^step(\d+)\.ckpt$")
DCP_META = "meta.pt"  # Lightning's ModelParallelStrategy: the non-tensor state beside the DCP shards


@dataclass
class RunPlan:
    name: str
    run_dir: Path
    checkpoint: Path | None  # what Lightning resumes from, None for a fresh start
    step: int | None  # the checkpoint's global step
    notes: list[str]  # what was chosen and why, for the log


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be read (None when it can): cheap checks, nothing is loaded."""
    if path.is_dir():  # a distributed (DCP) checkpoint: rank 0 writes meta.pt last
        meta, index = path / DCP_META, path / ".metadata"
        if not index.is_file() or index.stat().st_size == 0:
            return "a partial distributed checkpoint (no .metadata)"
        if not meta.is_file() or not zipfile.is_zipfile(meta):
            return f"a partial distributed checkpoint (no readable {DCP_META})"
        return None
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "0 bytes"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut one has no central directory
        return "truncated or not a torch checkpoint"
    return None


def checkpoint_step(path: Path) -> int:
    """The global step a Lightning checkpoint was saved at (memory-mapped: nothing big is read)."""
    import torch

    source = path / DCP_META if path.is_dir() else path
    try:
        state = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - older checkpoints may hold objects weights_only refuses
        state = torch.load(source, map_location="cpu", mmap=True, weights_only=False)
    return int(state.get("global_step", 0))


def newest_readable_checkpoint(checkpoint_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume a run from: last.ckpt, else the highest-step readable step*.ckpt.
    Also returns a note for each one skipped as unreadable."""
    notes: list[str] = []
    candidates = [checkpoint_dir / "last.ckpt"]
    if checkpoint_dir.is_dir():
        steps = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := STEP_CHECKPOINT.match(p.name))]
        candidates += [p for _, p in sorted(steps, reverse=True)]
    for path in candidates:
        if not path.exists():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path, notes
        notes.append(f"skipped {path} ({problem}: a save was interrupted)")
    return None, notes


def runs_of(experiment_dir: Path) -> list[Path]:
    """The run folders of an experiment (the `latest` link and hidden files are not runs)."""
    if not experiment_dir.is_dir():
        return []
    return sorted(p for p in experiment_dir.iterdir()
                  if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and (p / "config.yaml").is_file())


def _last_saved(run: Path) -> float:
    checkpoints = [p.stat().st_mtime for p in (run / "checkpoints").glob("*.ckpt")] if (run / "checkpoints").is_dir() else []
    return max(checkpoints, default=-1.0)


def _agreed_name(cfg: DictConfig) -> str | None:
    """A name every process of the run computes alike (None: rank 0 is alone and picks one)."""
    if cfg.tracking.run_name:
        return str(cfg.tracking.run_name)
    if os.environ.get(RUN_NAME_ENV):
        return os.environ[RUN_NAME_ENV]
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return elastic
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        raise TipslabError(f"processes started by an outside launcher must agree on the run's name: set "
                           f"{RUN_NAME_ENV} (make train and experiments/slurm_train.sh do) or tracking.run_name")
    return None


def _new_name(experiment_dir: Path) -> str:
    base = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name, n = base, 1
    while (experiment_dir / name).exists():  # two runs started in the same second
        n += 1
        name = f"{base}-{n}"
    return name


def _is_checkpoint_path(path: Path) -> bool:
    return path.suffix == ".ckpt" or (path / DCP_META).exists()


def plan_run(cfg: DictConfig) -> RunPlan:
    """Which folder this run writes to and which checkpoint it resumes (if any); refuses what
    would clobber a run or train nothing, with one line that says what to do instead."""
    experiment_dir = Path(cfg.run_dir)
    resume = cfg.checkpoint.resume
    name = _agreed_name(cfg)
    notes: list[str] = []
    fork_from: Path | None = None

    if resume in (None, "", "none"):
        name = name or _new_name(experiment_dir)
    elif resume == "last" and name is None:
        runs = [r for r in runs_of(experiment_dir) if _last_saved(r) >= 0]
        if not runs:
            raise TipslabError(f"checkpoint.resume=last but no run of '{cfg.experiment}' in {experiment_dir} "
                               "has a checkpoint: nothing to resume")
        newest = max(runs, key=_last_saved)
        name = newest.name
        notes.append(f"checkpoint.resume=last: continuing run {newest} (the newest of {len(runs)} run(s) of "
                     f"'{cfg.experiment}' with checkpoints)")
    elif resume != "last":
        target = Path(str(resume)).expanduser()
        if (experiment_dir / str(resume)).is_dir() and not _is_checkpoint_path(experiment_dir / str(resume)):
            name = str(resume)
        elif target.is_dir() and (target / "checkpoints").is_dir():
            experiment_dir, name = target.parent, target.name
        elif target.exists() and _is_checkpoint_path(target):
            fork_from = target
            name = name or _new_name(experiment_dir)
        else:
            known = ", ".join(r.name for r in runs_of(experiment_dir)) or "none"
            raise TipslabError(f"checkpoint.resume={resume}: no such run in {experiment_dir} (runs: {known}) "
                               "and no such checkpoint file")

    run_dir = experiment_dir / name
    if fork_from is None and resume in (None, "", "none"):
        existing, _ = newest_readable_checkpoint(run_dir / "checkpoints")
        if existing is not None or (run_dir / "model").exists():
            raise TipslabError(f"run {run_dir} already exists: continue it with checkpoint.resume={name}, or give "
                               "the new run another tracking.run_name")
        return RunPlan(name, run_dir, None, None, notes)

    if fork_from is not None:
        problem = checkpoint_problem(fork_from)
        if problem is not None:
            raise TipslabError(f"checkpoint.resume={fork_from}: cannot read it ({problem})")
        checkpoint = fork_from
        notes.append(f"new run {run_dir} starting from checkpoint {fork_from}")
    else:
        checkpoint, skipped = newest_readable_checkpoint(run_dir / "checkpoints")
        notes += skipped
        if checkpoint is None:
            raise TipslabError(f"checkpoint.resume={resume}: run {run_dir} has no readable checkpoint"
                               + (f" ({'; '.join(skipped)})" if skipped else ""))
        if skipped:
            notes.append(f"resuming from {checkpoint.name}, the newest readable checkpoint")
    step = checkpoint_step(checkpoint)
    max_steps = int(cfg.trainer.max_steps)
    if step >= max_steps:
        raise TipslabError(f"run {run_dir} is already at step {step} ({checkpoint.name}) and trainer.max_steps is "
                           f"{max_steps}: nothing to train and no new model to export. Raise trainer.max_steps to "
                           f"train it further; its model is {run_dir / 'model'}")
    return RunPlan(name, run_dir, checkpoint, step, notes)


def link_latest(experiment_dir: Path, name: str) -> None:
    """Point <experiment_dir>/latest at run `name` (replaced atomically: a reader sees old or new)."""
    link = experiment_dir / LATEST
    if link.exists() and not link.is_symlink():
        log.warning("%s is not a link: left as it is", link)
        return
    tmp = experiment_dir / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, link)
