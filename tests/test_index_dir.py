"""The index directory: layout, validation, overwrite, incremental add and crash recovery.

Built from synthetic patch records (no model needed); the model-backed path is covered in
test_search.py.
"""

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.retrieval.extract import PatchRecord, SourceImage
from tipslab.retrieval.index_dir import IndexDirectory, write_index

DIM, GRID = 8, (2, 3)
MODEL = {"source": "synthetic", "path": None, "sha256": None, "model_cfg": None}


def records(n, start=0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        vectors = rng.normal(size=(GRID[0] * GRID[1], DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        image = SourceImage(key=f"/data/img{i}.png", path=f"/data/img{i}.png", size=(30 + i, 20),
                            pixels=torch.zeros(3, 28, 28))
        out.append(PatchRecord(image=image, grid=GRID, vectors=vectors))
    return out


def build(path, n=3, **kwargs):
    return write_index(records(n), path, image_size=28, model=MODEL, progress=False, **kwargs)


def test_layout_tables_and_manifest(tmp_path):
    index = build(tmp_path / "idx")
    names = {p.name for p in (tmp_path / "idx").iterdir()}
    assert {"manifest.json", "index.faiss", "metadata.parquet", "images.parquet", "vectors"} <= names
    assert not list(tmp_path.glob(".idx.building-*"))  # the temp build dir was renamed away
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["counts"] == {"images": 3, "vectors": 18, "skipped": 0}
    assert manifest["dim"] == DIM and manifest["metric"] == "inner_product" and manifest["normalisation"] == "l2"
    meta = pl.read_parquet(tmp_path / "idx" / "metadata.parquet")
    assert meta.columns == ["vector_id", "image_id", "image_path", "image_width", "image_height",
                            "grid_h", "grid_w", "patch_row", "patch_col"]
    assert meta["vector_id"].to_list() == list(range(18))
    # image 1's fifth vector (index 4) sits at row 1, col 1 of its 2x3 grid
    row = meta.row(6 + 4, named=True)
    assert (row["image_id"], row["patch_row"], row["patch_col"], row["image_width"]) == (1, 1, 1, 31)
    # stored vectors reproduce the inputs (float16) and FAISS finds each one as its own best match
    original = records(3)[2].vectors
    assert np.allclose(index.image_vectors(2), original, atol=2e-3)
    scores, ids = index.search_vectors(original[:1], 1)
    assert ids[0, 0] == 12 and scores[0, 0] == pytest.approx(1.0, abs=2e-3)
    assert index.image_ids_of([0, 5, 6, 17, -1]).tolist() == [0, 0, 1, 2, -1]


def test_not_an_index_directory(tmp_path):
    (tmp_path / "stuff.txt").write_text("hello")
    with pytest.raises(TipslabError, match=r"is not a tipslab index directory: missing manifest.json \(expected files: "):
        IndexDirectory.open(tmp_path)
    with pytest.raises(TipslabError, match="does not exist"):
        IndexDirectory.open(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(TipslabError, match="manifest.json: is not valid JSON"):
        IndexDirectory.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TipslabError, match="'format' is not 'tipslab-index'"):
        IndexDirectory.open(tmp_path)


def test_missing_file_named(tmp_path):
    build(tmp_path / "idx")
    (tmp_path / "idx" / "metadata.parquet").unlink()
    with pytest.raises(TipslabError, match="missing metadata.parquet"):
        IndexDirectory.open(tmp_path / "idx")


def test_existing_out_needs_overwrite(tmp_path):
    build(tmp_path / "idx", n=2)
    with pytest.raises(TipslabError, match="already exists; pass --overwrite"):
        build(tmp_path / "idx", n=4)
    index = build(tmp_path / "idx", n=4, overwrite=True)
    assert index.num_images == 4 and IndexDirectory.open(tmp_path / "idx").num_vectors == 24
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp or old copies left behind


def test_empty_records_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(TipslabError, match="holds no readable images"):
        write_index([], tmp_path / "idx", image_size=28, model=MODEL, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ivf_factory_is_trained_and_too_few_vectors_is_clear(tmp_path):
    index = build(tmp_path / "ivf", n=4, factory="IVF2,Flat")
    assert index.manifest["search_params"] == "nprobe=2"
    probe = records(4)[3].vectors[2:3]
    _, ids = index.search_vectors(probe, 1)
    assert ids[0, 0] == 3 * 6 + 2
    with pytest.raises(TipslabError, match="needs at least 64 vectors"):
        build(tmp_path / "big", n=2, factory="IVF64,Flat")
    with pytest.raises(TipslabError, match="--factory 'NotAFactory'"):
        build(tmp_path / "bad", n=2, factory="NotAFactory")


def test_incremental_add_keeps_old_results(tmp_path):
    index = build(tmp_path / "idx", n=3)
    probe = records(3)[1].vectors[3:4]
    before = index.search_vectors(probe, 3)
    counts = index.add_records(records(3, start=2, seed=7), progress=False)  # img2 is a repeat
    assert counts == {"added": 2, "already_indexed": 1, "skipped": 0}
    reopened = IndexDirectory.open(tmp_path / "idx")
    assert (reopened.num_images, reopened.num_vectors) == (5, 30)
    assert reopened.images["image_id"].to_list() == [0, 1, 2, 3, 4]
    assert reopened.images["first_vector_id"].to_list() == [0, 6, 12, 18, 24]
    meta = reopened.metadata
    assert len(meta) == 30 and meta["vector_id"].to_list() == list(range(30))
    assert meta.filter(pl.col("image_id") == 4)["image_path"].unique().to_list() == ["/data/img4.png"]
    after = reopened.search_vectors(probe, 3)
    assert after[1][0, 0] == before[1][0, 0] == 6 + 3
    new_vector = records(3, start=2, seed=7)[2].vectors[0]  # img4's first patch
    assert reopened.search_vectors(new_vector[None], 1)[1][0, 0] == 24
    assert np.allclose(reopened.image_vectors(4)[0], new_vector, atol=2e-3)
    assert len(reopened.manifest["sources"]) == 2


def test_interrupted_add_before_and_after_commit_point(tmp_path):
    """A kill before the journal loses only the new images; after it, the add is finished on open."""
    build(tmp_path / "old", n=3)
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    IndexDirectory.open(tmp_path / "new").add_records(records(2, start=3, seed=5), progress=False)

    # State of a kill after the new files were written, before the journal: *.pending files only.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "old", crashed)
    for name in ("index.faiss", "images.parquet", "metadata.parquet", "manifest.json"):
        shutil.copy(tmp_path / "new" / name, crashed / f"{name}.pending")
    shutil.copy(tmp_path / "new" / "vectors" / "part-00001.npy", crashed / "vectors" / "part-00001.npy")
    assert IndexDirectory.open(crashed).num_images == 3  # the old index, whole
    # ...and the next add starts clean: pending leftovers removed, the part name reused.
    IndexDirectory.open(crashed).add_records(records(1, start=9), progress=False)
    assert not list(crashed.glob("*.pending"))
    assert IndexDirectory.open(crashed).num_images == 4

    # State of a kill right after the journal was written: open() completes the renames.
    committed = tmp_path / "committed"
    shutil.copytree(tmp_path / "old", committed)
    for name in ("index.faiss", "images.parquet", "metadata.parquet", "manifest.json"):
        shutil.copy(tmp_path / "new" / name, committed / f"{name}.pending")
    shutil.copy(tmp_path / "new" / "vectors" / "part-00001.npy", committed / "vectors" / "part-00001.npy")
    renames = {name: f"{name}.pending" for name in ("index.faiss", "images.parquet", "metadata.parquet", "manifest.json")}
    (committed / ".commit.json").write_text(json.dumps({"renames": renames}))
    shutil.move(committed / "index.faiss.pending", committed / "index.faiss")  # one rename had happened
    reopened = IndexDirectory.open(committed)
    assert (reopened.num_images, reopened.num_vectors, reopened.index.ntotal) == (5, 30, 30)
    assert not (committed / ".commit.json").exists() and not list(committed.glob("*.pending"))


# ---------------------------------------------------------------- folders, with a real (tiny, random) model

TINY = {"vision": {"size": "tiny", "img_size": 112, "drop_path_rate": 0.0},
        "text": {"size": "tiny", "vocab_size": 49408, "context_length": 32},
        "tokenizer": {"kind": "bpe", "path": None, "context_length": 32}, "temperature": 0.07}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tipslab.modules.checkpoint import save_checkpoint
    from tipslab.modules.encoder import build_encoder

    torch.manual_seed(0)
    return save_checkpoint(build_encoder(TINY), TINY, tmp_path_factory.mktemp("model") / "tiny")


def run_cli(*argv):
    import argparse

    from tipslab.retrieval.cli import add_index_parser

    parser = argparse.ArgumentParser(prog="tipslab")
    add_index_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_empty_folder_is_a_clear_error(tiny_model, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    with pytest.raises(TipslabError, match="no images found"):
        run_cli("index", tiny_model, tmp_path / "photos", "--out", tmp_path / "idx", "--quiet")
    assert not (tmp_path / "idx").exists()


def test_reduced_decoding_is_recorded_and_followed_by_add(tiny_model, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):  # 4x the model's 112 px: decoded at 1/4 when reduced
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).resize((896, 896)).save(
            photos / f"{name}.jpg", quality=90)
    assert run_cli("index", tiny_model, photos, "--out", tmp_path / "full", "--quiet") == 0
    assert run_cli("index", tiny_model, photos, "--out", tmp_path / "reduced", "--decode", "reduced", "--quiet") == 0
    full, reduced = IndexDirectory.open(tmp_path / "full"), IndexDirectory.open(tmp_path / "reduced")
    assert (full.manifest["preprocessing"]["decode"], reduced.manifest["preprocessing"]["decode"]) == ("full", "reduced")
    assert reduced.images["image_width"].to_list() == [896, 896]  # boxes still map to the full picture
    assert not np.array_equal(full.image_vectors(0), reduced.image_vectors(0))
    cosine = (full.image_vectors(0).astype(np.float32) * reduced.image_vectors(0).astype(np.float32)).sum(-1)
    assert cosine.mean() > 0.99  # the same picture, decoded a little differently (0.998 measured)
    # `tipslab embed --decode reduced` gives the reduced index's vectors (and its default, the full one's).
    import argparse

    from tipslab.platform import embed

    parser = argparse.ArgumentParser(prog="tipslab")
    embed.add_parser(parser.add_subparsers(dest="command", required=True))
    for decode, index in (("reduced", reduced), ("full", full)):
        out = tmp_path / f"{decode}.npz"
        args = parser.parse_args(["embed", str(tiny_model), "--images", str(photos / "a.jpg"), "--dense",
                                  "--decode", decode, "--quiet", "--out", str(out)])
        assert args.func(args) == 0
        np.testing.assert_allclose(np.load(out)["patches"][0], index.image_vectors(0).astype(np.float32), atol=2e-3)
    with pytest.raises(TipslabError, match="built with --decode reduced; added images are decoded the same way"):
        run_cli("index", tiny_model, photos, "--out", tmp_path / "reduced", "--add", "--decode", "full", "--quiet")
    # --add follows the index's own decoding: a new copy of a.jpg gets a.jpg's reduced vectors.
    (photos / "c.jpg").write_bytes((photos / "a.jpg").read_bytes())
    assert run_cli("index", tiny_model, photos, "--out", tmp_path / "reduced", "--add", "--quiet") == 0
    reduced = IndexDirectory.open(tmp_path / "reduced")
    ids = dict(zip(reduced.images["key"].to_list(), reduced.images["image_id"].to_list()))
    assert np.array_equal(reduced.image_vectors(ids[str(photos / "c.jpg")]), reduced.image_vectors(ids[str(photos / "a.jpg")]))


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_folder_index_skips_and_counts_unreadable_images(tiny_model, tmp_path, capsys):
    from PIL import Image

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (200, 100), (200, 30, 30)).save(photos / "wide.png")
    Image.new("RGB", (60, 90), (30, 200, 30)).save(photos / "sub" / "tall.jpg")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert run_cli("index", tiny_model, photos, "--out", tmp_path / "idx", "--batch-size", 1) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in out and "2 images, 128 patch vectors" in out and "1 skipped" in out
    index = IndexDirectory.open(tmp_path / "idx")
    assert index.manifest["counts"] == {"images": 2, "vectors": 128, "skipped": 1}
    assert index.manifest["skipped"][0]["path"] == str(photos / "broken.png")
    assert "cannot read image" in index.manifest["skipped"][0]["reason"]
    images = index.images
    assert images["image_path"].to_list() == [str(photos / "sub" / "tall.jpg"), str(photos / "wide.png")]
    assert (images["image_width"].to_list(), images["image_height"].to_list()) == ([60, 200], [90, 100])
    assert images["grid_h"].to_list() == [8, 8]
    # --add of the same folder, now with one more image: only the new one is encoded
    Image.new("RGB", (50, 50), (30, 30, 200)).save(photos / "new.png")
    assert run_cli("index", tiny_model, photos, "--out", tmp_path / "idx", "--add", "--decode-workers", "1",
                   "--quiet") == 0
    assert "added 1 image(s)" in capsys.readouterr().out
    index = IndexDirectory.open(tmp_path / "idx")
    assert index.num_images == 3 and index.manifest["counts"]["skipped"] == 1  # broken.png listed once
    assert [s["skipped"] for s in index.manifest["sources"]] == [1, 1]
