"""Image-text contrastive loss with two CLS tokens (TIPS): CLS1 against the alt-text, CLS2
against a caption sampled from the richer granularities (TIPSv2's multi-granularity captions).

The loss itself is open_clip's (softmax `ClipLoss` as in TIPS, or `SigLipLoss`), which also
gathers features across ranks; this component only routes the two CLS/text pairs into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from tipslab.errors import TipslabError
from tipslab.modules.components import LossComponent, register_component
from tipslab.modules.features import Features, LossOutput


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def retrieval_accuracy(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Share of images whose most similar text in the (local) batch is their own caption."""
    sims = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    return (sims.argmax(dim=1) == torch.arange(len(sims), device=sims.device)).float().mean()


VIEWS = ("first", "global")


@register_component("contrastive")
class ContrastiveComponent(LossComponent):
    """``views``: ``first`` contrasts the first global crop (the one the captions describe) with
    the texts, as TIPS does; ``global`` contrasts every global crop with them."""

    def __init__(
        self,
        embed_dim: int,
        weight: float = 1.0,
        kind: str = "softmax",
        cls1_weight: float = 1.0,
        cls2_weight: float = 1.0,
        views: str = "first",
    ):
        super().__init__(weight=weight)
        if kind not in ("softmax", "sigmoid"):
            raise TipslabError(f"components.contrastive.kind must be 'softmax' or 'sigmoid', got {kind!r}")
        if views not in VIEWS:
            raise TipslabError(f"components.contrastive.views={views!r}; expected one of {', '.join(VIEWS)}")
        self.kind, self.views = kind, views
        self.cls1_weight = float(cls1_weight)
        self.cls2_weight = float(cls2_weight)
        # No text pass (and no CLS) for a pair whose weight is 0.
        if self.cls1_weight:
            self.need("student/global/cls1", "text/alt/pooled")
        if self.cls2_weight:
            self.need("student/global/cls2", "text/caption/pooled")
        # SigLIP's learned bias, initialised as in its paper (-10); softmax needs none.
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0)) if kind == "sigmoid" else None
        self._loss: nn.Module | None = None

    def _loss_fn(self) -> nn.Module:
        # Built lazily: rank and world size are only known once the strategy has set up the
        # process group.
        if self._loss is None:
            rank, world = _world()
            if self.kind == "softmax":
                self._loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
            else:
                self._loss = SigLipLoss(rank=rank, world_size=world)
        return self._loss

    def pair_loss(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        # float32 logits whatever the towers' dtype (bf16 under FSDP2, no autocast: docs/SCALE.md)
        image = F.normalize(image.float(), dim=-1)
        text = F.normalize(text.float(), dim=-1)
        scale = logit_scale.float().exp().clamp(max=100.0).squeeze()
        if self.kind == "softmax":
            return self._loss_fn()(image, text, scale)
        return self._loss_fn()(image, text, scale, self.logit_bias.float().squeeze())

    def forward(self, features: Features) -> LossOutput:
        losses, metrics = {}, {}
        for slot, text, weight in (("cls1", "alt", self.cls1_weight), ("cls2", "caption", self.cls2_weight)):
            if not weight:
                continue
            crops = features.by_view(f"student/global/{slot}")  # [G, B, D]
            texts = features[f"text/{text}/pooled"]
            if self.views == "first":
                crops = crops[:1]
            # One contrastive problem per crop (a repeated text would be its own negative otherwise).
            loss = sum(self.pair_loss(crop, texts, features.logit_scale) for crop in crops) / len(crops)
            losses[f"{slot}_loss"] = weight * loss
            with torch.no_grad():
                metrics[f"i2t_acc_{slot}"] = retrieval_accuracy(crops[0], texts)
        metrics["temperature"] = torch.exp(-features.logit_scale.detach()).squeeze()
        metrics["chance_acc"] = torch.tensor(1.0 / max(features.batch_size, 1))
        return LossOutput(losses=losses, metrics=metrics)


def clip_loss_reference(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE written out, for tests and for reading: mean of the two cross-entropies."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(logits))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


__all__ = ["ContrastiveComponent", "retrieval_accuracy", "clip_loss_reference"]
