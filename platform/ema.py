"""EMA updates of the (teacher) copies that loss components declare in `momentum_pairs`.

Head-only EMA (TIPSv2): a component's teacher head is an EMA copy of its student head, while the
teacher backbone *is* the student backbone, so only the heads appear in these pairs.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """DINO's schedule: momentum rises from `base` to `final` along a half cosine."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update_(pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """teacher ← momentum · teacher + (1 − momentum) · student, for every pair, in place."""
    students, teachers = [], []
    for student, teacher in pairs:
        s_params, t_params = list(student.parameters()), list(teacher.parameters())
        if len(s_params) != len(t_params):
            raise ValueError(f"EMA pair has {len(s_params)} student and {len(t_params)} teacher parameters")
        students.extend(p.detach() for p in s_params)
        teachers.extend(t_params)
    if teachers:
        # One fused call over all heads (foreach); tensors must all be plain or all DTensors.
        torch._foreach_lerp_(teachers, students, 1.0 - momentum)
