"""The Python API (`load_model`) and the `tipslab embed` command."""

import argparse
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from test_official import write_pair
from test_tokenizers import (
    sp_model,  # noqa: F401  (fixture: a tiny SentencePiece model trained there)
)

from tipslab.errors import TipslabError
from tipslab.modules import official
from tipslab.modules.api import Preprocess, load_model
from tipslab.modules.checkpoint import save_checkpoint
from tipslab.modules.encoder import build_encoder
from tipslab.platform import embed

MODEL_CFG = {
    "vision": {"size": "tiny", "img_size": 42, "drop_path_rate": 0.0},
    "text": {"size": "tiny", "vocab_size": 49408, "context_length": 16},
    "tokenizer": {"kind": "bpe", "path": None, "context_length": 16},
    "temperature": 0.07,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "ckpt"
    save_checkpoint(build_encoder(MODEL_CFG), MODEL_CFG, path)
    return path


def test_load_tipslab_checkpoint(checkpoint):
    model = load_model(checkpoint)
    assert not model.encoder.training
    assert model.model_cfg == MODEL_CFG
    ids = model.tokenizer(["a red square", "a blue circle"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    out = model.embed_images([image, np.asarray(image)])
    assert out.cls1.shape == (2, 192) and out.grid == (3, 3)
    torch.testing.assert_close(out.cls1[0], out.cls1[1])  # PIL and array inputs agree
    assert model.embed_texts(["a red square"]).shape == (1, 192)


def test_preprocess_resizes_bicubic_into_unit_range():
    pixels = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = Preprocess(28)(pixels)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    expected = np.asarray(Image.fromarray(pixels).resize((28, 28), Image.Resampling.BICUBIC)) / 255.0
    torch.testing.assert_close(out, torch.from_numpy(expected).permute(2, 0, 1).float())
    same = Preprocess(20)(np.zeros((20, 20), dtype=np.uint8))  # grayscale becomes RGB
    assert same.shape == (3, 20, 20) and same.abs().max() == 0
    with pytest.raises(TipslabError, match="uint8"):
        Preprocess(28)(np.zeros((4, 4, 3), dtype=np.float32))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(TipslabError):
        load_model(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------- official files
@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, sp_model):  # noqa: F811
    folder = tmp_path_factory.mktemp("official")
    write_pair(folder, "tiny", grid=4, vocab=200, temperature=0.03, stem="tips_v2_oss_t14")
    shutil.copy(sp_model, folder / "tokenizer.model")
    return folder


def test_load_official_directory_and_files(official_dir, tmp_path):
    model = load_model(official_dir)
    assert not model.encoder.training
    assert model.model_cfg["tokenizer"]["kind"] == "sentencepiece"
    assert model.preprocess.img_size == 56  # the 4x4 position grid's resolution
    assert model.encoder.temperature.item() == pytest.approx(0.03, rel=1e-6)
    ids = model.tokenizer(["A Red Square"])
    assert ids.shape == (1, 64) and ids[0, 0] != 0
    text = model.embed_texts(["a red square"])

    vision = official_dir / "tips_v2_oss_t14_vision.npz"
    explicit = load_model(vision, text=official_dir / "tips_v2_oss_t14_text.npz",
                          tokenizer=official_dir / "tokenizer.model", img_size=84)
    assert explicit.preprocess.img_size == 84
    torch.testing.assert_close(explicit.embed_texts(["a red square"]), text)

    hf_dir = tmp_path / "hf"
    official.export_hf_safetensors(model.encoder, hf_dir / "model.safetensors")
    shutil.copy(official_dir / "tokenizer.model", hf_dir / "tokenizer.model")
    from_hf = load_model(hf_dir / "model.safetensors")
    torch.testing.assert_close(from_hf.embed_texts(["a red square"]), text)
    image = torch.rand(1, 3, 56, 56)
    torch.testing.assert_close(from_hf.embed_images(image).patches, model.embed_images(image).patches)


def test_official_without_tokenizer_says_where_it_goes(tmp_path):
    write_pair(tmp_path, "tiny", stem="tips_v2_oss_t14")
    with pytest.raises(TipslabError, match="no tokenizer.model beside the official weights"):
        load_model(tmp_path)
    (tmp_path / "tokenizer.model").write_text("junk")
    with pytest.raises(TipslabError, match="not a SentencePiece model"):
        load_model(tmp_path)


def test_release_name_without_weights_dir(monkeypatch):
    monkeypatch.delenv("TIPSLAB_WEIGHTS_DIR", raising=False)
    with pytest.raises(TipslabError, match=r"TIPSLAB_WEIGHTS_DIR.*tipsv2-b14/"):
        load_model("tipsv2-b14")


# ----------------------------------------------------------------------------- tipslab embed
def _run_embed(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tipslab")
    embed.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["embed", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_embed_npz_matches_the_api(official_dir, image_dir, tmp_path):
    out = tmp_path / "emb.npz"
    assert _run_embed([str(official_dir), "--images", str(image_dir), "--texts", "a red square", "a dog",
                       "--patches", "--out", str(out)]) == 0
    data = np.load(out, allow_pickle=False)
    assert [p.rsplit("/", 1)[1] for p in data["image_paths"]] == ["a.jpg", "b.png"]
    assert data["image_cls1"].shape == (2, 192) and data["text"].shape == (2, 192)
    assert data["patches"].shape == (2, 16, 192) and data["patch_grid"].tolist() == [4, 4]
    np.testing.assert_allclose(np.linalg.norm(data["image_cls1"], axis=1), 1.0, rtol=1e-5)
    model = load_model(official_dir)
    expected = torch.nn.functional.normalize(model.embed_images([Image.open(image_dir / "a.jpg")]).cls1, dim=-1)
    np.testing.assert_allclose(data["image_cls1"][0], expected[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(data["temperature"], 0.03, rtol=1e-6)


def test_embed_parquet_from_manifest_with_dense_patches(checkpoint, image_dir, tmp_path):
    manifest = image_dir / "manifest.parquet"
    pl.DataFrame({"image_path": ["a.jpg", "b.png"]}).write_parquet(manifest)
    out = tmp_path / "emb.parquet"
    assert _run_embed([str(checkpoint), "--manifest", str(manifest), "--texts", "a red square", "--dense",
                       "--raw", "--out", str(out)]) == 0
    table = pl.read_parquet(out)
    counts = dict(table.group_by("kind").len().iter_rows())
    assert counts == {"image_cls1": 2, "image_cls2": 2, "patch": 2 * 9, "text": 1}
    patches = table.filter(pl.col("kind") == "patch")
    assert patches["patch_row"].max() == 2 and patches["patch_col"].max() == 2
    model = load_model(checkpoint)
    dense = model.embed_images([Image.open(image_dir / "a.jpg")], dense=True).patches[0]
    first = patches.filter(pl.col("source").str.ends_with("a.jpg"))["embedding"].to_numpy()
    np.testing.assert_allclose(first, dense.numpy(), atol=1e-5)  # --raw: not normalised


def test_embed_bad_arguments(checkpoint, image_dir, tmp_path):
    with pytest.raises(TipslabError, match="expected a .npz or .parquet"):
        _run_embed([str(checkpoint), "--texts", "x", "--out", str(tmp_path / "e.csv")])
    with pytest.raises(TipslabError, match="nothing to embed"):
        _run_embed([str(checkpoint), "--out", str(tmp_path / "e.npz")])
    with pytest.raises(TipslabError, match="no such file or folder"):
        _run_embed([str(checkpoint), "--images", str(tmp_path / "nope.png"), "--out", str(tmp_path / "e.npz")])
    with pytest.raises(TipslabError, match="none of the 1 image"):  # unreadable ones are skipped
        _run_embed([str(checkpoint), "--images", str(image_dir / "notes.txt"), "--out", str(tmp_path / "e.npz")])
    assert not list(tmp_path.iterdir())  # nothing half-written
