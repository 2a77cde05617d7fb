"""MLflow tracking through Lightning's MLFlowLogger.

The default store is an embedded sqlite file beside the runs (no server); a remote tracking
server is one key (`tracking.tracking_uri`). MLflow 3.17 refuses the old `./mlruns` file store
that MLFlowLogger would otherwise default to, hence the explicit sqlite URI.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tipslab.atomic import atomic_write_text
from tipslab.platform.config import flatten_for_logging


def runs_root(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir).resolve().parent


def default_tracking_uri(cfg: DictConfig) -> str:
    return cfg.tracking.tracking_uri or f"sqlite:///{runs_root(cfg) / 'mlflow.db'}"


def prepare_store(uri: str) -> None:
    """Create an sqlite store's tables under a file lock: two runs starting together against a
    new database otherwise both try to create them and one dies ("table metrics already exists")."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    import mlflow

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates / migrates the tables
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_logger(cfg: DictConfig, resume: bool = False):
    from lightning.pytorch.loggers import MLFlowLogger

    run_id = None
    id_file = Path(cfg.run_dir) / "mlflow_run_id.txt"
    if resume and id_file.exists():
        # A resumed run continues the same MLflow run, so its metrics form one curve.
        run_id = id_file.read_text().strip() or None
    prepare_store(default_tracking_uri(cfg))
    logger = MLFlowLogger(
        experiment_name=cfg.tracking.experiment_name,
        run_name=cfg.tracking.run_name or cfg.experiment,
        tracking_uri=default_tracking_uri(cfg),
        artifact_location=str(runs_root(cfg) / "mlartifacts") if not cfg.tracking.tracking_uri else None,
        tags={"tipslab.experiment": str(cfg.experiment)},
        run_id=run_id,
    )
    if run_id is None:
        logger.log_hyperparams(flatten_for_logging(cfg))
        if logger.run_id:  # None on ranks other than 0
            # Written now, not at the end: a run killed mid-way resumes into the same MLflow run.
            atomic_write_text(id_file, logger.run_id + "\n")
    return logger
