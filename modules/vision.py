"""The vision tower: timm's TIPSv2 ViT (DINOv2-style, patch 14, one register used as a second CLS).

The weights live in a stock timm `VisionTransformer` built with the same class and arguments as
timm's `vit_*_patch14_reg1_tipsv2` models, so timm's own loader (`checkpoint_filter_fn`) is an
independent reference for our outputs. Our forward calls timm's submodules but does two things
timm's `forward_features` does not:

- the DINOv2/iBOT mask token: masked patch embeddings are replaced by a learnable `mask_token`
  before the position embeddings are added (the official checkpoints carry `mask_token`);
- position embeddings are resized **bilinearly with antialiasing**, as the official TIPS code
  does (`interpolate_pos_encoding`, `interpolate_antialias=True`, offset 0). timm resizes them
  bicubically, so at input sizes other than the checkpoint's grid timm's own model differs
  slightly from the official one; ours follows the official one.

Token order inside the tower is timm's `[CLS1, register (= CLS2), patches]`, the official order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tipslab.errors import TipslabError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PATCH_SIZE = 14

# Architecture per size. b, l, so400m and g are the arguments of timm's
# `vit_{base,large,so400m,giant}_patch14_reg1_tipsv2` (tests/test_vision.py checks they still
# agree); s is the official `vit_small`; tiny is a CPU size for demos and tests.
# What `forward_dense` keeps of the last block besides the value path (see its docstring).
DENSE_READOUTS = ("residual", "value")
# The patch embedding: the official 14-px linear one, or a small CNN (modules/conv_stem.py).
STEMS = ("patch", "conv")

VISION_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0),
    "s": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "b": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "l": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "so400m": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152),
    # SwiGLU with hidden 4096: timm packs both gate halves into fc1 (8192 outputs).
    "g": dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, swiglu=True),
}

TIMM_NAMES = {
    "b": "vit_base_patch14_reg1_tipsv2",
    "l": "vit_large_patch14_reg1_tipsv2",
    "so400m": "vit_so400m_patch14_reg1_tipsv2",
    "g": "vit_giant_patch14_reg1_tipsv2",
}


@dataclass
class VisionOutput:
    """Tower outputs after the final norm."""

    cls1: torch.Tensor  # [B, D] first CLS (trained against alt-text)
    cls2: torch.Tensor  # [B, D] the register slot, used as a second CLS (synthetic captions)
    patches: torch.Tensor  # [B, N, D], N = h * w, row-major over the patch grid
    grid: tuple[int, int]  # (h, w) patches


def timm_vit_kwargs(size: str, img_size: int, drop_path_rate: float = 0.0, registers: int = 0) -> dict:
    """The `timm.models.vision_transformer.VisionTransformer` arguments of one size."""
    if size not in VISION_SIZES:
        raise TipslabError(f"model.vision.size={size!r} is not known; expected one of {', '.join(VISION_SIZES)}")
    arch = dict(VISION_SIZES[size])
    kwargs = dict(
        img_size=img_size,
        patch_size=PATCH_SIZE,
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=arch["mlp_ratio"],
        init_values=1.0,
        reg_tokens=1 + int(registers),  # the official register is CLS2; `registers` more are free
        no_embed_class=True,
        num_classes=0,
        dynamic_img_size=True,
        drop_path_rate=float(drop_path_rate),
    )
    if arch.get("swiglu"):
        from timm.layers import SwiGLUPacked

        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return kwargs


def resample_positions(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """A patch position table `[1, h*w, D]` resized from ``old_grid`` to ``new_grid``: bilinear +
    antialias by output size (official TIPS: interpolate_offset=0), not timm's default bicubic."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(table, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=0,
                                  interpolation="bilinear", antialias=True)


class VisionTower(nn.Module):
    """TIPSv2 image encoder. Input `[B, 3, H, W]` in [0, 1] (no mean/std), H, W multiples of 14.

    `img_size` is the resolution the model is meant to run at (preprocessing resizes to it);
    `pos_grid` is the side of the stored position-embedding grid, `img_size // 14` unless a
    checkpoint says otherwise (TIPS v1 high-res models run at 448 with a 16x16 grid).
    """

    def __init__(self, size: str, img_size: int = 224, drop_path_rate: float = 0.0, pos_grid: int | None = None,
                 registers: int = 0, dense_readout: str = "residual", stem: str = "patch"):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        img_size = int(img_size)
        if img_size <= 0 or img_size % PATCH_SIZE:
            raise TipslabError(f"model.vision.img_size={img_size} must be a positive multiple of {PATCH_SIZE}")
        pos_grid = int(pos_grid) if pos_grid else img_size // PATCH_SIZE
        self.size = size
        self.img_size = img_size
        self.pos_grid = pos_grid
        self.patch_size = PATCH_SIZE
        # timm sizes the position table from its img_size: give it the grid's resolution.
        if int(registers) < 0:
            raise TipslabError(f"model.vision.registers={registers}; expected 0 or more")
        # Extra registers (Darcet et al., "Vision Transformers Need Registers"): tokens with no
        # loss of their own where the model can keep global information instead of in background
        # patches. The official TIPS towers have none (their one register is CLS2).
        self.registers = int(registers)
        if dense_readout not in DENSE_READOUTS:
            raise TipslabError(f"model.vision.dense_readout={dense_readout!r}; expected one of {', '.join(DENSE_READOUTS)}")
        self.dense_readout = dense_readout
        if stem not in STEMS:
            raise TipslabError(f"model.vision.stem={stem!r}; expected one of {', '.join(STEMS)}")
        self.stem = stem
        self.vit = VisionTransformer(**timm_vit_kwargs(size, pos_grid * PATCH_SIZE, drop_path_rate, self.registers))
        self.embed_dim = self.vit.embed_dim
        if stem == "conv":  # timm's PatchEmbed keeps its grid bookkeeping; only the projection changes
            from tipslab.modules.conv_stem import ConvStem

            self.vit.patch_embed.proj = ConvStem(self.embed_dim, PATCH_SIZE)
        # DINOv2 initialises the mask token to zeros; shape [1, D] as in the official files.
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        # timm starts CLS and register near zero (std 1e-6): two near-equal tokens with no position
        # embedding then give near-equal CLS1/CLS2 outputs for the whole run, and TIPS's two CLS
        # tokens (alt-text vs synthetic captions) cannot specialise. Distinct starts (ViT's 0.02);
        # loaded checkpoints overwrite them.
        nn.init.trunc_normal_(self.vit.cls_token, std=0.02)
        nn.init.trunc_normal_(self.vit.reg_token, std=0.02)

    @property
    def blocks(self) -> nn.Sequential:
        """The transformer blocks (units of activation checkpointing and FSDP2 sharding)."""
        return self.vit.blocks

    # -- tokens -----------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise TipslabError(f"images must be [B, 3, H, W]; got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % PATCH_SIZE or w % PATCH_SIZE or h == 0 or w == 0:
            raise TipslabError(f"image size {h}x{w} is not a multiple of the patch size {PATCH_SIZE}")

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Patch position embeddings `[1, h*w, D]` for a patch grid, resized as the official code
        (the stored table itself when the grid is the stored one)."""
        return resample_positions(self.vit.pos_embed, tuple(self.vit.patch_embed.grid_size), grid)

    @torch.no_grad()
    def set_pos_grid(self, grid: int, optimizers=()) -> None:
        """Store the position table at a ``grid x grid`` grid from now on (a resolution stage switch,
        224 -> 448): resized once, exactly as the forward would resize it every step, so outputs
        at the new size do not change. The Parameter object stays (its data is replaced), so an
        optimizer built before keeps it; its state of that one parameter (Adam's moments: anything
        shaped like the old table) is resized by the same linear map (`exp_avg_sq` stays >= 0: the
        antialiased bilinear weights are >= 0). Not under FSDP2 (a sharded DTensor; see callers)."""
        param, old = self.vit.pos_embed, tuple(self.vit.patch_embed.grid_size)
        new = (int(grid), int(grid))
        if new == old:
            return
        for optimizer in optimizers:
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = resample_positions(value, old, new)
        param.data = resample_positions(param.data, old, new)
        self.vit.patch_embed.set_input_size(img_size=new[0] * PATCH_SIZE)  # timm's own grid bookkeeping
        self.pos_grid, self.img_size = new[0], new[0] * PATCH_SIZE

    def tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """`[CLS1, CLS2, patches]` with positions added: the input of the first block."""
        self._check_images(images)
        vit = self.vit
        x = vit.patch_embed(images)  # [B, h, w, D]: dynamic_img_size keeps the grid shape
        batch, h, w, dim = x.shape
        x = x.reshape(batch, h * w, dim)
        if mask is not None:
            if mask.shape != (batch, h * w) or mask.dtype != torch.bool:
                raise TipslabError(
                    f"mask must be a bool tensor of shape [{batch}, {h * w}] (one entry per patch); "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            # Before the positions, as DINOv2/iBOT: a masked patch still knows where it is.
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        elif self.training:
            # Keep the mask token in the graph (adds exactly 0): a trained parameter that gets no
            # gradient has no optimizer state, which breaks DDP (unused parameters) and FSDP2's
            # distributed-checkpoint resume ("Missing key ... mask_token.step").
            x = x + 0.0 * self.mask_token.sum()
        x = x + self.position_embedding((h, w))
        # timm folded the CLS position into cls_token; the register gets no position (official).
        prefix = [vit.cls_token.expand(batch, -1, -1), vit.reg_token.expand(batch, -1, -1)]
        x = torch.cat(prefix + [x], dim=1)
        x = vit.pos_drop(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        return x, (h, w)

    def _split(self, x: torch.Tensor, grid: tuple[int, int]) -> VisionOutput:
        x = self.vit.norm(x)
        return VisionOutput(cls1=x[:, 0], cls2=x[:, 1], patches=x[:, 2 + self.registers:], grid=grid)

    # -- forwards ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> VisionOutput:
        x, grid = self.tokens(images, mask)
        x = self.vit.blocks(x)
        return self._split(x, grid)

    def forward_dense(self, images: torch.Tensor, readout: str | None = None) -> VisionOutput:
        """Outputs whose patches are the last block's value path (MaskCLIP trick), for patch-text
        similarity (zero-shot segmentation, search).

        In the last block attention is replaced by `attn.proj(v)`: each token keeps its own value
        instead of mixing with others, which localises patch-text similarity. `readout` (default:
        the tower's `dense_readout`) says what else the last block keeps:

        - `residual` (the official notebook): LayerScale, the residual and the MLP residual, then
          the final norm. Right for the official towers, trained long enough that the residual
          stream of a patch is semantic.
        - `value`: the LayerScaled value path alone, then the final norm (ClearCLIP, Lan et al.
          2024: the residual stream and the MLP carry most of the noise of CLIP-like dense maps).
          Right for short runs, where the residual of a patch still holds mostly its pixels and
          position (docs/RECIPE.md has the measurements).

        CLS1/CLS2 come from the same pass; use `forward` for the ordinary CLS tokens.
        """
        readout = self._readout(readout)
        return self._dense_head(*self._trunk(images), readout)

    def forward_with_dense(self, images: torch.Tensor, readout: str | None = None) -> tuple[VisionOutput, VisionOutput]:
        """`forward` and `forward_dense` of the same images from one pass through the shared
        blocks (all but the last): what a training step that needs both pays instead of two passes."""
        readout = self._readout(readout)
        x, grid = self._trunk(images)
        return self._split(self.vit.blocks[-1](x), grid), self._dense_head(x, grid, readout)

    def _readout(self, readout: str | None) -> str:
        readout = self.dense_readout if readout is None else readout
        if readout not in DENSE_READOUTS:
            raise TipslabError(f"dense readout {readout!r}; expected one of {', '.join(DENSE_READOUTS)}")
        return readout

    def _trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The tokens entering the last block, and the patch grid."""
        x, grid = self.tokens(images)
        for block in list(self.vit.blocks)[:-1]:
            x = block(x)
        return x, grid

    def _dense_head(self, x: torch.Tensor, grid: tuple[int, int], readout: str) -> VisionOutput:
        """The last block as `forward_dense` reads it, on the tokens entering it."""
        last = getattr(self.vit.blocks[-1], "_checkpoint_wrapped_module", self.vit.blocks[-1])
        attn = last.attn
        qkv = attn.qkv(last.norm1(x))
        v = qkv[..., 2 * attn.attn_dim :]  # qkv is laid out [q | k | v], heads contiguous inside
        value = last.ls1(attn.proj(attn.norm(v)))
        if readout == "value":
            return self._split(value, grid)
        x = x + last.drop_path1(value)
        x = x + last.drop_path2(last.ls2(last.mlp(last.norm2(x))))
        return self._split(x, grid)

    # -- intermediate layers (dense probes, DPT decoders) -----------------------------------
    def intermediate_layers(self, images: torch.Tensor, layers: Sequence[int] | None = None,
                            norm: bool = True) -> list[VisionOutput]:
        """Outputs of chosen blocks, as the official `get_intermediate_layers` (with explicit indices).

        `layers`: 0-based block indices (default: `default_dense_layers(depth)`, the four blocks
        the official DPT decoders read). `norm=True` passes each block's tokens through the final
        norm (the official decoders are fed normed tokens); `norm=False` gives the raw residual
        stream. The blocks run once, up to the deepest one asked for.
        """
        depth = len(self.vit.blocks)
        layers = list(default_dense_layers(depth) if layers is None else layers)
        if not layers or any(not 0 <= int(i) < depth for i in layers):
            raise TipslabError(f"intermediate layers {layers} must be block indices in [0, {depth}) for this "
                               f"{depth}-block vision tower")
        wanted = {int(i) for i in layers}
        x, grid = self.tokens(images)
        taken: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.vit.blocks):
            if index > max(wanted):
                break
            x = block(x)
            if index in wanted:
                taken[index] = x
        outputs = []
        for index in layers:
            tokens = self.vit.norm(taken[int(index)]) if norm else taken[int(index)]
            outputs.append(VisionOutput(cls1=tokens[:, 0], cls2=tokens[:, 1], patches=tokens[:, 2 + self.registers:],
                                        grid=grid))
        return outputs


# The four blocks the official DPT decoders read (TIPS_decoder_inference.ipynb), by depth:
# B [2, 5, 8, 11], L [5, 11, 17, 23], So400m [6, 13, 20, 26], g [9, 19, 29, 39].
OFFICIAL_DENSE_LAYERS: dict[int, tuple[int, ...]] = {
    12: (2, 5, 8, 11), 24: (5, 11, 17, 23), 27: (6, 13, 20, 26), 40: (9, 19, 29, 39),
}


def default_dense_layers(depth: int) -> tuple[int, ...]:
    """The last block of each quarter of the tower: ceil(depth * k / 4) - 1 for k = 1..4.

    This rule reproduces every official table entry (tests check it), so sizes without an
    official decoder (tiny: [0, 1, 2, 3]) get the same spacing."""
    depth = int(depth)
    if depth < 4:
        raise TipslabError(f"a DPT decoder reads 4 blocks; this vision tower has only {depth}")
    return tuple(-(-depth * k // 4) - 1 for k in range(1, 5))


def dpt_inputs(outputs: list[VisionOutput]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer `(cls1 [B, D], patch map [B, D, h, w])`: the decoders' input (official order)."""
    pairs = []
    for out in outputs:
        b, n, d = out.patches.shape
        h, w = out.grid
        pairs.append((out.cls1, out.patches.transpose(1, 2).reshape(b, d, h, w)))
    return pairs
