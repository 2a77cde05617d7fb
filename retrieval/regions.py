"""Group one image's patch scores into regions: connected patches above a threshold, with a box.

Pure functions over a ``[grid_h, grid_w]`` score map (numpy or torch). A region is a 4-connected
set of patches whose score clears a threshold set relative to the image's own scores; its box is
the patch cells it covers mapped back to the original image's pixel coordinates (the encoder saw
the image resized to a square, so patch cell ``(r, c)`` covers the same fraction of the original
image in each axis).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from tipslab.errors import TipslabError


@dataclass(frozen=True)
class Region:
    """A connected group of patches in one image."""

    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in original-image pixels, x1/y1 exclusive
    mask: np.ndarray  # bool [grid_h, grid_w]: the member patches
    score: float  # region score (the max or mean of member patch scores, see `reduce`)
    peak: tuple[int, int]  # (row, col) of the best member patch
    num_patches: int


def _as_grid(scores) -> np.ndarray:
    arr = scores.detach().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores)
    if arr.ndim != 2 or arr.size == 0:
        raise TipslabError(f"patch scores: expected a non-empty [grid_h, grid_w] map, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise TipslabError("patch scores: the map holds NaN or infinite values")
    return arr


def threshold_mask(scores, fraction: float | None = 0.75, margin: float | None = None,
                   min_score: float | None = None) -> np.ndarray:
    """Patches that count as "on" for the region search.

    The threshold is relative to the image's own scores, because raw cosine similarities between
    text and patches sit in a narrow model-dependent band; an absolute cut would not transfer
    between models.

    - ``margin``: keep patches with ``score >= max - margin`` (takes precedence when given);
    - ``fraction``: keep patches with ``score >= min + fraction * (max - min)``;
    - ``min_score``: additionally drop patches below this absolute score.
    The best patch is always on (unless ``min_score`` removes it), so every image yields a region.
    """
    grid = _as_grid(scores)
    top, low = float(grid.max()), float(grid.min())
    if margin is not None:
        if margin < 0:
            raise TipslabError(f"region margin: expected >= 0, got {margin}")
        cut = top - margin
    elif fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise TipslabError(f"region fraction: expected a value in [0, 1], got {fraction}")
        cut = low + fraction * (top - low)
    else:
        raise TipslabError("region threshold: give `fraction` or `margin`")
    mask = grid >= cut
    if min_score is not None:
        mask &= grid >= min_score
    return mask


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-neighbour components of a bool grid: (labels int32 [h, w] with 0 = off, count).

    Labels are numbered in row-major order of each component's first patch. Patch grids are
    small (at most a few thousand cells), so a breadth-first search is quick enough and needs no
    extra dependency.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise TipslabError(f"region mask: expected a [grid_h, grid_w] bool map, got shape {mask.shape}")
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    count = 0
    for r0 in range(h):
        for c0 in range(w):
            if not mask[r0, c0] or labels[r0, c0]:
                continue
            count += 1
            labels[r0, c0] = count
            queue = deque([(r0, c0)])
            while queue:
                r, c = queue.popleft()
                for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not labels[rr, cc]:
                        labels[rr, cc] = count
                        queue.append((rr, cc))
    return labels, count


def patch_box(mask: np.ndarray, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) covering the on-patches of ``mask``.

    ``image_size`` is the original image's ``(width, height)``; the grid spans it fully, so patch
    column ``c`` of ``grid_w`` covers ``x`` in ``[c * W / grid_w, (c + 1) * W / grid_w)``. Edges are
    rounded outward so the box never cuts into a member patch.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise TipslabError("region mask: it has no patches, so it has no box")
    width, height = image_size
    if width <= 0 or height <= 0:
        raise TipslabError(f"image size: expected positive (width, height), got {image_size}")
    gh, gw = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0 = int(np.floor(cols[0] * width / gw))
    x1 = int(np.ceil((cols[-1] + 1) * width / gw))
    y0 = int(np.floor(rows[0] * height / gh))
    y1 = int(np.ceil((rows[-1] + 1) * height / gh))
    return x0, y0, min(x1, width), min(y1, height)


# Regions: the score map upsampled 4x (boxes can end inside a patch), patches within the top half of
# each image's score range. With perfect score maps of the scenes this finds the object's box (IoU
# >= 0.5) for 98% of queries, against 54% for the patch grid at 0.75 (docs/RECIPE.md).
REGION_UPSAMPLE = 4
REGION_FRACTION = 0.5


def _linear_weights(n: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centres = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
    low = np.floor(centres).astype(int)
    return low, np.minimum(low + 1, n - 1), (centres - low).astype(np.float32)


def upsample_scores(grid: np.ndarray, factor: int) -> np.ndarray:
    """The score map bilinearly resampled ``factor`` times finer, each patch score at its cell's
    centre (torch's ``interpolate(..., "bilinear", align_corners=False)``; numpy here so that
    region grouping needs no torch)."""
    if factor == 1:
        return grid
    lo, hi, w = _linear_weights(grid.shape[0], factor)
    rows = grid[lo] * (1 - w)[:, None] + grid[hi] * w[:, None]
    lo, hi, w = _linear_weights(grid.shape[1], factor)
    return (rows[:, lo] * (1 - w) + rows[:, hi] * w).astype(np.float32)


def find_regions(scores, image_size: tuple[int, int], *, fraction: float | None = 0.75,
                 margin: float | None = None, min_score: float | None = None,
                 reduce: str = "max", min_patches: int = 1, max_regions: int | None = None,
                 upsample: int = 1) -> list[Region]:
    """Regions of one image's ``[grid_h, grid_w]`` patch scores, best first.

    ``reduce`` = "max" scores a region by its best patch (what FAISS found), "mean" by the
    average of its patches (favours compact, uniformly strong regions). Regions smaller than
    ``min_patches`` are dropped, unless that would drop every region (the best patch always
    yields one).

    ``upsample`` > 1 thresholds and groups the bilinearly upsampled map, so a box can end inside a
    patch: on the patch grid an object two patches wide rounds out to every patch it touches and
    rarely reaches IoU 0.5 with its true box (docs/RECIPE.md measures it). A region's ``mask``,
    ``score`` and ``peak`` stay on the patch grid (the patches any of its cells fall in).
    """
    if reduce not in ("max", "mean"):
        raise TipslabError(f"region reduce: expected 'max' or 'mean', got {reduce!r}")
    if int(upsample) != upsample or upsample < 1:
        raise TipslabError(f"region upsample: expected a positive integer, got {upsample!r}")
    upsample = int(upsample)
    grid = _as_grid(scores)
    fine = upsample_scores(grid, upsample)
    labels, count = connected_components(threshold_mask(fine, fraction, margin, min_score))
    regions = []
    for label in range(1, count + 1):
        cells = labels == label
        member = cells.reshape(grid.shape[0], upsample, grid.shape[1], upsample).any(axis=(1, 3))
        values = grid[member]
        flat_peak = int(np.argmax(np.where(member, grid, -np.inf)))
        regions.append(Region(
            box=patch_box(cells, image_size),
            mask=member,
            score=float(values.max() if reduce == "max" else values.mean()),
            peak=(flat_peak // grid.shape[1], flat_peak % grid.shape[1]),
            num_patches=int(member.sum()),
        ))
    # Ties broken by position so the order is deterministic.
    regions.sort(key=lambda reg: (-reg.score, reg.peak))
    big = [reg for reg in regions if reg.num_patches >= min_patches]
    regions = big or regions[:1]
    return regions[:max_regions] if max_regions is not None else regions


def box_iou(a, b) -> float:
    """IoU of (x0, y0, x1, y1) boxes, x1/y1 exclusive."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
