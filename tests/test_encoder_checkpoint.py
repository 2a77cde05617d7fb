"""The image-text encoder and the tipslab checkpoint directory."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from tipslab.errors import TipslabError
from tipslab.modules.checkpoint import load_checkpoint, save_checkpoint
from tipslab.modules.encoder import ImageTextEncoder, build_encoder
from tipslab.modules.text import TextTower
from tipslab.modules.vision import VisionTower

MODEL_CFG = {
    "vision": {"size": "tiny", "img_size": 42, "drop_path_rate": 0.0},
    "text": {"size": "tiny", "vocab_size": 300, "context_length": 8},
    "tokenizer": {"kind": "bpe", "path": None, "context_length": 8},
    "temperature": 0.05,
}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder(OmegaConf.create(MODEL_CFG)).eval()


def test_build_encoder_from_config(encoder):
    assert encoder.vision.img_size == 42 and encoder.text.vocab_size == 300
    assert encoder.logit_scale.shape == (1,)
    assert encoder.logit_scale.item() == pytest.approx(math.log(1 / 0.05))
    assert encoder.temperature.item() == pytest.approx(0.05)
    images, ids = torch.rand(2, 3, 42, 42), torch.tensor([[5, 6, 0], [7, 0, 0]])
    with torch.no_grad():
        vision, text = encoder(images, ids)
        dense = encoder.encode_image(images, dense=True)
    assert vision.cls1.shape == text.shape == (2, 192)
    torch.testing.assert_close(vision.cls1, encoder.encode_image(images).cls1)
    torch.testing.assert_close(text, encoder.encode_text(ids))
    assert dense.patches.shape == vision.patches.shape == (2, 9, 192)
    assert (dense.patches - vision.patches).abs().max() > 1e-4


def test_mismatched_widths_are_an_error():
    with pytest.raises(TipslabError, match="vision width 384 != text width 192"):
        ImageTextEncoder(VisionTower("s", img_size=28), TextTower("tiny", vocab_size=10))
    bad = dict(MODEL_CFG, text=dict(MODEL_CFG["text"], size="s"))
    with pytest.raises(TipslabError, match="same width"):
        build_encoder(bad)
    with pytest.raises(TipslabError, match="dense"):
        build_encoder(MODEL_CFG).encode_image(torch.rand(1, 3, 42, 42), dense=True, mask=torch.zeros(1, 9, dtype=bool))


def test_round_trip_gives_identical_outputs(encoder, tmp_path):
    with torch.no_grad():
        encoder.logit_scale.fill_(2.5)  # a learned value, not the initial one
    target = tmp_path / "ckpt"
    save_checkpoint(encoder, OmegaConf.create(MODEL_CFG), target)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "model.yaml"]
    loaded, cfg = load_checkpoint(target)
    assert cfg == MODEL_CFG
    images, ids = torch.rand(2, 3, 56, 28), torch.tensor([[5, 6, 0], [7, 8, 9]])
    with torch.no_grad():
        a_img, a_txt = encoder(images, ids)
        b_img, b_txt = loaded.eval()(images, ids)
    assert torch.equal(a_img.patches, b_img.patches) and torch.equal(a_img.cls2, b_img.cls2)
    assert torch.equal(a_txt, b_txt)
    assert loaded.logit_scale.item() == pytest.approx(2.5)


def test_save_replaces_atomically(encoder, tmp_path):
    target = tmp_path / "ckpt"
    save_checkpoint(encoder, MODEL_CFG, target)
    other = build_encoder(MODEL_CFG)
    save_checkpoint(other, MODEL_CFG, target)
    # Only the new checkpoint is left: no temp or old directories beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _ = load_checkpoint(target)
    assert torch.equal(loaded.text.token_embedding.weight, other.text.token_embedding.weight)


def test_bad_checkpoints_are_clear_errors(encoder, tmp_path):
    with pytest.raises(TipslabError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TipslabError, match="not a tipslab checkpoint"):
        load_checkpoint(tmp_path / "empty")

    target = tmp_path / "ckpt"
    save_checkpoint(encoder, MODEL_CFG, target)
    state = load_file(str(target / "model.safetensors"))
    state.pop("vision.mask_token")
    state["text.extra"] = torch.zeros(1)
    state["logit_scale"] = torch.zeros(2)
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(TipslabError) as err:
        load_checkpoint(target)
    message = str(err.value)
    assert "1 missing: vision.mask_token" in message and "1 unexpected: text.extra" in message
    assert "logit_scale (2,) (expected (1,))" in message and "\n" not in message

    (target / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(TipslabError, match="not a readable safetensors"):
        load_checkpoint(target)
