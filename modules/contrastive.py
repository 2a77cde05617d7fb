"""Image-text contrastive loss with two CLS tokens (TIPS): CLS1 against the alt-text, CLS2
against a caption sampled from the richer granularities (TIPSv2's multi-granularity captions).
With ``hard_negative_weight``, each image must also prefer its texts to their one-word-wrong
twins (data.hard_negatives; NegCLIP).

The loss itself is open_clip's (softmax `ClipLoss` as in TIPS, or `SigLipLoss`), which also
gathers features across ranks; this component only routes the two CLS/text pairs into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from tipslab.errors import TipslabError
from tipslab.modules.components import DataViews, LossComponent, register_component
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
DENSE_POOLS = ("max", "mean")


def logit_scale_value(logit_scale: torch.Tensor) -> torch.Tensor:
    """The multiplier of the cosines: exp of the learned log-scale, capped at 100 (CLIP), fp32."""
    return logit_scale.float().exp().clamp(max=100.0).squeeze()


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
        hard_negative_weight: float = 0.0,
        dense_weight: float = 0.0,
        dense_pool: str = "max",
    ):
        super().__init__(weight=weight)
        if kind not in ("softmax", "sigmoid"):
            raise TipslabError(f"components.contrastive.kind must be 'softmax' or 'sigmoid', got {kind!r}")
        if views not in VIEWS:
            raise TipslabError(f"components.contrastive.views={views!r}; expected one of {', '.join(VIEWS)}")
        self.kind, self.views = kind, views
        self.cls1_weight = float(cls1_weight)
        self.cls2_weight = float(cls2_weight)
        self.hard_negative_weight = float(hard_negative_weight)
        if self.hard_negative_weight < 0:
            raise TipslabError(f"components.contrastive.hard_negative_weight={hard_negative_weight}; expected >= 0")
        # No text pass (and no CLS) for a pair whose weight is 0.
        for slot, text, _ in self._pairs():
            self.need(f"student/global/{slot}", f"text/{text}/pooled")
            if self.hard_negative_weight:
                self.need(f"text/{text}_negative/pooled")
        self.dense_weight, self.dense_pool = float(dense_weight), dense_pool
        if dense_pool not in DENSE_POOLS:
            raise TipslabError(f"components.contrastive.dense_pool={dense_pool!r}; expected one of {', '.join(DENSE_POOLS)}")
        if self.dense_weight < 0:
            raise TipslabError(f"components.contrastive.dense_weight={dense_weight}; expected >= 0")
        if self.dense_weight:
            self.need("student/global/dense", "text/alt/pooled")
        # SigLIP's learned bias, initialised as in its paper (-10); softmax needs none.
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0)) if kind == "sigmoid" else None
        self._loss: nn.Module | None = None

    def _pairs(self) -> list[tuple[str, str, float]]:
        """(CLS token, its text, weight) of each pair with a weight: CLS1 x alt-text, CLS2 x caption."""
        pairs = (("cls1", "alt", self.cls1_weight), ("cls2", "caption", self.cls2_weight))
        return [pair for pair in pairs if pair[2]]

    def check_data(self, views: DataViews) -> None:
        if self.hard_negative_weight and not views.negatives:
            raise TipslabError("components.contrastive.hard_negative_weight > 0 but the data makes no hard "
                               "negatives: set data.hard_negatives.words (groups of interchangeable words)")

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
        scale = logit_scale_value(logit_scale)
        if self.kind == "softmax":
            return self._loss_fn()(image, text, scale)
        return self._loss_fn()(image, text, scale, self.logit_bias.float().squeeze())

    def forward(self, features: Features) -> LossOutput:
        losses, metrics = {}, {}
        for slot, text, weight in self._pairs():
            crops = features.by_view(f"student/global/{slot}")  # [G, B, D]
            texts = features[f"text/{text}/pooled"]
            if self.views == "first":
                crops = crops[:1]
            # One contrastive problem per crop (a repeated text would be its own negative otherwise).
            loss = sum(self.pair_loss(crop, texts, features.logit_scale) for crop in crops) / len(crops)
            losses[f"{slot}_loss"] = weight * loss
            with torch.no_grad():
                metrics[f"i2t_acc_{slot}"] = retrieval_accuracy(crops[0], texts)
            if self.hard_negative_weight:
                negatives = features[f"text/{text}_negative/pooled"]
                valid = features.negative_valid[0 if slot == "cls1" else 1]
                scale = logit_scale_value(features.logit_scale)
                hard = sum(hard_negative_loss(crop, texts, negatives, valid, scale) for crop in crops) / len(crops)
                losses[f"{slot}_hard_negative_loss"] = weight * self.hard_negative_weight * hard
                with torch.no_grad():
                    metrics[f"hard_negative_acc_{slot}"] = hard_negative_accuracy(crops[0], texts, negatives, valid)
        if self.dense_weight:
            # The patches search and segmentation read (the dense readout) against the alt-text.
            patches = features["student/global/dense"][:features.batch_size]
            texts = features["text/alt/pooled"]
            if self.dense_pool == "mean":
                loss = self.pair_loss(patches.mean(dim=1), texts, features.logit_scale)
            else:
                loss = patch_max_clip_loss(patches, texts, logit_scale_value(features.logit_scale))
            losses["dense_loss"] = self.dense_weight * loss
        metrics["temperature"] = torch.exp(-features.logit_scale.detach()).squeeze()
        metrics["chance_acc"] = torch.tensor(1.0 / max(features.batch_size, 1))
        return LossOutput(losses=losses, metrics=metrics)


def patch_max_clip_loss(patches: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE whose image-text similarity is the best patch's (FILIP's token-wise max,
    one text token): ``s(i, t) = max_p cos(patch_ip, t)``, so a caption must match some patch of
    its image and no patch of the others. Local batch only (no gather: the max needs the patches)."""
    patches = F.normalize(patches.float(), dim=-1)  # [B, N, D]
    text = F.normalize(text.float(), dim=-1)  # [B, D]
    return symmetric_cross_entropy(scale * torch.einsum("bnd,td->btn", patches, text).amax(dim=-1))


def _pair_similarities(image, text, negative) -> tuple[torch.Tensor, torch.Tensor]:
    image = F.normalize(image.float(), dim=-1)
    return (image * F.normalize(text.float(), dim=-1)).sum(-1), (image * F.normalize(negative.float(), dim=-1)).sum(-1)


def hard_negative_loss(image: torch.Tensor, text: torch.Tensor, negative: torch.Tensor, valid: torch.Tensor,
                       scale: torch.Tensor | float) -> torch.Tensor:
    """Mean over images with a negative of ``-log softmax([s(i, t_i), s(i, n_i)])[0]``, ``s`` the
    scaled cosine: image ``i`` must prefer its caption ``t_i`` to the same caption with one word
    swapped, ``n_i``. Each image meets only its own negative (NegCLIP adds every negative as a
    column of the batch): the choice is local, needs no gather, and is about the swapped word."""
    positive, wrong = _pair_similarities(image, text, negative)
    per_image = F.softplus(scale * (wrong - positive))
    valid = valid.to(per_image.device, torch.bool)
    # No image with a negative: a zero that keeps the graph (every rank must reduce the same grads).
    return per_image[valid].mean() if bool(valid.any()) else per_image.sum() * 0.0


def hard_negative_accuracy(image, text, negative, valid) -> torch.Tensor:
    """Share of images (with a negative) closer to their caption than to its hard negative."""
    positive, wrong = _pair_similarities(image, text, negative)
    valid = valid.to(positive.device, torch.bool)
    return (positive > wrong)[valid].float().mean() if bool(valid.any()) else positive.new_tensor(float("nan"))


def symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies of ``logits [B images, B texts]``,
    the matching pairs on the diagonal."""
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def clip_loss_reference(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE written out, for tests and for reading: mean of the two cross-entropies."""
    return symmetric_cross_entropy(scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T)


__all__ = ["ContrastiveComponent", "retrieval_accuracy", "clip_loss_reference", "hard_negative_loss"]
