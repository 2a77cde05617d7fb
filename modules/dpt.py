"""DPT decoders: dense heads (segmentation, depth, surface normals) over four ViT blocks.

The architecture of the official TIPSv2 decoders (google-deepmind/tips `pytorch/decoders.py`,
itself a port of Scenic's DPT), written for tipslab:

1. reassemble: per block, each patch token is concatenated with the block's CLS token and
   projected back to D (Linear 2D -> D, tanh-GELU: the "project" readout), a 1x1 conv maps it
   to (D/8, D/4, D/2, D) channels and the four maps are brought to 4x, 2x, 1x and 1/2x of the
   patch grid (transposed convs 4x4/4 and 2x2/2, identity, 3x3 conv stride 2);
2. a 3x3 conv (no bias) takes each to `channels` (256);
3. four fusion blocks, deepest first: the running map plus a pre-activation residual unit of
   the next shallower map (bilinearly resized to the running map when odd grids make them
   differ), one more residual unit, 2x bilinear upsampling (align_corners=True), a 1x1 conv;
4. a 3x3 projection conv, then a Linear task head over channels, then bilinear upsampling
   (align_corners=False) to the image size.

Depth is classification over `num_bins` uniform bins in [min_depth, max_depth]: the head's
outputs go through ReLU + min_depth, are normalised to sum to 1 over bins, and the depth is the
expected bin centre (computed at the head's resolution, then upsampled). Normals are the head's
3 raw channels (`normals_to_unit` normalises them, as the official notebook does).

Module names follow the official PyTorch state-dict names (`dpt.reassemble.*`, `dpt.convs.*`,
`dpt.fusion_blocks.*`, `dpt.project`, `head`) so the official files map onto them one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tipslab.errors import TipslabError

TASKS: tuple[str, ...] = ("seg", "depth", "normals")
DEFAULT_DEPTH_RANGE = (0.001, 10.0)  # metres, the official depth decoder's bins
DEFAULT_DEPTH_BINS = 256


def post_process_channels(embed_dim: int) -> tuple[int, int, int, int]:
    """Channels of the four reassembled maps, as the official notebook sets them."""
    return (embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim)


class ResidualUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(conv(relu(x)))), 3x3 convs without bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """Adds a (residual-unit-refined) skip map, refines, upsamples 2x, mixes channels (1x1)."""

    def __init__(self, channels: int, with_skip: bool):
        super().__init__()
        self.with_skip = with_skip
        if with_skip:
            self.residual_unit = ResidualUnit(channels)
        self.main_unit = ResidualUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.with_skip:
            if skip.shape[-2:] != x.shape[-2:]:
                # Odd patch grids: the stride-2 branch rounds up, so the maps differ by one cell.
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.residual_unit(skip)
        x = self.main_unit(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Reassemble(nn.Module):
    """Four (CLS, patch map) pairs -> maps at 4x, 2x, 1x and 1/2x of the patch grid."""

    def __init__(self, embed_dim: int, out_channels: Sequence[int]):
        super().__init__()
        c = list(out_channels)
        self.readout_projects = nn.ModuleList(nn.Linear(2 * embed_dim, embed_dim) for _ in c)
        self.out_projections = nn.ModuleList(nn.Conv2d(embed_dim, ch, 1) for ch in c)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c[3], c[3], 3, stride=2, padding=1),
        ])

    def forward(self, features: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        maps = []
        for i, (cls, patch_map) in enumerate(features):
            b, d, h, w = patch_map.shape
            tokens = patch_map.flatten(2).transpose(1, 2)  # [B, N, D]
            joined = torch.cat([tokens, cls[:, None, :].expand(-1, tokens.shape[1], -1)], dim=-1)
            # tanh GELU: the decoders were trained in JAX, whose gelu defaults to the tanh form.
            tokens = F.gelu(self.readout_projects[i](joined), approximate="tanh")
            x = tokens.transpose(1, 2).reshape(b, d, h, w)
            maps.append(self.resize_layers[i](self.out_projections[i](x)))
        return maps


class DPT(nn.Module):
    """Reassemble + per-scale 3x3 convs + four fusion blocks + projection: `[B, channels, h', w']`."""

    def __init__(self, embed_dim: int, channels: int = 256, out_channels: Sequence[int] | None = None):
        super().__init__()
        out_channels = tuple(out_channels or post_process_channels(embed_dim))
        self.reassemble = Reassemble(embed_dim, out_channels)
        self.convs = nn.ModuleList(nn.Conv2d(ch, channels, 3, padding=1, bias=False) for ch in out_channels)
        self.fusion_blocks = nn.ModuleList(FusionBlock(channels, with_skip=i > 0) for i in range(4))
        self.project = nn.Conv2d(channels, channels, 3, padding=1, bias=True)

    def forward(self, features: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        maps = [conv(x) for conv, x in zip(self.convs, self.reassemble(features))]
        out = self.fusion_blocks[0](maps[3])
        for i in range(1, 4):
            out = self.fusion_blocks[i](out, maps[3 - i])
        return self.project(out)


class DPTDecoder(nn.Module):
    """A DPT decoder for one task. `forward(features, image_size)`:

    - seg: class logits `[B, num_outputs, H, W]`;
    - depth: metres `[B, 1, H, W]` (expected value over `num_outputs` bins);
    - normals: raw 3-vectors `[B, 3, H, W]` (see `normals_to_unit`).

    `features` are four `(cls [B, D], patch map [B, D, h, w])` pairs (`vision.dpt_inputs`);
    `image_size=None` keeps the head's resolution (8x the patch grid for even grids).
    """

    def __init__(self, task: str, embed_dim: int, num_outputs: int | None = None, channels: int = 256,
                 out_channels: Sequence[int] | None = None, depth_range: tuple[float, float] = DEFAULT_DEPTH_RANGE):
        super().__init__()
        if task not in TASKS:
            raise TipslabError(f"unknown dense task {task!r}; expected one of {', '.join(TASKS)}")
        defaults = {"seg": 150, "depth": DEFAULT_DEPTH_BINS, "normals": 3}
        num_outputs = int(num_outputs or defaults[task])
        if task == "normals" and num_outputs != 3:
            raise TipslabError(f"a normals decoder has 3 outputs, got {num_outputs}")
        self.task = task
        self.embed_dim = int(embed_dim)
        self.channels = int(channels)
        self.num_outputs = num_outputs
        self.out_channels = tuple(out_channels or post_process_channels(embed_dim))
        self.depth_range = (float(depth_range[0]), float(depth_range[1]))
        self.dpt = DPT(embed_dim, channels, self.out_channels)
        self.head = nn.Linear(channels, num_outputs)
        if task == "depth":
            # Not a parameter and not in the files: the bins follow from the range.
            self.register_buffer("bin_centers", torch.linspace(*self.depth_range, num_outputs), persistent=False)

    def head_outputs(self, features) -> torch.Tensor:
        """The task head's raw outputs at the decoder's resolution: `[B, num_outputs, h', w']`."""
        x = self.dpt(features)
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, features, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.head_outputs(features)
        if self.task == "depth":
            x = bins_to_depth(x, self.bin_centers, self.depth_range[0])
        if image_size is not None:
            x = F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False)
        return x


def bins_to_depth(logits: torch.Tensor, centers: torch.Tensor, min_depth: float) -> torch.Tensor:
    """`[B, bins, h, w]` scores -> `[B, 1, h, w]` depth: ReLU + min_depth, normalise, expected centre.

    The "linear" bin normalisation of the official depth decoder (and of DINOv2's depth heads),
    not a softmax: a bin with a score at or below zero gets (almost) no weight."""
    weights = torch.relu(logits) + min_depth
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("bchw,c->bhw", weights, centers.to(weights.dtype))[:, None]


def normals_to_unit(normals: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Raw normal outputs -> unit vectors, upsampled bicubically and renormalised (official notebook)."""
    normals = F.normalize(normals, dim=1)
    if image_size is not None and tuple(normals.shape[-2:]) != tuple(image_size):
        normals = F.normalize(F.interpolate(normals, size=tuple(image_size), mode="bicubic", align_corners=False), dim=1)
    return normals
