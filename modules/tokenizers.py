"""Text tokenizers: open_clip's BPE for models trained here, SentencePiece for official TIPS models.

Both return `LongTensor [B, context_length]`, padded with id 0, which is what the TIPS text tower
treats as padding.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tipslab.errors import TipslabError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS = ("bpe", "sentencepiece")


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


# The official tokenizer lower-cases with tf.strings.lower, which (without an encoding) changes
# ASCII letters only; str.lower() would also change e.g. "É" and give other ids.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class SentencePieceTokenizer:
    """The official TIPS tokenizer: a SentencePiece `tokenizer.model`, lower-cased input, no BOS/EOS,
    truncated or padded with id 0 to `context_length` (64 in the official code)."""

    def __init__(self, path: str | os.PathLike, context_length: int = 64):
        import sentencepiece as spm

        path = Path(path).expanduser()
        if not path.is_file():
            raise TipslabError(f"model.tokenizer.path={path}: no such SentencePiece model file (tokenizer.model)")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TipslabError(f"model.tokenizer.path={path}: not a SentencePiece model ({message})") from None
        self.path = path
        self.context_length = int(context_length)
        self.vocab_size = self._sp.get_piece_size()

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        pieces = self._sp.encode([text.translate(_ASCII_LOWER) for text in texts], add_bos=False, add_eos=False)
        out = torch.zeros(len(pieces), self.context_length, dtype=torch.long)
        for row, ids in enumerate(pieces):
            ids = ids[: self.context_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def build_tokenizer(kind: str = "bpe", path: str | None = None, context_length: int = 64):
    """The tokenizer named by the `model.tokenizer` config block."""
    if kind == "bpe":
        return BpeTokenizer(context_length=context_length)
    if kind == "sentencepiece":
        if not path:
            raise TipslabError("model.tokenizer.kind=sentencepiece needs model.tokenizer.path (a tokenizer.model file)")
        return SentencePieceTokenizer(path, context_length=context_length)
    raise TipslabError(f"model.tokenizer.kind={kind!r} is not known; expected one of: {', '.join(KINDS)}")
