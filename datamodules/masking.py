"""Block masks for masked-image modelling (iBOT / iBOT++), drawn from a per-sample generator.

BEiT's block-wise masking, as iBOT and DINOv2 use it: rectangles of random area and aspect
ratio are added until the target number of patches is masked. Whether a view is masked at all
(``probability``, DINOv2: half the images) and its ratio (uniform in ``ratio``, DINOv2:
0.1-0.5) are drawn from the same generator as the sample's crops and captions, so a seed fixes
the masks and a resumed run sees the same ones (see streams.py).

Written here rather than taken from a library: DINOv2's `MaskingGenerator` draws from Python's
global `random`, which would break the per-sample seeding that makes resume exact.
"""

from __future__ import annotations

import math

import numpy as np

from tipslab.errors import TipslabError


class BlockMasker:
    """``masker(grid, rng) -> bool [h*w]`` (row-major, True = masked) for one view."""

    def __init__(self, probability: float = 0.5, ratio=(0.1, 0.5), min_block: int = 4,
                 aspect=(0.3, 1 / 0.3)):
        if not 0.0 <= float(probability) <= 1.0:
            raise TipslabError(f"data.masking.probability={probability}; expected a number in [0, 1]")
        low, high = (float(r) for r in ratio)
        if not 0.0 <= low <= high < 1.0:
            raise TipslabError(f"data.masking.ratio={list(ratio)}; expected 0 <= min <= max < 1")
        if int(min_block) < 1:
            raise TipslabError(f"data.masking.min_block={min_block}; expected a positive number of patches")
        self.probability, self.ratio, self.min_block = float(probability), (low, high), int(min_block)
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def __call__(self, grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        h, w = grid
        mask = np.zeros((h, w), dtype=bool)
        # Both draws always happen, masked or not, so later draws of the sample do not shift.
        masked = rng.random() < self.probability
        ratio = rng.uniform(*self.ratio)
        if masked:
            self._fill(mask, int(round(ratio * h * w)), rng)
        return mask.reshape(-1)

    def _fill(self, mask: np.ndarray, target: int, rng: np.random.Generator) -> None:
        h, w = mask.shape
        failures = 0
        while mask.sum() < target and failures < 10:
            missing = target - int(mask.sum())
            area = rng.uniform(min(self.min_block, missing), max(missing, self.min_block))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if not (1 <= bh <= h and 1 <= bw <= w):
                failures += 1
                continue
            top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            block = mask[top:top + bh, left:left + bw]
            new = int((~block).sum())
            if 0 < new <= missing:
                block[...] = True
                failures = 0
            else:
                failures += 1
        # Blocks can overshoot a small remainder: top up with single patches so the ratio holds.
        missing = target - int(mask.sum())
        if missing > 0:
            free = np.flatnonzero(~mask.reshape(-1))
            mask.reshape(-1)[rng.choice(free, size=min(missing, len(free)), replace=False)] = True
