"""Resolution stages (``data.resolution_stages``): the image size switches at given training steps.

TIPSv2 pretrains at 224 px and continues at 448 (the paper's second stage). A stage list such as
``[{step: 9000, image_size: 448}]`` makes every batch from step 9000 on at 448 px: the global
crops' size changes, local crops and everything else stay. A batch's stage is a function of its
number on the rank (batches consumed = optimizer steps with ``accumulate_grad_batches: 1``), so
batches stay a function of the seed and a resumed run lands in the right stage. The encoder takes
any multiple of 14 (timm's dynamic image size interpolates the position table).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from tipslab.datamodules.transforms import check_image_size
from tipslab.errors import TipslabError


def parse_stages(stages: Sequence, base_size: int) -> list[tuple[int, int]]:
    """``[(first step, image size), ...]`` starting with ``(0, base_size)``, from the config list."""
    out = [(0, int(base_size))]
    for index, stage in enumerate(stages or []):
        what = f"data.resolution_stages[{index}]"
        if not hasattr(stage, "get") or set(stage) - {"step", "image_size"} or "step" not in stage:
            raise TipslabError(f"{what}={stage!r}; expected {{step: N, image_size: S}}")
        step = int(stage["step"])
        if step <= out[-1][0]:
            raise TipslabError(f"{what}.step={step}; expected steps after 0, increasing")
        out.append((step, check_image_size(stage.get("image_size", out[-1][1]), f"{what}.image_size")))
    return out


class ResolutionStages:
    """``for_batch(n)`` gives the sample processor of batch ``n``; one processor per stage."""

    def __init__(self, stages: list[tuple[int, int]], make_processor: Callable[[int], object]):
        self.starts = [step for step, _ in stages]
        self.sizes = [size for _, size in stages]
        self.processors = [make_processor(size) for size in self.sizes]

    def image_size_at(self, step: int) -> int:
        return self.sizes[bisect.bisect_right(self.starts, int(step)) - 1]

    def for_batch(self, batch: int):
        return self.processors[bisect.bisect_right(self.starts, int(batch)) - 1]

    def decode_scale(self, width: int, height: int) -> float:
        """`SampleProcessor.decode_scale` of the largest stage: images decode before their batch's stage is known."""
        return max(p.decode_scale(width, height) for p in self.processors)
