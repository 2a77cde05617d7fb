"""Gradient-norm clipping that works on plain tensors and on FSDP2's DTensor shards alike.

Under FSDP2 every gradient is a DTensor shard: the global norm is the norm of the local norms
(a collective), which `torch.nn.utils.get_total_norm` computes through DTensor dispatch;
`full_tensor()` turns it into one number every rank agrees on before the shards are scaled (as
DINOv3's `clip_grad_norm_` does). Lightning's `gradient_clip_val` refuses FSDP2, hence this.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale gradients in place so their global ``norm_type`` norm is at most ``max_norm``;
    returns the norm before clipping (a plain 0-d tensor)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if hasattr(total, "full_tensor"):  # a DTensor: the same global value on every rank
        total = total.full_tensor()
    scale = float(max_norm) / (float(total) + 1e-6)
    if scale < 1.0:
        # A Python float multiplies plain tensors and DTensors alike (a tensor would mix types).
        torch._foreach_mul_(grads, scale)
    return total.detach()
