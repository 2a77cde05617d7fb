"""`tipslab export`: a Lightning training checkpoint (one file, or an FSDP2 directory of per-rank
shards) or a run folder's newest readable one, to a single consolidated tipslab checkpoint
(model.safetensors + model.yaml) that `tipslab index/search/eval` and `tipslab.load_model` read.

Training exports its model at the end by itself; this is for the checkpoints in between, and for
a run killed before its end. The model's shape comes from the run's `config.yaml`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tipslab.errors import TipslabError


def _load_lightning_state(checkpoint: Path) -> dict:
    import torch

    if checkpoint.is_dir():  # DCP shards: torch's own converter gathers them into one state
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory(prefix="tipslab-export-") as tmp:
            dcp_to_torch_save(str(checkpoint), str(Path(tmp) / "full.pt"))
            return torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)["state_dict"]
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def export_checkpoint(source: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write the encoder of `source` (a checkpoint or a run folder) to `out`; returns (checkpoint used, out)."""
    from omegaconf import OmegaConf

    from tipslab.modules.checkpoint import save_checkpoint
    from tipslab.modules.encoder import build_encoder
    from tipslab.platform.resolution_switch import saved_grid
    from tipslab.platform.runs import checkpoint_problem, newest_readable_checkpoint

    source = Path(source).expanduser()
    if (source / "checkpoints").is_dir():
        checkpoint, _ = newest_readable_checkpoint(source / "checkpoints")
        if checkpoint is None:
            raise TipslabError(f"run {source} has no readable checkpoint to export")
    else:
        checkpoint = source
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise TipslabError(f"cannot export {checkpoint}: {problem}")
    config = checkpoint.parent.parent / "config.yaml"
    if not config.is_file():
        raise TipslabError(f"cannot export {checkpoint}: no run config at {config} (the model's shape)")
    model_cfg = OmegaConf.load(config).model
    state = _load_lightning_state(checkpoint)
    encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    encoder = build_encoder(model_cfg)
    grid = saved_grid(encoder_state)  # a run past a resolution stage switch saved the table at its new grid
    if grid is not None:
        encoder.vision.set_pos_grid(grid)
    missing, unexpected = encoder.load_state_dict(encoder_state, strict=False)
    if missing or unexpected:
        raise TipslabError(f"{checkpoint} does not hold the encoder of {config}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return checkpoint, save_checkpoint(encoder, OmegaConf.to_container(model_cfg, resolve=True), out)


def _cmd_export(args) -> int:
    checkpoint, out = export_checkpoint(args.source, args.out)
    print(f"exported {checkpoint} -> {out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="a training checkpoint (or a run's newest) to a tipslab model dir",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder (runs/<exp>/<run>) or one of its checkpoints/*.ckpt")
    parser.add_argument("--out", required=True, help="the tipslab checkpoint directory to write")
    parser.set_defaults(func=_cmd_export)
    return parser
