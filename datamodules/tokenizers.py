"""Text tokenizers: open_clip's BPE for models trained here, SentencePiece for official TIPS models.

Both return `LongTensor [B, context_length]`, padded with id 0, which is what the TIPS text tower
treats as padding.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class BpeTokenizer:
    """open_clip's byte-pair tokenizer (ships its vocabulary; works offline)."""

    def __init__(self, context_length: int = 64):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self._tok.encoder)

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self._tok(list(texts), context_length=self.context_length).long()


def build_tokenizer(kind: str = "bpe", path: str | None = None, context_length: int = 64):
    """The tokenizer named by the `model.tokenizer` config block."""
    if kind == "bpe":
        return BpeTokenizer(context_length=context_length)
    raise ValueError(f"tokenizer kind {kind!r} is not known; expected one of: 'bpe'")
