"""The patch-resolution ceiling of a dense probe: how well a prediction made per patch can score.

A linear probe predicts one value per patch token and upsamples bilinearly; however good the
encoder, its map cannot be sharper than the patch grid. `patch_oracle` builds the prediction of
an encoder that knows each patch's ground truth exactly and nothing finer: the target averaged
over each patch (class shares for segmentation, metres for depth, the mean direction for
normals), upsampled the way the probes upsample. Scoring it with the same meter as the probe
gives the ceiling next to the probe's score, so "the untrained tower is 0.08 m from the best a
patch can do" can be read off a run (on the scenes at 112 px a scene object is two or three
patches wide and the grid, not the encoder, sets most of the depth error: docs/RECIPE.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tipslab.errors import TipslabError
from tipslab.modules.dense_metrics import IGNORE_INDEX


def _pool_and_upsample(values: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`values` [B, C, H, W] averaged over each cell of `grid`, counting only pixels with weight 1,
    then upsampled bilinearly (align_corners=False, as the probes) back to [H, W]."""
    size = values.shape[-2:]
    total = F.adaptive_avg_pool2d(values * weight, grid)
    count = F.adaptive_avg_pool2d(weight, grid)
    mean = torch.where(count > 0, total / count.clamp(min=1e-12), torch.zeros_like(total))
    return F.interpolate(mean, size=tuple(size), mode="bilinear", align_corners=False)


def patch_oracle(task: str, target: torch.Tensor, grid: tuple[int, int], num_classes: int | None = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The per-patch oracle's prediction, in the form the task's meter reads.

    - "seg": `target` [B, H, W] integer labels -> [B, H, W] labels (argmax of the upsampled class
      shares; `ignore_index` pixels take no part in any share);
    - "depth": [B, H, W] metres (0 = missing) -> [B, H, W] metres (missing pixels left out of means);
    - "normals": [B, 3, H, W] -> [B, 3, H, W] (the mean vector; the meter normalises it).
    """
    grid = (int(grid[0]), int(grid[1]))
    if task == "seg":
        if num_classes is None:
            raise TipslabError("patch_oracle: segmentation needs num_classes")
        valid = target != ignore_index
        onehot = F.one_hot(torch.where(valid, target, 0).long(), int(num_classes)).permute(0, 3, 1, 2).double()
        shares = _pool_and_upsample(onehot, valid[:, None].double(), grid)
        return shares.argmax(1)
    if task == "depth":
        depth = target.double()[:, None]
        return _pool_and_upsample(depth, (depth > 0).double(), grid)[:, 0]
    if task == "normals":
        normals = target.double()
        return _pool_and_upsample(normals, torch.ones_like(normals[:, :1]), grid)
    raise TipslabError(f"patch_oracle: task {task!r}; expected seg, depth or normals")
