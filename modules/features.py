"""What one forward pass of the pretraining system computes, handed to every loss component.

Fields a component did not ask for (see `LossComponent.needs`) stay None: the system computes
only the union of what the enabled components need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The names a component may list in `needs`.
FEATURE_NAMES = frozenset(
    {
        "cls1",            # student CLS1 of the (masked) global view, final norm  [B, D]
        "cls2",            # student CLS2 (the register slot)                       [B, D]
        "patches",         # student patch tokens                                   [B, N, D]
        "text_alt",        # pooled text embedding of the alt-text                  [B, D]
        "text_caption",    # pooled text embedding of the sampled richer caption    [B, D]
    }
)


@dataclass
class Features:
    logit_scale: torch.Tensor  # log(1 / temperature), shape [1]
    cls1: torch.Tensor | None = None
    cls2: torch.Tensor | None = None
    patches: torch.Tensor | None = None
    text_alt: torch.Tensor | None = None
    text_caption: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossOutput:
    """Named loss terms (summed, weighted, into the objective) and scalars only reported."""

    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
