"""The image-text encoder: both towers and the learned contrastive temperature.

As in the official TIPS models there are no projection heads: the image embedding is the
(L2-normalised) CLS token, the text embedding the (L2-normalised) pooled text, so the vision
width must equal the text width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tipslab.errors import TipslabError
from tipslab.modules.text import TextTower
from tipslab.modules.vision import VisionOutput, VisionTower


class ImageTextEncoder(nn.Module):
    def __init__(self, vision: VisionTower, text: TextTower, temperature: float = 0.07):
        super().__init__()
        if vision.embed_dim != text.width:
            raise TipslabError(
                f"vision width {vision.embed_dim} != text width {text.width}: TIPS has no projection "
                "heads, so model.vision.size and model.text.size must have the same width"
            )
        if not temperature > 0:
            raise TipslabError(f"model.temperature must be > 0; got {temperature}")
        self.vision = vision
        self.text = text
        # Shape [1], not a scalar: FSDP2 cannot shard 0-D parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / float(temperature))))

    @property
    def temperature(self) -> torch.Tensor:
        return torch.exp(-self.logit_scale)

    @property
    def embed_dim(self) -> int:
        return self.vision.embed_dim

    def encode_image(self, images: torch.Tensor, dense: bool = False, mask: torch.Tensor | None = None) -> VisionOutput:
        if dense:
            if mask is not None:
                raise TipslabError("encode_image(dense=True) takes no mask: dense features are for inference")
            return self.vision.forward_dense(images)
        return self.vision(images, mask=mask)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids)

    @torch.no_grad()
    def similarity(self, image_features, text_features: torch.Tensor) -> torch.Tensor:
        """`[B, M]` probabilities over the texts for each image: softmax(cosine / temperature),
        the official demo's formula (image features are usually CLS1, texts pooled). Inference
        only (no gradient); a `VisionOutput` stands for its CLS1."""
        if hasattr(image_features, "cls1"):
            image_features = image_features.cls1
        image = nn.functional.normalize(image_features, dim=-1)
        text = nn.functional.normalize(text_features, dim=-1)
        return torch.softmax(image @ text.T / self.temperature, dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None):
        """Both towers in one call, so FSDP2's root hooks run (callers route through forward)."""
        return self.encode_image(images, mask=mask), self.encode_text(ids)


def _get(block, key, default=None):
    if block is None:
        return default
    value = block.get(key, default) if hasattr(block, "get") else getattr(block, key, default)
    return default if value is None else value


def build_encoder(model_cfg) -> ImageTextEncoder:
    """An encoder from a `model:` config block (dict or DictConfig).

    `model.vision.pos_grid` (optional) sets the stored position grid when it differs from
    `img_size // 14` (official checkpoints); the training configs leave it out.
    """
    vision_cfg = _get(model_cfg, "vision")
    text_cfg = _get(model_cfg, "text")
    if vision_cfg is None or text_cfg is None:
        raise TipslabError("the model config needs both a model.vision and a model.text block")
    vision = VisionTower(
        str(_get(vision_cfg, "size", "tiny")),
        img_size=int(_get(vision_cfg, "img_size", 224)),
        drop_path_rate=float(_get(vision_cfg, "drop_path_rate", 0.0)),
        pos_grid=_get(vision_cfg, "pos_grid"),
        registers=int(_get(vision_cfg, "registers", 0)),
        dense_readout=str(_get(vision_cfg, "dense_readout", "residual")),
        stem=str(_get(vision_cfg, "stem", "patch")),
    )
    text = TextTower(
        str(_get(text_cfg, "size", "tiny")),
        vocab_size=int(_get(text_cfg, "vocab_size", 32000)),
        context_length=int(_get(text_cfg, "context_length", 64)),
    )
    return ImageTextEncoder(vision, text, temperature=float(_get(model_cfg, "temperature", 0.07)))
