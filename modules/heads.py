"""Projection heads of the self-distillation components: DINO's MLP + prototypes.

DINOv2's head: an MLP (GELU) to a bottleneck, L2-normalised, then a linear map onto prototypes
whose weight vectors are normalised too (DINOv2 uses ``weight_norm`` with the gain fixed at 1;
normalising the weight in forward is the same function and keeps plain parameters, which FSDP2
shards without the ``weight_norm`` parametrization).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, prototypes: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"DINOHead needs at least one layer; got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            blocks.append(nn.Linear(a, b))
            if i < layers - 1:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_dim]`` features -> ``[..., prototypes]`` logits (cosines to the prototypes)."""
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return z @ F.normalize(self.prototypes, dim=-1, eps=1e-6).T
