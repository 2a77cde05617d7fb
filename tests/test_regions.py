"""Region grouping against hand-made score grids, answers worked out by hand."""

import numpy as np
import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.retrieval.regions import (
    box_iou,
    connected_components,
    find_regions,
    patch_box,
    threshold_mask,
    upsample_scores,
)


def test_threshold_fraction_and_margin():
    grid = np.array([[0.0, 0.5], [0.8, 1.0]])
    # fraction 0.75 of range [0, 1] -> cut 0.75
    assert threshold_mask(grid, fraction=0.75).tolist() == [[False, False], [True, True]]
    # margin wins over fraction: cut = 1.0 - 0.6 = 0.4
    assert threshold_mask(grid, fraction=0.75, margin=0.6).tolist() == [[False, True], [True, True]]
    assert threshold_mask(grid, margin=0.6, min_score=0.6).tolist() == [[False, False], [True, True]]


def test_components_are_four_connected():
    mask = np.array([
        [1, 1, 0, 0],
        [0, 0, 1, 0],  # diagonal to the first blob: a separate component with 4-connectivity
        [0, 0, 1, 1],
        [1, 0, 0, 0],
    ], dtype=bool)
    labels, count = connected_components(mask)
    assert count == 3
    assert labels.tolist() == [[1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 2, 2], [3, 0, 0, 0]]


def test_patch_box_maps_grid_to_original_pixels():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 2] = mask[2, 2] = mask[2, 3] = True
    # 400 x 200 image, 4x4 grid: cells are 100 px wide, 50 px tall
    assert patch_box(mask, (400, 200)) == (200, 50, 400, 150)
    # non-integer cell sizes round outward: 10 px / 3 cells
    one = np.zeros((3, 3), dtype=bool)
    one[1, 1] = True
    assert patch_box(one, (10, 10)) == (3, 3, 7, 7)


def test_find_regions_two_blobs_ranked_by_score():
    grid = torch.tensor([
        [0.9, 0.85, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.95],
        [0.0, 0.0, 0.8, 0.9],
    ])
    regions = find_regions(grid, (80, 40), fraction=0.75)
    assert [r.num_patches for r in regions] == [3, 2]
    first, second = regions
    assert first.score == pytest.approx(0.95) and first.peak == (2, 3)
    assert first.box == (40, 20, 80, 40)  # cols 2-3, rows 2-3 of a 20x10 px cell grid
    assert second.box == (0, 0, 40, 10)
    assert second.mask.sum() == 2 and second.mask[0, 0] and second.mask[0, 1]
    mean = find_regions(grid, (80, 40), fraction=0.75, reduce="mean")
    assert mean[0].score == pytest.approx((0.95 + 0.8 + 0.9) / 3)
    assert mean[1].score == pytest.approx(0.875)


def test_min_patches_drops_specks_but_keeps_the_best_region():
    grid = np.zeros((3, 3))
    grid[0, 0] = 1.0
    grid[2, 1:] = 0.9
    regions = find_regions(grid, (30, 30), fraction=0.8, min_patches=2)
    assert len(regions) == 1 and regions[0].num_patches == 2
    only_speck = np.zeros((3, 3))
    only_speck[1, 1] = 1.0
    regions = find_regions(only_speck, (30, 30), min_patches=4)
    assert len(regions) == 1 and regions[0].box == (10, 10, 20, 20)


def test_bad_input_is_a_clear_error():
    with pytest.raises(TipslabError, match="grid_h, grid_w"):
        find_regions(np.zeros(5), (10, 10))
    with pytest.raises(TipslabError, match="NaN"):
        find_regions(np.full((2, 2), np.nan), (10, 10))
    with pytest.raises(TipslabError, match="reduce"):
        find_regions(np.zeros((2, 2)), (10, 10), reduce="median")


def test_upsample_scores_is_bilinear_with_cell_centres():
    # Hand-computed: centres of a 2x finer row sit at -0.25, 0.25, 0.75, 1.25 patch units (edges clamp).
    row = upsample_scores(np.array([[0.0, 1.0]], np.float32), 2)
    assert row.shape == (2, 4)
    np.testing.assert_allclose(row[0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(row[1], row[0])


def _coverage(box, image=80, grid=8):
    """Share of each patch covered by ``box`` (a perfect score map of one object)."""
    cell = image // grid
    edges = np.arange(grid + 1) * cell
    over_x = np.clip(np.minimum(edges[1:], box[2]) - np.maximum(edges[:-1], box[0]), 0, None) / cell
    over_y = np.clip(np.minimum(edges[1:], box[3]) - np.maximum(edges[:-1], box[1]), 0, None) / cell
    return np.outer(over_y, over_x).astype(np.float32)


def test_upsampled_regions_box_a_small_object_that_the_patch_grid_cannot():
    truth = (15, 15, 33, 33)  # 18 px: two patches wide, not aligned with the 10 px patch grid
    scores = _coverage(truth)
    coarse = find_regions(scores, (80, 80), fraction=0.5)[0]
    fine = find_regions(scores, (80, 80), fraction=0.5, upsample=4)[0]
    assert box_iou(coarse.box, truth) < 0.5
    assert box_iou(fine.box, truth) >= 0.5
    # The region's patches, score and peak stay on the patch grid.
    assert fine.mask.shape == scores.shape and fine.peak == (2, 2) and fine.score == float(scores.max())
    assert fine.mask[2, 2] and not fine.mask[5:, :].any()


def test_upsample_must_be_a_positive_integer():
    with pytest.raises(TipslabError, match="upsample"):
        find_regions(np.zeros((2, 2)), (10, 10), upsample=0)
