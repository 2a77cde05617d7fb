"""The TIPS text tower: a pre-LN transformer with masked mean pooling (google-deepmind/tips).

Built from the published architecture: token embedding scaled by sqrt(width), fixed sinusoidal
positions (timescales 1 to 10000, sines then cosines), pre-LN blocks whose ReLU MLP output is
zeroed at padded positions, a key-padding mask (fused SDPA), `ln_final`, and a mean over the non-padded
tokens. Padding is id 0. Module names follow the official PyTorch port so its state dict loads
as is: `token_embedding`, `transformer.resblocks.i.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`,
`ln_final` (the positions are computed, not stored).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tipslab.errors import TipslabError

# width / MLP / heads / layers. S to g from the official `run_text_encoder_inference.py`
# (the same text towers for TIPS v1 and v2); tiny is a CPU size.
TEXT_SIZES: dict[str, dict] = {
    "tiny": dict(width=192, mlp_dim=768, heads=3, layers=2),
    "s": dict(width=384, mlp_dim=1536, heads=6, layers=12),
    "b": dict(width=768, mlp_dim=3072, heads=12, layers=12),
    "l": dict(width=1024, mlp_dim=4096, heads=16, layers=12),
    "so400m": dict(width=1152, mlp_dim=4304, heads=16, layers=27),
    "g": dict(width=1536, mlp_dim=6144, heads=24, layers=12),
}

PAD_ID = 0


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """`[length, dim]` fixed positions: sin then cos over geometric timescales 1..10000."""
    num_timescales = dim // 2
    log_increment = math.log(10000.0) / max(num_timescales - 1, 1)
    inv_timescales = torch.exp(torch.arange(num_timescales, dtype=torch.float32, device=device) * -log_increment)
    scaled = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_timescales[None, :]
    signal = torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)
    return nn.functional.pad(signal, (0, dim % 2))


class MaskedMlp(nn.Module):
    """ReLU MLP whose output is zeroed at padded positions (after the activation and at the end)."""

    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_dim)
        self.c_proj = nn.Linear(mlp_dim, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c_fc(x)) * keep
        return self.c_proj(x) * keep


class PaddedSelfAttention(nn.Module):
    """Multi-head self-attention on `F.scaled_dot_product_attention` with a key-padding mask.

    The parameters and their initialisation are `nn.MultiheadAttention`'s (`in_proj_weight`,
    `in_proj_bias`, `out_proj`), so official checkpoints load as is. Written out because
    `nn.MultiheadAttention` in training goes through `multi_head_attention_forward`: a
    batch-first transpose and copies, a float mask expanded per head, Python checks per call.
    Here: one packed projection, batch-first views, a boolean `[B, 1, 1, L]` mask that SDPA
    broadcasts (its fused memory-efficient kernel on GPU), one output projection.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise TipslabError(f"text width {width} is not divisible by its {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """`x [B, L, D]`; `attend [B, L]` bool, True where a key may be attended to."""
        b, length, width = x.shape
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(b, length, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = PaddedSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = MaskedMlp(width, mlp_dim)

    def forward(self, x: torch.Tensor, attend: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attend)
        return x + self.mlp(self.ln_2(x), keep)


class Transformer(nn.Module):
    """Holds the blocks under the official name `transformer.resblocks`."""

    def __init__(self, width: int, heads: int, mlp_dim: int, layers: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_dim) for _ in range(layers))


class TextTower(nn.Module):
    """`forward(ids [B, L] long) -> [B, width]`: pooled, not normalised; id 0 is padding."""

    def __init__(self, size: str, vocab_size: int = 32000, context_length: int = 64):
        super().__init__()
        if size not in TEXT_SIZES:
            raise TipslabError(f"model.text.size={size!r} is not known; expected one of {', '.join(TEXT_SIZES)}")
        arch = TEXT_SIZES[size]
        self.size = size
        self.width = arch["width"]
        self.heads = arch["heads"]
        self.vocab_size = int(vocab_size)
        self.context_length = int(context_length)
        self.token_embedding = nn.Embedding(self.vocab_size, self.width)
        self.transformer = Transformer(self.width, arch["heads"], arch["mlp_dim"], arch["layers"])
        self.ln_final = nn.LayerNorm(self.width, eps=1e-5)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (units of activation checkpointing and FSDP2 sharding)."""
        return self.transformer.resblocks

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise TipslabError(f"text ids must be an integer tensor [B, L]; got {ids.dtype} {tuple(ids.shape)}")
        padding = ids == PAD_ID
        keep = (~padding).unsqueeze(-1).to(self.token_embedding.weight.dtype)
        # A text with no tokens at all would make every attention row -inf (NaN, also in the
        # gradient). Letting its first key through changes nothing kept: padded positions are
        # zeroed by the pooling below, so such a text pools to zeros, as in the official code.
        attend = ~padding
        attend[:, 0] |= padding.all(dim=1)

        x = self.token_embedding(ids) * math.sqrt(self.width)
        x = x + sinusoidal_positions(ids.shape[1], self.width, device=ids.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, attend, keep)
        x = self.ln_final(x)
        # Masked mean; eps as the official GlobalAvgPooling.
        return (x * keep).sum(dim=1) / (keep.sum(dim=1) + 1e-8)
