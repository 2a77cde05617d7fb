"""What one forward pass of the pretraining system computes, handed to every loss component.

Features are keyed by role, view and kind, as in DINOv2/DINOv3's meta-architecture:

- role ``student`` (the backbone being trained, with gradients), ``teacher`` (no gradients: the
  same backbone on unmasked views for head-only EMA, or an EMA backbone for full EMA),
  ``distill`` (a frozen, usually larger, model), ``text`` (the text tower);
- view ``global`` (the global crops, ``[G*B, ...]`` crop-major; the student's are masked when the
  batch has masks) or ``local`` (the local crops, student only); for text ``alt`` (CLS1's
  alt-text), ``caption`` (CLS2's sampled caption) or their hard negatives ``alt_negative`` /
  ``caption_negative`` (data.hard_negatives);
- kind ``cls1``, ``cls2``, ``patches`` (after the final norm) or ``dense`` (the last block's
  value path, for zero-shot segmentation); for text ``pooled``.

A component declares the keys it needs; the system computes the union once, one backbone pass
per (role, view) whatever the kinds asked, and every component reads the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

ROLES = ("student", "teacher", "distill", "text")
VISION_VIEWS = ("global", "local")
TEXT_VIEWS = ("alt", "caption", "alt_negative", "caption_negative")
VISION_KINDS = ("cls1", "cls2", "patches", "dense")


class FeatureKey(NamedTuple):
    role: str
    view: str
    kind: str

    def check(self) -> FeatureKey:
        if self.role == "text":
            ok = self.view in TEXT_VIEWS and self.kind == "pooled"
        else:
            ok = self.role in ROLES and self.view in VISION_VIEWS and self.kind in VISION_KINDS
            ok = ok and not (self.view == "local" and self.role != "student")  # teachers see global crops
        if not ok:
            raise ValueError(f"no such feature {'/'.join(self)}; roles {ROLES}, vision views {VISION_VIEWS}, "
                             f"kinds {VISION_KINDS}, text views {TEXT_VIEWS} (kind 'pooled')")
        return self

    def __str__(self) -> str:
        return "/".join(self)


def key(spec: str) -> FeatureKey:
    """``"student/global/cls1"`` -> FeatureKey."""
    parts = spec.split("/")
    if len(parts) != 3:
        raise ValueError(f"feature {spec!r}: expected role/view/kind, e.g. student/global/cls1")
    return FeatureKey(*parts).check()


@dataclass
class Features:
    """The computed features and the step context every component shares.

    ``values`` maps each computed key to its tensor; asking for a key nobody declared raises,
    which catches a component that forgot to list a need.
    """

    logit_scale: torch.Tensor  # log(1 / temperature), shape [1]
    batch_size: int
    num_global: int = 1
    num_local: int = 0
    masks: torch.Tensor | None = None  # bool [G*B, N] of the student's global crops, or None
    negative_valid: torch.Tensor | None = None  # bool [2, B]: alt / caption has a hard negative
    step: int = 0  # optimizer steps taken (schedules: teacher temperature warm-up)
    max_steps: int = 1
    values: dict[FeatureKey, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, spec: str | FeatureKey) -> torch.Tensor:
        k = key(spec) if isinstance(spec, str) else spec
        if k not in self.values:
            raise KeyError(f"feature {k} was not computed: the component must list it in `needs`")
        return self.values[k]

    def __contains__(self, spec: str | FeatureKey) -> bool:
        return (key(spec) if isinstance(spec, str) else spec) in self.values

    def by_view(self, spec: str | FeatureKey) -> torch.Tensor:
        """A crop-major ``[V*B, ...]`` feature as ``[V, B, ...]``."""
        value = self[spec]
        return value.reshape(-1, self.batch_size, *value.shape[1:])


@dataclass
class LossOutput:
    """Named loss terms (summed, weighted, into the objective) and scalars only reported."""

    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
