"""The Python API: `load_model(name_or_path)` gives an encoder ready for inference, its tokenizer
and its image preprocessing, from a tipslab checkpoint or from the official TIPS / TIPSv2 files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tipslab.datamodules.preprocess import Preprocessing
from tipslab.errors import TipslabError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# The one preprocessing of every command (resize rule, PIL bicubic, model input size), under the
# name the API has always had: PIL image or uint8 array -> float [3, S, S] in [0, 1], no mean/std.
Preprocess = Preprocessing


@dataclass
class LoadedModel:
    encoder: torch.nn.Module  # ImageTextEncoder, eval mode
    tokenizer: object  # list[str] -> LongTensor [B, L]
    preprocess: Preprocess
    model_cfg: dict

    @property
    def device(self) -> torch.device:
        return self.encoder.logit_scale.device

    @torch.no_grad()
    def embed_images(self, images, dense: bool = False):
        """Preprocessed images (a list of PIL/arrays or a `[B,3,H,W]` tensor) -> VisionOutput."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.preprocess(image) for image in images])
        return self.encoder.encode_image(images.to(self.device), dense=dense)

    @torch.no_grad()
    def embed_texts(self, texts: list[str] | str) -> torch.Tensor:
        return self.encoder.encode_text(self.tokenizer(texts).to(self.device))


def _finish(encoder, model_cfg: dict, device) -> LoadedModel:
    from tipslab.modules.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(**dict(model_cfg.get("tokenizer") or {"kind": "bpe"}))
    encoder = encoder.to(device).eval()
    return LoadedModel(
        encoder=encoder,
        tokenizer=tokenizer,
        preprocess=Preprocess(model_cfg["vision"]["img_size"]),
        model_cfg=model_cfg,
    )


def load_model(name_or_path, device: str | torch.device = "cpu", *, text=None, tokenizer=None,
               img_size: int | None = None) -> LoadedModel:
    """An encoder ready for inference, its tokenizer and preprocessing, from any of:

    - a tipslab checkpoint directory (`model.safetensors` + `model.yaml`);
    - official TIPS files: a vision `.npz` (its `*_text.npz` beside it, or `text=`), a directory
      holding the `*_vision.npz` / `*_text.npz` pair, or a Hugging Face TIPSv2 `.safetensors`
      file or directory; the SentencePiece `tokenizer.model` beside them or `tokenizer=`;
    - a release name (`tipsv2-b14`, `tipsv2-l14`, `tipsv2-so400m14`, `tipsv2-g14`, `tips-b14`,
      ...) resolved to `$TIPSLAB_WEIGHTS_DIR/<name>/`.

    `img_size` overrides the resolution preprocessing resizes to (official: the release's, else
    the position grid's, 448 for TIPSv2).
    """
    from tipslab.modules import official
    from tipslab.modules.checkpoint import is_checkpoint_dir, load_checkpoint

    path = Path(str(name_or_path)).expanduser()
    if path.is_dir() and is_checkpoint_dir(path):
        if text or tokenizer:
            raise TipslabError(f"{path}: a tipslab checkpoint carries its own text tower and tokenizer; "
                               "--text/--tokenizer are for official files")
        encoder, model_cfg = load_checkpoint(path)
        if img_size:
            model_cfg["vision"]["img_size"] = int(img_size)
        return _finish(encoder, model_cfg, device)
    encoder, model_cfg = official.load_official_model(name_or_path, text=text, tokenizer=tokenizer, img_size=img_size)
    return _finish(encoder, model_cfg, device)
