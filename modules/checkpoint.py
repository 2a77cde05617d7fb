"""The tipslab checkpoint: a directory with `model.safetensors` (weights) and `model.yaml` (the
`model:` config block that rebuilds the encoder). No pickle anywhere, so a checkpoint from
anyone is safe to open; written atomically so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from tipslab.errors import TipslabError

WEIGHTS = "model.safetensors"
CONFIG = "model.yaml"


def _plain_config(model_cfg) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(model_cfg, DictConfig):
        return OmegaConf.to_container(model_cfg, resolve=True)
    return OmegaConf.to_container(OmegaConf.create(dict(model_cfg)), resolve=True)


def replace_dir_atomically(tmp: Path, target: Path) -> None:
    """Move a finished `tmp` directory to `target`, replacing what was there.

    A directory cannot be os.replace'd over a non-empty one, so the old one is first renamed
    aside; readers see either the old or the new checkpoint, never a mix.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(encoder, model_cfg, directory) -> Path:
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "kind": "tipslab-encoder"})
        config = _plain_config(model_cfg)
        vision = getattr(encoder, "vision", None)
        recorded = config.get("vision")
        if isinstance(recorded, dict) and hasattr(vision, "pos_grid"):
            # A resolution stage switch moved the tower (224 -> 448, grid 16 -> 32): record where it is now.
            size = int(recorded.get("img_size", vision.img_size))
            if (size, int(recorded.get("pos_grid") or size // vision.patch_size)) != (vision.img_size, vision.pos_grid):
                recorded.update(img_size=int(vision.img_size), pos_grid=int(vision.pos_grid))
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        replace_dir_atomically(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_checkpoint_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def describe_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
    """'' when keys and shapes agree, else a one-line summary naming a few keys of each kind."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k} {tuple(found[k])} (expected {tuple(expected[k])})"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    )
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def check_state_keys(expected: dict, found: dict, source: str) -> None:
    """Raise naming missing, unexpected and mis-shaped keys (a few of each)."""
    problems = describe_mismatch(
        {k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in found.items()}
    )
    if problems:
        raise TipslabError(f"{source}: weights do not match the model; {problems}")


def load_checkpoint(directory, device: str | torch.device = "cpu"):
    """`(encoder, model_cfg)` from a checkpoint directory written by `save_checkpoint`."""
    from omegaconf import OmegaConf
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from tipslab.modules.encoder import build_encoder

    path = Path(directory)
    if not path.exists():
        raise TipslabError(f"{path}: no such checkpoint directory")
    if not is_checkpoint_dir(path):
        raise TipslabError(f"{path}: not a tipslab checkpoint (expected a directory with {WEIGHTS} and {CONFIG})")
    try:
        model_cfg = OmegaConf.to_container(OmegaConf.load(path / CONFIG), resolve=True)
    except Exception as err:  # yaml errors come in several types
        raise TipslabError(f"{path / CONFIG}: not a readable model config ({err})") from None
    if not isinstance(model_cfg, dict):
        raise TipslabError(f"{path / CONFIG}: expected a mapping with model.vision and model.text")
    # Built on the meta device and handed the file's tensors: no random init to throw away.
    with torch.device("meta"):
        encoder = build_encoder(model_cfg)
    try:
        state = load_file(str(path / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as err:
        raise TipslabError(f"{path / WEIGHTS}: not a readable safetensors file ({err})") from None
    check_state_keys(encoder.state_dict(), state, str(path / WEIGHTS))
    encoder.load_state_dict(state, assign=True)
    return encoder, model_cfg
