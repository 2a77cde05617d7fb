"""The `tipslab` console script: train, config, experiments, export, index, search, serve, embed, eval, probe,
predict, shards.

Bad input (a `TipslabError`) prints one line and exits 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from tipslab.errors import TipslabError


def _cmd_train(args) -> int:
    from tipslab.platform.config import load_config
    from tipslab.platform.summary import print_train_summary
    from tipslab.platform.train import train

    cfg = load_config(args.experiment, args.overrides)
    result = train(cfg)
    print_train_summary(result)
    return 0


def _cmd_probe(args) -> int:
    from tipslab.platform.config import load_config
    from tipslab.platform.probe_train import train_probe

    cfg = load_config(args.experiment, args.overrides, defaults="defaults_probe")
    result = train_probe(cfg)
    print(f"probe {cfg.experiment}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    print(f"  run dir: {result.run_dir}" + (f"  (MLflow run {result.run_id})" if result.run_id else ""))
    if (result.run_dir / "decoder.npz").exists():
        print(f"  decoder: {result.run_dir / 'decoder.npz'} (tipslab predict MODEL --decoder ...)")
    return 0


def _cmd_config(args) -> int:
    from omegaconf import OmegaConf

    from tipslab.platform.config import load_config

    print(OmegaConf.to_yaml(load_config(args.experiment, args.overrides)), end="")
    return 0


def _cmd_experiments(args) -> int:
    from tipslab.platform.config import available_experiments, experiments_dir

    print(f"experiments in {experiments_dir()}:")
    for name in available_experiments():
        print(f"  {name}")
    print("dense probes (tipslab probe):")
    for name in available_experiments("defaults_probe"):
        print(f"  {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tipslab", description="Train, track, index and search patch-aligned image-text encoders."
    )
    from tipslab import __version__

    parser.add_argument("--version", action="version", version=f"tipslab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="pretrain an experiment (experiments/<EXP>.yaml)")
    train.add_argument("experiment", help="experiment name (e.g. tipsv2_tiny) or a .yaml path")
    train.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. trainer.max_steps=200)")
    train.set_defaults(func=_cmd_train)

    config = sub.add_parser("config", help="print an experiment's resolved config")
    config.add_argument("experiment", help="experiment name (e.g. tipsv2_tiny) or a .yaml path")
    config.add_argument("overrides", nargs="*", help="config overrides, key=value")
    config.set_defaults(func=_cmd_config)

    probe = sub.add_parser("probe", help="train a dense probe / DPT head on a frozen encoder (experiments/probe_*.yaml)")
    probe.add_argument("experiment", help="probe experiment (e.g. probe_seg_scenes) or a .yaml path")
    probe.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. encoder.path=runs/x/model)")
    probe.set_defaults(func=_cmd_probe)

    experiments = sub.add_parser("experiments", help="list the experiments")
    experiments.set_defaults(func=_cmd_experiments)

    from tipslab.datamodules import shard_cli
    from tipslab.platform import embed, eval_cli, export, predict
    from tipslab.retrieval import cli as retrieval_cli
    from tipslab.retrieval import serve_cli

    retrieval_cli.add_index_parser(sub)
    retrieval_cli.add_search_parser(sub)
    serve_cli.add_serve_parser(sub)
    embed.add_parser(sub)
    export.add_parser(sub)
    eval_cli.add_parser(sub)
    predict.add_parser(sub)
    shard_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TipslabError as err:
        print(f"tipslab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
