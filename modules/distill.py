"""Patch-level distillation from a frozen teacher (TIPSv2: a g/14 teacher makes an L/14 student
align patches with text better than the teacher itself).

The frozen teacher (any tipslab checkpoint or official file, loaded by the system, never
trained, never written into training checkpoints) sees the student's global crops unmasked; the
student's patch tokens (and CLS tokens) are pulled towards the teacher's with a cosine loss,
through a learned linear projection when the widths differ. The paper runs distillation without
masking (`tipsv2_distill_l`); with masks on, masked patches learn to predict the teacher's.
The paper does not publish its distillation loss: the cosine form is chosen (scale-free).
``patch_kind: dense`` pulls the student's dense readout (what segmentation and search read,
`VisionTower.forward_dense`) towards the teacher's instead of the last block's tokens: for towers
whose patch-text alignment lives in that readout (``model.vision.dense_readout: value``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tipslab.errors import TipslabError
from tipslab.modules.components import LossComponent, register_component
from tipslab.modules.features import Features, LossOutput
from tipslab.modules.losses import cosine_distillation_loss

PATCH_KINDS = ("patches", "dense")


@register_component("distill")
class DistillComponent(LossComponent):
    def __init__(self, embed_dim: int, weight: float = 1.0, distill_dim: int | None = None,
                 patch_weight: float = 1.0, cls_weight: float = 1.0, patch_kind: str = "patches"):
        super().__init__(weight=weight)
        if distill_dim is None:
            raise TipslabError("components.distill is on but no frozen teacher is set: set distill_teacher.path "
                               "(a tipslab checkpoint directory or official .npz/.safetensors files)")
        if patch_kind not in PATCH_KINDS:
            raise TipslabError(f"components.distill.patch_kind={patch_kind!r}; expected one of: {', '.join(PATCH_KINDS)}")
        self.patch_weight, self.cls_weight = float(patch_weight), float(cls_weight)
        # Which patch features meet: the last block's tokens (the paper's), or the dense readout that
        # segmentation and search read (`model.vision.dense_readout`, each tower its own).
        self.patch_kind = patch_kind
        # Identity when the widths match: the student's own features are compared, as the paper's
        # same-family distillation; a learned map otherwise.
        self.project = nn.Identity() if int(distill_dim) == embed_dim else nn.Linear(embed_dim, int(distill_dim))
        if self.patch_weight:
            self.need(f"student/global/{patch_kind}", f"distill/global/{patch_kind}")
        if self.cls_weight:
            self.need("student/global/cls1", "distill/global/cls1", "student/global/cls2", "distill/global/cls2")

    def forward(self, features: Features) -> LossOutput:
        losses = {}
        if self.patch_weight:
            student = self.project(features[f"student/global/{self.patch_kind}"])
            teacher = features[f"distill/global/{self.patch_kind}"]
            if teacher.shape[1] != student.shape[1]:  # a teacher at another resolution: match the grids
                teacher = _resize_tokens(teacher, student.shape[1])
            losses["patch_loss"] = self.patch_weight * cosine_distillation_loss(student, teacher.detach())
        if self.cls_weight:
            terms = [cosine_distillation_loss(self.project(features[f"student/global/{c}"]),
                                              features[f"distill/global/{c}"].detach()) for c in ("cls1", "cls2")]
            losses["cls_loss"] = self.cls_weight * sum(terms) / 2
        return LossOutput(losses=losses)


def _resize_tokens(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, n*n, D]`` patch tokens bilinearly resized to a ``sqrt(count)`` square grid."""
    batch, n, dim = tokens.shape
    side, new = int(round(n ** 0.5)), int(round(count ** 0.5))
    if side * side != n or new * new != count:
        raise TipslabError(f"distillation: teacher grid of {n} patches and student grid of {count} are not square")
    grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)
    grid = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)
