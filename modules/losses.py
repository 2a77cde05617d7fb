"""The self-distillation losses of the TIPSv2 recipe as small functions over tensors.

Tensors in, scalar (or probabilities) out, as lightly's losses are: no heads, no state, no
config. The loss components (dino.py, ibot.py, koleo.py, distill.py) route features into them.
Each has a test against a hand-computed case (tests/test_losses.py).

Every loss computes in float32 (inputs cast on entry), whatever the dtype of the model's
activations: under FSDP2's bf16 parameters there is no autocast to do it (docs/SCALE.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def centered_teacher_probs(logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """DINO's teacher targets: softmax((logits - center) / teacher_temp) over the last dim."""
    return F.softmax((logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """SwAV/DINOv2 Sinkhorn-Knopp targets for ``logits [B, K]``: rows sum to 1 and every prototype
    gets an equal share of the batch (across ranks when distributed)."""
    # Shifting by the global maximum avoids overflow and cancels out in the normalisations.
    shift = logits.detach().float().max()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX)
    q = torch.exp((logits.float() - shift) / teacher_temp).T  # [K, B]
    num_prototypes = q.shape[0]
    batch = torch.tensor(q.shape[1], device=q.device, dtype=q.dtype)
    batch = _all_reduce_sum(batch)
    q /= _all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        rows = _all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= rows * num_prototypes
        q /= q.sum(dim=0, keepdim=True) * batch
    return (q * batch).T.to(logits.dtype)


def cross_entropy_soft(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """−Σ_k p_teacher · log softmax(student / student_temp), per row (last dim summed)."""
    return -(teacher_probs.float() * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


def dino_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """DINO's CLS self-distillation loss.

    ``student_logits [S, B, K]`` over all student crops, the first ``T`` being the global crops the
    teacher saw; ``teacher_probs [T, B, K]``. Every teacher crop is compared with every student
    crop except itself; the mean over those pairs and the batch.
    """
    num_student, num_teacher = student_logits.shape[0], teacher_probs.shape[0]
    total, pairs = student_logits.new_zeros(()), 0
    for t in range(num_teacher):
        for s in range(num_student):
            if s == t:
                continue
            total = total + cross_entropy_soft(student_logits[s], teacher_probs[t], student_temp).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss needs at least two crops (one teacher crop and another student crop)")
    return total / pairs


def _per_image_mean(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values [B, N]`` over the entries where ``weights`` is 1, per image; and which images
    have any such entry."""
    counts = weights.sum(dim=1)
    has = counts > 0
    return (values * weights).sum(dim=1) / counts.clamp(min=1), has


def ibot_loss(student_patch_logits: torch.Tensor, teacher_patch_probs: torch.Tensor, masks: torch.Tensor,
              student_temp: float, visible_weight: float = 0.0) -> torch.Tensor:
    """iBOT's patch loss and TIPSv2's iBOT++.

    ``student_patch_logits [B, N, K]`` (the student saw the masked view), ``teacher_patch_probs
    [B, N, K]`` (the teacher saw the unmasked view), ``masks [B, N]`` bool. The masked part is the
    cross-entropy averaged over each image's masked patches, then over the images that have any
    (iBOT). iBOT++ adds ``visible_weight`` × the same over visible patches (every image has some);
    ``visible_weight=0`` is iBOT.
    """
    ce = cross_entropy_soft(student_patch_logits, teacher_patch_probs, student_temp)  # [B, N]
    masks = masks.to(ce.dtype)
    masked, has_masked = _per_image_mean(ce, masks)
    loss = masked[has_masked].sum() / has_masked.sum().clamp(min=1)
    if visible_weight:
        visible, has_visible = _per_image_mean(ce, 1.0 - masks)
        loss = loss + visible_weight * visible[has_visible].sum() / has_visible.sum().clamp(min=1)
    return loss


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (DINOv2): −mean log distance of each L2-normalised row of ``x [B, D]`` to its nearest
    neighbour; spreads features over the sphere."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.T
        sims.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = sims.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], eps=eps)
    return -torch.log(distances + eps).mean()


def cosine_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 − cosine similarity of matching rows (last dim), averaged: a feature-matching loss that
    ignores the teacher's feature scale."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


__all__ = [
    "centered_teacher_probs",
    "sinkhorn_knopp",
    "cross_entropy_soft",
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "cosine_distillation_loss",
]
