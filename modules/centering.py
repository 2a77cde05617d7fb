"""Teacher centring: how a self-distillation component turns teacher logits into targets.

``ema`` (DINO): subtract a running centre of the teacher logits, then a sharp softmax; the centre
is an EMA of the batch mean, all-reduced across ranks. ``sinkhorn`` (SwAV, DINOv2 for ViT-g):
Sinkhorn-Knopp balancing, no state.

The centre moves once per optimizer step, also under gradient accumulation: forwards only add
the teacher logits' sum to a pending total, and `step()` (called by the system after the
optimizer step) folds their mean into the centre. The centre is a persistent buffer, so a
resumed run continues with the same one.
"""

from __future__ import annotations

import torch
from torch import nn

from tipslab.errors import TipslabError
from tipslab.modules.losses import centered_teacher_probs, sinkhorn_knopp

MODES = ("ema", "sinkhorn")


class TeacherCentering(nn.Module):
    def __init__(self, dim: int, mode: str = "ema", momentum: float = 0.9, sinkhorn_iterations: int = 3,
                 where: str = "centering"):
        super().__init__()
        if mode not in MODES:
            raise TipslabError(f"{where}={mode!r}; expected one of {', '.join(MODES)}")
        if not 0.0 <= float(momentum) < 1.0:
            raise TipslabError(f"{where} momentum={momentum}; expected a number in [0, 1)")
        self.mode, self.momentum, self.iterations = mode, float(momentum), int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, dim))
        self.register_buffer("pending_sum", torch.zeros(1, dim), persistent=False)
        self.register_buffer("pending_count", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def targets(self, logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Teacher probabilities for ``logits [M, K]`` (rows are crops or patches)."""
        logits = logits.detach().float()
        if self.mode == "sinkhorn":
            return sinkhorn_knopp(logits, teacher_temp, self.iterations)
        self.pending_sum += logits.sum(dim=0, keepdim=True)
        self.pending_count += logits.shape[0]
        return centered_teacher_probs(logits, self.center, teacher_temp)

    @torch.no_grad()
    def step(self) -> None:
        """Fold the logits seen since the last optimizer step into the centre (all ranks alike)."""
        if self.mode != "ema":
            return
        total = torch.cat([self.pending_sum.reshape(-1), self.pending_count.reshape(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        count = total[-1]
        if count > 0:
            mean = (total[:-1] / count).reshape_as(self.center)
            self.center.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
        self.pending_sum.zero_()
        self.pending_count.zero_()
