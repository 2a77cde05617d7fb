"""What the DINO and iBOT components share: a student head, its EMA teacher copy, the teacher's
centring and its temperature schedule.

Head-only EMA (TIPSv2): the teacher *backbone* is the student's (or, with full EMA, an EMA
backbone the system owns); the teacher *head* is always an EMA copy of the student head, declared
in `momentum_pairs` so the system updates it once per optimizer step.
"""

from __future__ import annotations

import copy

import torch

from tipslab.errors import TipslabError
from tipslab.modules.centering import TeacherCentering
from tipslab.modules.components import LossComponent
from tipslab.modules.heads import DINOHead


class SelfDistillationComponent(LossComponent):
    def __init__(self, embed_dim: int, weight: float, prototypes: int, hidden_dim: int, bottleneck_dim: int,
                 layers: int, student_temp: float, teacher_temp: float, warmup_teacher_temp: float,
                 teacher_temp_warmup: float, centering: str, center_momentum: float, sinkhorn_iterations: int):
        super().__init__(weight=weight)
        where = f"components.{self.name}"
        if min(float(student_temp), float(teacher_temp), float(warmup_teacher_temp)) <= 0:
            raise TipslabError(f"{where}: temperatures must be > 0")
        if not 0.0 <= float(teacher_temp_warmup) <= 1.0:
            raise TipslabError(f"{where}.teacher_temp_warmup={teacher_temp_warmup}; expected a share of "
                               "training in [0, 1]")
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.warmup_teacher_temp, self.teacher_temp_warmup = float(warmup_teacher_temp), float(teacher_temp_warmup)
        self.head = DINOHead(embed_dim, int(prototypes), int(hidden_dim), int(bottleneck_dim), int(layers))
        self.teacher_head = copy.deepcopy(self.head)  # starts equal to the student head, as DINOv2's
        self.teacher_head.requires_grad_(False)
        self.centering = TeacherCentering(int(prototypes), centering, center_momentum, sinkhorn_iterations,
                                          where=f"{where}.centering")

    def teacher_temperature(self, step: int, max_steps: int) -> float:
        """Linear warm-up from `warmup_teacher_temp` to `teacher_temp` over the first
        `teacher_temp_warmup` share of training (DINOv2: 0.04 -> 0.07 over 30 of 100 epochs)."""
        span = self.teacher_temp_warmup * max(max_steps, 1)
        if span <= 0 or step >= span:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / span

    @torch.no_grad()
    def teacher_targets(self, teacher_features: torch.Tensor, step: int, max_steps: int) -> torch.Tensor:
        """Centred teacher probabilities for ``[..., D]`` teacher features (same leading shape)."""
        logits = self.teacher_head(teacher_features.detach())
        flat = logits.reshape(-1, logits.shape[-1])
        return self.centering.targets(flat, self.teacher_temperature(step, max_steps)).reshape(logits.shape)

    def learnable_params(self):
        return list(self.head.parameters())

    def momentum_pairs(self):
        return [(self.head, self.teacher_head)]

    def on_optimizer_step(self) -> None:
        self.centering.step()
