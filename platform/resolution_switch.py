"""Position tables follow the resolution stages: resized once when the global crops change size.

With ``data.resolution_stages`` (TIPSv2: 224 px, then 448) the data module makes bigger global
crops from a step on (datamodules/resolution_stages.py). The tower could interpolate its stored
16 x 16 position table to 32 x 32 in every forward; instead, at the first batch of the new size,
`follow_resolution_stage` resizes the stored table once (`VisionTower.set_pos_grid`, the same
map the forward used) and trains it at the new grid from then on, as the paper's second stage.

The optimizer choice: the switch happens mid-run, after the optimizer exists, so the Parameter
object is kept (its data replaced) and AdamW's state of that one parameter is resized with it
(`set_pos_grid`). A checkpoint written after the switch holds the new grid: `match_checkpoint`
(from the LightningModule's ``on_load_checkpoint``, which Lightning calls before loading the
weights and before building the optimizer) resizes the fresh model's table to the saved grid
first, so a resume is exact. In a multi-process run the table is not replaced: DDP's gradient
buckets are sized at wrap time and under FSDP2 the table is a sharded DTensor that FSDP owns.
There the stored table stays at the first grid and the forward keeps interpolating every step
(correct, slower; a warning says so).
"""

from __future__ import annotations

import math
import warnings

import torch

from tipslab.modules.vision import PATCH_SIZE

POS_EMBED = "vision.vit.pos_embed"  # the end of the table's name in every state dict that holds a tower


def _towers(system) -> list:
    towers = [system.encoder.vision]
    teacher = getattr(system, "teacher_vision", None)  # full EMA: the teacher must keep the student's shapes
    if teacher is not None:
        towers.append(teacher)
    return towers


def _sharded(tower) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tower.vit.pos_embed, DTensor)


def _several_processes() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def stages_configured(cfg) -> bool:
    data = cfg.get("data") if hasattr(cfg, "get") else None
    return bool(data is not None and data.get("resolution_stages"))


def follow_resolution_stage(system, images: torch.Tensor, optimizers=()) -> bool:
    """Resize the towers' stored tables to the grid of ``images`` (a batch's first global crops)
    when it differs and resolution stages are configured; returns whether it did."""
    if not stages_configured(system.cfg) or images.shape[-1] != images.shape[-2]:
        return False
    grid = int(images.shape[-1]) // PATCH_SIZE
    towers = [t for t in _towers(system) if t.pos_grid != grid]
    if not towers:
        return False
    if _several_processes() or any(_sharded(t) for t in towers):
        if not getattr(system, "_warned_fixed_table", False):
            warnings.warn(f"resolution stage: images now {images.shape[-1]} px in a multi-process run (DDP / FSDP2); "
                          f"the position table stays at {towers[0].pos_grid}x{towers[0].pos_grid} and is "
                          "interpolated every step", stacklevel=2)
            system._warned_fixed_table = True
        return False
    for tower in towers:
        tower.set_pos_grid(grid, optimizers if tower is system.encoder.vision else ())
    return True


def saved_grid(state: dict, prefix: str = "") -> int | None:
    """The square grid of the position table ``prefix + ...vision.vit.pos_embed`` in a state dict."""
    for key, value in state.items():
        if key.startswith(prefix) and key.endswith(POS_EMBED) and hasattr(value, "shape") and len(value.shape) == 3:
            side = math.isqrt(int(value.shape[1]))
            return side if side * side == int(value.shape[1]) else None
    return None


def match_checkpoint(system, checkpoint: dict) -> None:
    """Before Lightning loads ``checkpoint``: give the towers the grid its tables were saved at."""
    grid = saved_grid(checkpoint.get("state_dict") or {}, "encoder.")
    if grid is None:
        return  # FSDP2's distributed checkpoints carry no full state dict here (and never switch)
    for tower in _towers(system):
        if not _sharded(tower):
            tower.set_pos_grid(grid)
