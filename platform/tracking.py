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

# MLflow 3 opens an experiment without this tag in its GenAI view (traces); training runs want
# the model-training view (metrics, parameters, artifacts).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def runs_root(cfg: DictConfig) -> Path:
    """The folder holding the default store: the parent of the run's folder (probes) or, given
    the run's own folder `<runs>/<experiment>/<run name>`, its grandparent (`tipslab train`)."""
    return Path(cfg.run_dir).resolve().parent


def default_tracking_uri(cfg: DictConfig, store_root: Path | None = None) -> str:
    return cfg.tracking.tracking_uri or f"sqlite:///{(store_root or runs_root(cfg)) / 'mlflow.db'}"


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


def build_logger(cfg: DictConfig, resume: bool = False, store_root: Path | None = None):
    """Lightning's MLFlowLogger on the run's MLflow run (the same one again when resuming).
    `store_root`: the folder of the default sqlite store, when not the run folder's parent."""
    from lightning.pytorch.loggers import MLFlowLogger

    run_id = None
    id_file = Path(cfg.run_dir) / "mlflow_run_id.txt"
    if resume and id_file.exists():
        # A resumed run continues the same MLflow run, so its metrics form one curve.
        run_id = id_file.read_text().strip() or None
    uri = default_tracking_uri(cfg, store_root)
    prepare_store(uri)
    logger = MLFlowLogger(
        experiment_name=cfg.tracking.experiment_name,
        # "<experiment>/<run name>": two runs of one experiment are told apart in the run list.
        run_name=f"{cfg.experiment}/{cfg.tracking.run_name}" if cfg.tracking.run_name else cfg.experiment,
        tracking_uri=uri,
        artifact_location=str((store_root or runs_root(cfg)) / "mlartifacts") if not cfg.tracking.tracking_uri else None,
        tags={"tipslab.experiment": str(cfg.experiment), "tipslab.run_dir": str(Path(cfg.run_dir).resolve())},
        run_id=run_id,
    )
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:  # elsewhere `experiment` is a stand-in that answers None
        mark_model_training(logger.experiment, logger.experiment_id)
    if run_id is None:
        logger.log_hyperparams(flatten_for_logging(cfg))
        if logger.run_id:  # None on ranks other than 0
            # Written now, not at the end: a run killed mid-way resumes into the same MLflow run.
            atomic_write_text(id_file, logger.run_id + "\n")
    return logger


def mark_model_training(client, experiment_id: str) -> None:
    """Tag the experiment as model training unless someone chose its kind already (in the UI)."""
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
