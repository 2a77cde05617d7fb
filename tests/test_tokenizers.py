"""Tokenizers: the official-style SentencePiece tokenizer (a tiny model trained here) and BPE."""

import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.modules.tokenizers import SentencePieceTokenizer, build_tokenizer

SENTENCES = [
    "a red square next to a blue circle",
    "the small green triangle is above the large square",
    "an école building with a yellow roof",
    "École is a word with an accent",
    "two cats sit on a wooden table in the kitchen",
    "a photo of a dog running on the beach",
] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    # pad 0 as the official tokenizer is used (padding = id 0), no BOS/EOS pieces.
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=80, character_coverage=1.0,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    return folder / "tokenizer.model"


def test_sentencepiece_lowercases_pads_and_adds_no_specials(sp_model):
    import sentencepiece as spm

    tok = build_tokenizer("sentencepiece", path=str(sp_model), context_length=64)
    ids = tok(["A Red SQUARE", "a red square", "two cats"])
    assert ids.shape == (3, 64) and ids.dtype == torch.long
    assert torch.equal(ids[0], ids[1])
    raw = spm.SentencePieceProcessor(model_file=str(sp_model)).encode("a red square")
    assert ids[1, : len(raw)].tolist() == raw  # no BOS in front, nothing appended
    assert (ids[1, len(raw) :] == 0).all() and (ids[1, : len(raw)] != 0).all()
    assert tok.vocab_size == spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()


def test_sentencepiece_lowercases_ascii_only_like_tf_strings_lower(sp_model):
    tok = SentencePieceTokenizer(sp_model, context_length=16)
    assert torch.equal(tok("ÉCOLE"), tok("École"))  # only the ASCII letters changed
    assert not torch.equal(tok("École"), tok("école"))


def test_sentencepiece_truncates_to_context_length(sp_model):
    tok = SentencePieceTokenizer(sp_model, context_length=5)
    ids = tok(" ".join(SENTENCES[:3]))
    assert ids.shape == (1, 5) and (ids != 0).all()


def test_wrong_tokenizer_paths_are_clear_errors(tmp_path):
    with pytest.raises(TipslabError, match="no such SentencePiece model file"):
        build_tokenizer("sentencepiece", path=str(tmp_path / "missing.model"))
    junk = tmp_path / "tokenizer.model"
    junk.write_text("not a model")
    with pytest.raises(TipslabError, match="not a SentencePiece model") as err:
        build_tokenizer("sentencepiece", path=str(junk))
    assert "\n" not in str(err.value)
    with pytest.raises(TipslabError, match="needs model.tokenizer.path"):
        build_tokenizer("sentencepiece")
    with pytest.raises(TipslabError, match="not known"):
        build_tokenizer("wordpiece")


def test_bpe_pads_with_zero():
    tok = build_tokenizer("bpe", context_length=12)
    ids = tok(["a red square"])
    assert ids.shape == (1, 12) and ids[0, -1] == 0 and ids[0, 0] != 0
