"""`tipslab eval MODEL`: run evaluation suites on a tipslab checkpoint or official weights, print
the table (markdown), write it as CSV / JSON / markdown with the pictures, optionally log both to
MLflow. `add_parser(subparsers)` registers the subcommand on the `tipslab` console script.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tipslab.errors import TipslabError


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tipslab.platform.eval_suites import SUITES

    parser = subparsers.add_parser(
        "eval", help="zero-shot segmentation, retrieval, classification, k-NN and region search numbers",
        description="Evaluate MODEL (a tipslab checkpoint directory, official TIPS files or a release name) "
                    "the way the TIPSv2 paper does, on the built-in scenes or on datasets given with --data.")
    parser.add_argument("model", metavar="MODEL", help="tipslab checkpoint directory, official TIPS files or a release name")
    parser.add_argument("--suite", default="all",
                        help=f"comma-separated suites: {','.join(SUITES)} (default all)")
    parser.add_argument("--data", action="append", default=[], metavar="SUITE=PATH",
                        help="dataset of a suite: zeroshot_seg=ADE20K/VOC/plain folder, retrieval=Karpathy JSON, "
                             "classification=class folder, knn=folder with train/ and val/ (default: scenes val)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="an eval setting (the eval: config block), e.g. seg.window=448 seg.stride=336 "
                             "num_scenes=128")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for eval.csv/json/md and the pictures (default: <run dir>/eval for a "
                             "tipslab checkpoint, else ./eval-<model name>)")
    parser.add_argument("--mlflow", action="store_true",
                        help="log the numbers and pictures to MLflow (the checkpoint's training run when known)")
    parser.add_argument("--no-pictures", action="store_true", help="write the table only, no PNGs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation data and sampling (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default cuda when present, else cpu)")
    parser.add_argument("--text", default=None, help="official models: the text .npz (default: beside MODEL)")
    parser.add_argument("--tokenizer", default=None, help="official models: tokenizer.model (default: beside MODEL)")
    parser.add_argument("--img-size", type=int, default=None, help="resolution the model runs at (official: 448)")
    parser.add_argument("--dense-readout", default=None, choices=("residual", "value"),
                        help="dense patch features: residual (official notebook) or value (value path alone); "
                             "default: the model's model.vision.dense_readout")
    parser.set_defaults(func=run_eval)
    return parser


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise TipslabError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _settings(items: list[str]):
    """--set overrides checked against the eval: block (a mistyped key names the valid ones)."""
    from omegaconf import OmegaConf

    from tipslab.platform.eval_suites import default_settings

    base = default_settings()
    OmegaConf.set_struct(base, True)
    pairs = _pairs(items, "--set")
    try:
        return OmegaConf.merge(base, OmegaConf.from_dotlist([f"{k}={v}" for k, v in pairs.items()]))
    except Exception as err:  # omegaconf's ConfigKeyError / ValidationError: the key or value is wrong
        keys = ", ".join(sorted(_flat(OmegaConf.to_container(base))))
        raise TipslabError(f"--set: {str(err).splitlines()[0]} (valid keys: {keys})") from None


def _flat(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def run_info(model: str) -> tuple[str, str, Path] | None:
    """(tracking URI, run id, run dir) of the training run that wrote a tipslab checkpoint, if known."""
    from omegaconf import OmegaConf

    run_dir = Path(model).expanduser().resolve().parent
    id_file, config = run_dir / "mlflow_run_id.txt", run_dir / "config.yaml"
    if not (id_file.is_file() and config.is_file()):
        return None
    uri = OmegaConf.load(config).get("tracking", {}).get("tracking_uri")
    # tipslab train: <runs>/<experiment>/<run name>/model, the store in <runs>; probes one level up.
    store = next((d for d in (run_dir.parent.parent, run_dir.parent) if (d / "mlflow.db").is_file()), run_dir.parent)
    return uri or f"sqlite:///{store / 'mlflow.db'}", id_file.read_text().strip(), run_dir


def run_eval(args) -> int:
    from tipslab.modules.api import load_model
    from tipslab.modules.checkpoint import is_checkpoint_dir
    from tipslab.platform.eval_suites import evaluate_model, parse_suites

    suites = parse_suites(args.suite)  # before loading anything: a typo costs nothing
    data = _pairs(args.data, "--data")
    settings = _settings(args.settings)
    path = Path(args.model).expanduser()
    own = path.is_dir() and is_checkpoint_dir(path)
    info = run_info(args.model) if own else None
    out = Path(args.out) if args.out else (path.resolve().parent / "eval" if own else Path(f"eval-{path.stem}"))
    loaded = load_model(args.model, args.device or "cpu", text=args.text, tokenizer=args.tokenizer,
                        img_size=args.img_size)
    if args.dense_readout:
        loaded.encoder.vision.dense_readout = args.dense_readout
    report = evaluate_model(loaded, suites, data, settings=settings, out=out, pictures=not args.no_pictures,
                            seed=args.seed)
    if info is not None and not args.no_pictures:
        from tipslab.platform.eval_pictures import curves_picture

        try:
            curves = curves_picture(info[0], info[1], out / "curves.png")
        except Exception as err:  # noqa: BLE001 - a missing or moved MLflow store only costs the plot
            print(f"(no curves picture: {type(err).__name__}: {err})")
            curves = None
        if curves is not None:
            report.pictures["curves"] = curves
    files = report.write(out)
    print(f"\n{args.model}: {', '.join(suites)}  (values and chance in %)")
    print(report.markdown())
    print(f"\ntable   : {files['md']}  {files['csv']}  {files['json']}")
    for name, picture in report.pictures.items():
        print(f"picture : {picture}  ({name})")
    if args.mlflow:
        where = log_to_mlflow(report, info, files)
        print(f"mlflow  : {where}")
    return 0


def log_to_mlflow(report, info, files) -> str:
    """Metrics and pictures into the checkpoint's training run, else a new run `tipslab-eval`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if info is not None:
        uri, run_id, _ = info
        client = MlflowClient(tracking_uri=uri)
    else:
        uri = f"sqlite:///{Path('runs').resolve() / 'mlflow.db'}"
        Path("runs").mkdir(exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("tipslab-eval")
        experiment_id = experiment.experiment_id if experiment else client.create_experiment("tipslab-eval")
        run_id = client.create_run(experiment_id).info.run_id
    # The run's last step (the end-of-training evaluation's), so the numbers line up with it.
    step = max((m.step for key in ("train/loss", "eval/pointing_acc_dense")
                for m in client.get_metric_history(run_id, key)), default=0)
    metrics = [mlflow.entities.Metric(key=k, value=v, timestamp=0, step=step)
               for k, v in report.metrics().items()]
    client.log_batch(run_id, metrics=metrics)
    for path in list(report.pictures.values()) + [files["csv"], files["md"]]:
        client.log_artifact(run_id, str(path), artifact_path="eval")
    if info is None:
        client.set_terminated(run_id)
    return f"run {run_id} in {uri}"
