"""A convolutional patch embedding for the CPU-sized towers (``model.vision.stem: conv``).

Why: on the scenes a plain ViT's patches learn colour in a few hundred steps and shape only after
about a thousand, even with per-patch shape labels, while a small CNN with the same labels reads
shape by step 300 (bench/bench_shape_learning.py, docs/RECIPE.md). Region search on the scenes
needs shape, and a CPU budget holds a few hundred steps: this stem gives the tower the CNN's
locality where it needs it, before the transformer blocks, as hybrid ViTs do (Xiao et al.,
"Early convolutions help transformers see better"; ViT's R50 hybrid).

Three 3x3 convolutions to stride 4 (two of them strided), an average pool to the 14-px patch
grid (any image size that is a multiple of 14), a 3x3 convolution that mixes neighbouring patches
and a 1x1 projection to the tower's width: about 0.75x the multiply-adds of the tiny tower's
blocks at 112 px. (A stem with five convolutions, the first two at full and half resolution,
learns shape a little faster, 49 against 45 per-patch shape accuracy at step 300, at 4.5x the
tiny tower's cost.) Group norm, not batch norm: the same output in training and evaluation and
for any batch size (one image at search time). Not part of the TIPSv2 architecture: the
official towers keep their 14-px linear patch embedding, and a tower with this stem cannot be
saved in the official layout.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv(inputs: int, outputs: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(8, outputs), nn.GELU()]


class ConvStem(nn.Module):
    """``[B, 3, H, W]`` -> ``[B, embed_dim, H / patch, W / patch]``, in place of a patch projection."""

    def __init__(self, embed_dim: int, patch_size: int = 14, width: int = 128):
        super().__init__()
        self.patch_size = patch_size
        self.features = nn.Sequential(*_conv(3, 32, 2), *_conv(32, 64, 2), *_conv(64, width, 1))
        self.mix = nn.Sequential(*_conv(width, width, 1))
        self.project = nn.Conv2d(width, embed_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        # Stride 4 does not divide 14: the pool's bins (3-4 cells) cover each patch's pixels.
        pooled = F.adaptive_avg_pool2d(self.features(images), grid)
        return self.project(self.mix(pooled))
