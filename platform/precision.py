"""Who casts to bf16 in a training step: FSDP2's MixedPrecisionPolicy or autocast, never both.

Under FSDP2 (`trainer.strategy=fsdp`) with `trainer.precision=bf16-mixed`, FSDP2 owns the cast:
parameters are all-gathered as bf16 (half the traffic of fp32) and gradients reduce-scattered
in fp32 into fp32 master weights, while Lightning runs at `32-true`, so no autocast context
casts the already-bf16 weights and activations again (LayerNorm and softmax inputs up to fp32
and back at every op: the `aten::copy_` / `_to_copy` share of issue 8's profile). This is
torchtitan's rule (no AMP when FSDP is on). The losses cast their inputs to fp32 themselves
(modules/losses.py, modules/contrastive.py), which autocast would otherwise have done.
Without FSDP2 (strategy auto: one device or DDP) autocast owns it: Lightning's `bf16-mixed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tipslab.errors import TipslabError

FSDP_PRECISIONS = ("bf16-mixed", "32-true")


@dataclass(frozen=True)
class PrecisionPlan:
    lightning: str  # the Trainer's `precision`
    autocast: bool  # whether Lightning's precision plugin wraps the step in autocast
    param_dtype: torch.dtype | None  # FSDP2 MixedPrecisionPolicy: the dtype blocks compute in
    reduce_dtype: torch.dtype | None  # FSDP2 MixedPrecisionPolicy: the gradient reduce-scatter


def precision_plan(strategy: str, precision) -> PrecisionPlan:
    """The one place that decides the casts of a training step (a pure function of the config)."""
    precision = str(precision)
    if strategy == "fsdp":
        if precision in ("32", "32-true"):
            return PrecisionPlan("32-true", autocast=False, param_dtype=None, reduce_dtype=torch.float32)
        if precision == "bf16-mixed":
            return PrecisionPlan("32-true", autocast=False, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        raise TipslabError(f"trainer.precision={precision} with trainer.strategy=fsdp: expected one of "
                           f"{', '.join(FSDP_PRECISIONS)} (FSDP2 casts to bf16 itself, master weights stay fp32)")
    return PrecisionPlan(precision, autocast=precision.endswith("-mixed"), param_dtype=None, reduce_dtype=None)
