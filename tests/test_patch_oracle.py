"""The per-patch oracle (modules/patch_oracle.py) against hand-computed cases.

One row of two 2-px patches on a 2 x 4 image: bilinear upsampling with align_corners=False puts
the patch means at pixel centres 0.5 and 2.5, so the four columns read a, (3a + b) / 4,
(a + 3b) / 4 and b.
"""

import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.modules.dense_metrics import IGNORE_INDEX, DepthMeter
from tipslab.modules.patch_oracle import patch_oracle


def test_depth_oracle_averages_each_patch_and_upsamples_between_patch_centres():
    target = torch.tensor([[[1.0, 1.0, 3.0, 3.0], [1.0, 1.0, 3.0, 3.0]]])
    expected = torch.tensor([1.0, 1.5, 2.5, 3.0]).expand(1, 2, 4)
    assert torch.allclose(patch_oracle("depth", target, (1, 2)).float(), expected)


def test_depth_oracle_leaves_missing_pixels_out_of_the_patch_means():
    target = torch.tensor([[[1.0, 0.0, 3.0, 3.0], [1.0, 1.0, 3.0, 0.0]]])  # 0 = no ground truth (NYU)
    expected = torch.tensor([1.0, 1.5, 2.5, 3.0]).expand(1, 2, 4)
    assert torch.allclose(patch_oracle("depth", target, (1, 2)).float(), expected)


def test_seg_oracle_takes_the_argmax_of_the_upsampled_class_shares_without_ignored_pixels():
    # left patch: class 1 x3, class 2 x1 -> shares (.75, .25); right patch: class 2 (the ignored pixel
    # takes no share). Column 1 mixes them 3:1 -> class 1 (.5625 vs .4375), column 2 1:3 -> class 2.
    target = torch.tensor([[[1, 1, 2, 2], [2, 1, IGNORE_INDEX, 2]]])
    expected = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2]]])
    assert torch.equal(patch_oracle("seg", target, (1, 2), num_classes=3), expected)


def test_a_finer_grid_scores_better_and_the_oracle_is_exact_on_constant_patches():
    torch.manual_seed(0)
    depth = torch.rand(2, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)[:, 0] + 1  # [2, 16, 16]
    scores = {}
    for grid in ((2, 2), (4, 4), (16, 16)):
        meter = DepthMeter()
        meter.update(patch_oracle("depth", depth, grid), depth)
        scores[grid] = meter.compute()["rmse"]
    assert scores[(16, 16)] == pytest.approx(0.0, abs=1e-6)
    assert scores[(2, 2)] > scores[(4, 4)] > 0


def test_normals_oracle_keeps_the_mean_direction_and_unknown_tasks_fail():
    normals = torch.zeros(1, 3, 2, 4)
    normals[:, 2] = 1.0
    assert torch.allclose(patch_oracle("normals", normals, (1, 2)).float(), normals)
    with pytest.raises(TipslabError, match="expected seg, depth or normals"):
        patch_oracle("edges", normals, (1, 2))
    with pytest.raises(TipslabError, match="num_classes"):
        patch_oracle("seg", torch.zeros(1, 2, 4, dtype=torch.long), (1, 2))
