"""Trainable heads on a frozen vision tower: linear probes and DPT heads, and their losses.

The linear probes follow DINOv2's (which TIPS / TIPSv2 report): BatchNorm then one linear map
per patch token, bilinear upsampling of the outputs to the label size.

- segmentation: the last block's patch tokens -> class logits;
- depth: each patch token concatenated with the CLS token -> `bins` scores over uniform bins
  in [min_depth, max_depth], turned into depth by the same ReLU-normalised expectation as the
  official depth decoder (`dpt.bins_to_depth`), trained with the scale-invariant log loss.

A DPT head (`DPTProbe`) reads four blocks instead of one (and also learns normals, with a
1 - cosine loss); the trained decoder exports to the
official `.npz` layout (`official_decoders.export_decoder`) and `tipslab predict` runs it.

Every head maps `(list of VisionOutput, one per layer it reads, image size)` to the task's
prediction: seg logits `[B, C, H, W]`, depth metres `[B, 1, H, W]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tipslab.errors import TipslabError
from tipslab.modules.dense_metrics import IGNORE_INDEX
from tipslab.modules.dpt import DEFAULT_DEPTH_BINS, DEFAULT_DEPTH_RANGE, DPTDecoder, bins_to_depth
from tipslab.modules.vision import VisionOutput, dpt_inputs

SILOG_LAMBDA = 0.85  # BTS / DINOv2's variance focus: 1 is fully scale-invariant, 0 plain log-L2


class LinearProbe(nn.Module):
    """BatchNorm + Linear over each patch token (with the CLS token appended for depth).

    ``num_layers`` > 1 is DINOv2's "lin. 4": the tokens of that many blocks (`encoder.layers`)
    concatenated per patch, each block's CLS appended for depth; 1 is "lin. 1", the last block.
    """

    def __init__(self, task: str, embed_dim: int, num_outputs: int | None = None,
                 depth_range: tuple[float, float] = DEFAULT_DEPTH_RANGE, num_layers: int = 1):
        super().__init__()
        if task not in ("seg", "depth"):
            raise TipslabError(f"linear probes are for seg or depth, not {task!r}")
        if int(num_layers) < 1:
            raise TipslabError(f"a linear probe reads at least one layer, not {num_layers}")
        self.task = task
        self.with_cls = task == "depth"  # DINOv2's depth probes concatenate the CLS token
        self.num_layers = int(num_layers)
        width = embed_dim * self.num_layers * (2 if self.with_cls else 1)
        self.num_outputs = int(num_outputs or (DEFAULT_DEPTH_BINS if task == "depth" else 0))
        if self.num_outputs < 1:
            raise TipslabError("a segmentation probe needs its number of classes")
        self.depth_range = (float(depth_range[0]), float(depth_range[1]))
        self.norm = nn.BatchNorm1d(width)
        self.linear = nn.Linear(width, self.num_outputs)
        if task == "depth":
            self.register_buffer("bin_centers", torch.linspace(*self.depth_range, self.num_outputs), persistent=False)

    def forward(self, outputs: list[VisionOutput], image_size: tuple[int, int]) -> torch.Tensor:
        if len(outputs) != self.num_layers:
            raise TipslabError(f"this linear probe reads {self.num_layers} layer(s); got the outputs of {len(outputs)}")
        parts = []
        for out in outputs:
            parts.append(out.patches)
            if self.with_cls:
                parts.append(out.cls1[:, None].expand_as(out.patches))
        tokens = torch.cat(parts, dim=-1)
        grid = outputs[-1].grid
        b, n, d = tokens.shape
        x = self.linear(self.norm(tokens.reshape(b * n, d))).reshape(b, *grid, -1).permute(0, 3, 1, 2)
        if self.task == "depth":
            x = bins_to_depth(x, self.bin_centers, self.depth_range[0])
        return F.interpolate(x, size=tuple(image_size), mode="bilinear", align_corners=False)


class DPTProbe(nn.Module):
    """A DPT decoder trained on four blocks of a frozen tower (`decoder` is what gets exported)."""

    def __init__(self, task: str, embed_dim: int, num_outputs: int | None = None, channels: int = 256,
                 depth_range: tuple[float, float] = DEFAULT_DEPTH_RANGE):
        super().__init__()
        self.task = task
        self.decoder = DPTDecoder(task, embed_dim, num_outputs, channels=channels, depth_range=depth_range)

    def forward(self, outputs: list[VisionOutput], image_size: tuple[int, int]) -> torch.Tensor:
        if len(outputs) != 4:
            raise TipslabError(f"a DPT head reads 4 blocks, got {len(outputs)}")
        return self.decoder(dpt_inputs(outputs), image_size)


def silog_loss(pred: torch.Tensor, target: torch.Tensor, variance_focus: float = SILOG_LAMBDA) -> torch.Tensor:
    """Scale-invariant log loss over pixels with ground truth (target > 0)."""
    pred, target = pred.reshape(target.shape), target
    valid = target > 0
    if not valid.any():
        return pred.sum() * 0.0  # keeps the graph: a batch without depth contributes nothing
    g = torch.log(pred[valid].clamp(min=1e-6)) - torch.log(target[valid])
    return torch.sqrt((g**2).mean() - variance_focus * g.mean() ** 2 + 1e-8)


def probe_loss(task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "seg":
        return F.cross_entropy(pred, target.long(), ignore_index=IGNORE_INDEX)
    if task == "normals":  # 1 - cosine: the angle, smoothly, without a scale to learn
        return (1 - F.cosine_similarity(pred, target, dim=1)).mean()
    return silog_loss(pred, target)


def build_head(kind: str, task: str, embed_dim: int, num_outputs: int | None = None, channels: int = 256,
               depth_range: tuple[float, float] = DEFAULT_DEPTH_RANGE, num_layers: int = 1) -> nn.Module:
    """A probe head; ``num_layers``: how many blocks a linear head reads (a DPT head takes four)."""
    if kind == "linear":
        return LinearProbe(task, embed_dim, num_outputs, depth_range, num_layers)
    if kind == "dpt":
        return DPTProbe(task, embed_dim, num_outputs, channels, depth_range)
    raise TipslabError(f"head.kind={kind!r}; expected linear or dpt")
