"""`tipslab train`: build the data, the system, the tracker and the Lightning trainer, then fit.

Each run has its own folder, `<run_dir>/<run name>` (platform/runs.py decides it and what to
resume). At the end the encoder is exported as a tipslab checkpoint (model.safetensors +
model.yaml) in `<run folder>/model` and logged, with the resolved config and pictures, to the
MLflow run.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from tipslab.errors import TipslabError
from tipslab.platform.config import save_config
from tipslab.platform.precision import precision_plan
from tipslab.platform.tracking import build_logger, default_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    checkpoint_dir: Path
    tracking_uri: str
    experiment_name: str
    run_id: str
    first_loss: float | None
    last_loss: float | None
    evaluation: dict[str, float]


def preflight(cfg: DictConfig) -> None:
    """Fail at once, before building anything, when the machine or the data cannot run `cfg`."""
    precision_plan(cfg.trainer.strategy, cfg.trainer.precision)  # a precision FSDP2 cannot run is a config error
    problems = []
    trainer = cfg.trainer
    if trainer.accelerator == "gpu":
        found = torch.cuda.device_count()
        wanted = int(trainer.devices) if str(trainer.devices).isdigit() else 1
        if found < wanted:
            problems.append(
                f"it needs {wanted} GPU(s) per node (trainer.accelerator=gpu, trainer.devices={trainer.devices})"
                f" but this machine has {found}"
            )
    if cfg.data.source in ("shards", "manifest"):
        path = cfg.data.path
        if not path:
            problems.append(f"it reads {cfg.data.source} from data.path, which is not set")
        elif not Path(path).exists():
            problems.append(f"data.path {path} does not exist")
    if problems:
        raise TipslabError(
            f"experiment '{cfg.experiment}' cannot run here: "
            + "; ".join(problems)
            + ". Set them with overrides (e.g. data.path=/data/shards trainer.devices=8), "
            "or try tipslab on this machine with the tiny CPU experiment: make train EXP=tipsv2_tiny"
        )


def build_strategy(cfg: DictConfig):
    if cfg.trainer.strategy == "fsdp":
        from tipslab.platform.parallelize import fsdp2_strategy

        # Pure FSDP2: every device is one data-parallel shard (no tensor parallelism).
        return fsdp2_strategy(int(cfg.trainer.devices) * int(cfg.trainer.num_nodes))
    if cfg.trainer.strategy == "auto":
        return "auto"
    raise TipslabError(f"trainer.strategy must be 'auto' or 'fsdp', got {cfg.trainer.strategy!r}")


def _resume_path(cfg: DictConfig, checkpoint_dir: Path) -> str | None:
    resume = cfg.checkpoint.resume
    if resume in (None, "", "none"):
        return None
    if resume == "last":
        last = checkpoint_dir / "last.ckpt"
        if not last.exists():
            raise TipslabError(f"checkpoint.resume=last but there is no {last}: nothing to resume")
        return str(last)
    if not Path(resume).exists():
        raise TipslabError(f"checkpoint.resume={resume}: no such checkpoint")
    return str(resume)


def start_run(cfg: DictConfig) -> tuple[Path, Path, str | None]:
    """What every tipslab run does first (pretraining and probes): quiet known noise, make the run
    directory, save the resolved config, find the checkpoint to resume, seed everything.
    Returns (run_dir, checkpoint_dir, checkpoint to resume or None)."""
    _quiet_known_noise()
    run_dir = Path(cfg.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    ckpt_path = _resume_path(cfg, checkpoint_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return run_dir, checkpoint_dir, ckpt_path


def _first_process() -> bool:
    """Rank 0 of the job, before Lightning has set ranks up (children and torchrun ranks say theirs)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and \
        int(os.environ.get("NODE_RANK", "0")) == 0


def start_training_run(cfg: DictConfig):
    """Decide the run's own folder and its checkpoint (platform/runs.py), point `cfg.run_dir` and
    `cfg.tracking.run_name` at them (every callback writes into cfg.run_dir), save the config.
    Returns (plan, experiment folder)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

    from tipslab.platform.runs import RUN_NAME_ENV, link_latest, plan_run

    _quiet_known_noise()
    experiment_dir = Path(cfg.run_dir).resolve()
    cfg.run_dir = str(experiment_dir)
    plan = plan_run(cfg)
    if plan.checkpoint is not None and plan.checkpoint.is_dir() and cfg.trainer.strategy != "fsdp":
        raise TipslabError(f"{plan.checkpoint} is a sharded (FSDP2) checkpoint: resume it with trainer.strategy=fsdp "
                           "(any number of devices), or export its model with trainer.strategy=fsdp first")
    for note in plan.notes:
        (rank_zero_warn if note.startswith("skipped") else rank_zero_info)(note)
    cfg.run_dir = str(plan.run_dir)
    cfg.tracking.run_name = plan.name
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    if _first_process():
        save_config(cfg, plan.run_dir / "config.yaml")
        link_latest(plan.run_dir.parent, plan.name)
        # The processes Lightning spawns for the other devices re-run this command: they must
        # pick the same folder, not a new time stamp.
        os.environ[RUN_NAME_ENV] = plan.name
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return plan, experiment_dir


def train(cfg: DictConfig) -> TrainResult:
    from tipslab.platform.runs import RUN_NAME_ENV

    named_by_caller = RUN_NAME_ENV in os.environ
    try:
        return _train(cfg)
    finally:
        if not named_by_caller:  # a second run in this process gets a name of its own
            os.environ.pop(RUN_NAME_ENV, None)


def _train(cfg: DictConfig) -> TrainResult:
    from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar

    from tipslab.datamodules.datamodule import PretrainDataModule
    from tipslab.modules.checkpoint import save_checkpoint
    from tipslab.modules.tokenizers import build_tokenizer
    from tipslab.platform.callbacks import (
        LossHistory,
        PicturesCallback,
        PointingGameCallback,
        StepThroughput,
    )
    from tipslab.platform.checkpointing import AtomicCheckpoint
    from tipslab.platform.resources import ResourceUsage
    from tipslab.platform.system import PretrainingSystem
    from tipslab.platform.throughput import Throughput

    preflight(cfg)
    plan, experiment_dir = start_training_run(cfg)
    run_dir, checkpoint_dir = plan.run_dir, plan.run_dir / "checkpoints"
    ckpt_path = str(plan.checkpoint) if plan.checkpoint is not None else None
    tokenizer = build_tokenizer(**cfg.model.tokenizer)
    datamodule = PretrainDataModule(cfg.data, tokenizer, seed=int(cfg.seed))
    system = PretrainingSystem(cfg)

    # A run continued in its own folder goes on in its MLflow run; a new one (also one started from
    # another run's checkpoint) gets its own. The store stays beside the experiment folders.
    logger = build_logger(cfg, resume=plan.checkpoint is not None and plan.checkpoint.is_relative_to(run_dir),
                          store_root=experiment_dir.parent)
    history = LossHistory()
    callbacks = [
        AtomicCheckpoint(checkpoint_dir, int(cfg.checkpoint.every_n_steps), int(cfg.checkpoint.keep_last),
                         int(cfg.checkpoint.pin_every_n_steps)),
        LearningRateMonitor(logging_interval="step"),
        StepThroughput(),
        Throughput(int(cfg.trainer.log_every_n_steps), count_flops=not cfg.trainer.compile),
        history,
        ResourceUsage(),
    ]
    if cfg.tracking.pictures:
        callbacks.append(PicturesCallback(cfg, tokenizer))
    pointing = PointingGameCallback(cfg, tokenizer) if cfg.eval.pointing_game else None
    if pointing is not None:
        callbacks.append(pointing)
    evaluation = None
    if cfg.eval.suites:  # the evaluation suites on a schedule and at the end (platform/eval_callback.py)
        from tipslab.platform.eval_callback import EvaluationCallback

        evaluation = EvaluationCallback(cfg, tokenizer)
        callbacks.append(evaluation)
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))

    trainer = L.Trainer(
        max_steps=int(cfg.trainer.max_steps),
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=int(cfg.trainer.num_nodes),
        strategy=build_strategy(cfg),
        # One owner of the bf16 cast: autocast, or FSDP2's policy (platform/precision.py).
        precision=precision_plan(cfg.trainer.strategy, cfg.trainer.precision).lightning,
        accumulate_grad_batches=int(cfg.trainer.accumulate_grad_batches),
        # Clipping happens in PretrainingSystem.optimizer_step (DTensor-aware, every strategy).
        gradient_clip_val=None,
        log_every_n_steps=int(cfg.trainer.log_every_n_steps),
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=bool(cfg.trainer.progress_bar),
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(run_dir),
        deterministic=False,
    )
    trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path)

    model_dir = run_dir / "model"
    encoder = _full_encoder(system)  # a collective under FSDP2: every rank takes part
    if trainer.is_global_zero:
        save_checkpoint(encoder, OmegaConf.to_container(cfg.model, resolve=True), model_dir)
        logger.experiment.log_artifacts(logger.run_id, str(model_dir), artifact_path="model")
        logger.experiment.log_artifact(logger.run_id, str(run_dir / "config.yaml"))
    trainer.strategy.barrier()
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        checkpoint_dir=checkpoint_dir,
        tracking_uri=logger._tracking_uri or default_tracking_uri(cfg, experiment_dir.parent),
        experiment_name=cfg.tracking.experiment_name,
        run_id=logger.run_id,
        first_loss=history.first,
        last_loss=history.last,
        evaluation={**(pointing.results if pointing is not None else {}),
                    **(evaluation.results if evaluation is not None else {})},
    )


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _quiet_known_noise() -> None:
    """Hide messages that are not about this run, so the ones that are stay visible."""
    # Lightning's throughput monitor asks for a FLOP count we do not provide; images/s is what we log.
    warnings.filterwarnings("ignore", message=".*flops_per_batch.*")
    # Each run has its own checkpoint folder: a non-empty one is a run being continued.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    # A deprecation inside Lightning's own pytree helper, not in tipslab code.
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdverts())


def _full_encoder(system):
    """The encoder with plain tensors, also when its parameters are FSDP2 shards."""
    encoder = system.encoder
    state = encoder.state_dict()
    if any(type(v).__name__ == "DTensor" for v in state.values()):
        from tipslab.modules.encoder import build_encoder

        full = {k: (v.full_tensor() if type(v).__name__ == "DTensor" else v) for k, v in state.items()}
        plain = build_encoder(system.cfg.model)
        plain.load_state_dict(full)
        return plain
    return encoder


def configure_process_env() -> None:
    """Settings every training process wants before torch spins up threads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
