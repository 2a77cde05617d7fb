"""Search: answers known by construction on planted vectors, then the whole path with a real model."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tipslab.errors import TipslabError
from tipslab.retrieval.extract import PatchRecord, SourceImage
from tipslab.retrieval.index_dir import write_index
from tipslab.retrieval.search import search_by_vectors

DIM, GH, GW, W, H = 16, 4, 5, 100, 80  # 20 x 20 px patch cells
MODEL = {"source": "synthetic", "path": None, "sha256": None, "model_cfg": None}


def unit(i):
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def planted_index(root, factory="Flat", n=6):
    """Background patches orthogonal to the query e0 (score 0); planted patches score 1, 0.9, 0.8."""
    rng = np.random.default_rng(0)
    q, u = unit(0), unit(1)
    records = []
    for i in range(n):
        vectors = rng.normal(size=(GH * GW, DIM)).astype(np.float32)
        vectors[:, 0] = 0.0
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        grid = vectors.reshape(GH, GW, DIM)
        if i == 3:
            grid[1, 2] = grid[1, 3] = q  # blob A: row 1, cols 2-3
            grid[3, 0] = 0.9 * q + np.sqrt(1 - 0.81) * u  # blob B: a separate patch
        if i == 5:
            grid[0, 0] = 0.8 * q + 0.6 * u
        path = root / f"img{i}.png"
        Image.new("RGB", (W, H), (128, 128, 128)).save(path)
        image = SourceImage(key=str(path), path=str(path), size=(W, H), pixels=torch.zeros(3, 28, 28))
        records.append(PatchRecord(image=image, grid=(GH, GW), vectors=grid.reshape(-1, DIM)))
    return write_index(records, root / "idx", factory=factory, image_size=28, model=MODEL, progress=False)


def test_planted_regions_are_found_with_their_boxes(tmp_path):
    index = planted_index(tmp_path)
    hits = search_by_vectors(index, unit(0)[None], k=5, queries=["thing"])
    assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    first, second, third = hits[:3]
    assert (first.image_id, first.box, first.num_patches) == (3, (40, 20, 80, 40), 2)
    assert first.score == pytest.approx(1.0, abs=2e-3)
    assert first.patch_mask.shape == (GH, GW) and first.patch_mask[1, 2] and first.patch_mask[1, 3]
    assert first.heatmap.shape == (GH, GW) and first.heatmap[1, 2] == pytest.approx(1.0, abs=2e-3)
    assert (second.image_id, second.box) == (3, (0, 60, 20, 80))  # the second blob of the same image
    assert second.score == pytest.approx(0.9, abs=2e-3)
    assert (third.image_id, third.box) == (5, (0, 0, 20, 20))
    assert third.score == pytest.approx(0.8, abs=2e-3)
    assert all(h.score < 0.05 for h in hits[3:])  # the rest are background
    assert first.image_path == str(tmp_path / "img3.png") and first.query == "thing"


def test_per_image_limit_and_several_queries(tmp_path):
    index = planted_index(tmp_path)
    hits = search_by_vectors(index, unit(0)[None], k=2, per_image=1)
    assert [(h.image_id, h.box) for h in hits] == [(3, (40, 20, 80, 40)), (5, (0, 0, 20, 20))]
    both = search_by_vectors(index, np.stack([unit(0), unit(0)]), k=2, queries=["a", "b"], per_image=1)
    assert [(h.query, h.rank, h.image_id) for h in both] == [("a", 1, 3), ("a", 2, 5), ("b", 1, 3), ("b", 2, 5)]


def test_compressed_factory_scores_are_rescored_exactly(tmp_path):
    # SQ8 codes only choose candidates; scores come from the stored float16 vectors.
    index = planted_index(tmp_path, factory="IVF2,SQ8")
    hits = search_by_vectors(index, unit(0)[None], k=3)
    assert [(h.image_id, h.box) for h in hits] == [(3, (40, 20, 80, 40)), (3, (0, 60, 20, 80)), (5, (0, 0, 20, 20))]
    assert [round(h.score, 3) for h in hits] == [1.0, 0.9, 0.8]


def test_query_dimension_mismatch_is_clear(tmp_path):
    index = planted_index(tmp_path, n=2)
    with pytest.raises(TipslabError, match="expected dim 16"):
        search_by_vectors(index, np.ones((1, 8), dtype=np.float32))


# ---------------------------------------------------------------- with a real (tiny, random) model

TINY = {"vision": {"size": "tiny", "img_size": 112, "drop_path_rate": 0.0},
        "text": {"size": "tiny", "vocab_size": 49408, "context_length": 32},
        "tokenizer": {"kind": "bpe", "path": None, "context_length": 32}, "temperature": 0.07}


def save_tiny(path, seed=0):
    from tipslab.modules.checkpoint import save_checkpoint
    from tipslab.modules.encoder import build_encoder

    torch.manual_seed(seed)
    return save_checkpoint(build_encoder(TINY), TINY, path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny")


def cli(*argv):
    import argparse

    from tipslab.retrieval.cli import add_index_parser, add_search_parser

    parser = argparse.ArgumentParser(prog="tipslab")
    sub = parser.add_subparsers(dest="command", required=True)
    add_index_parser(sub)
    add_search_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


FRESH_SEARCH = """
import argparse, sys
from tipslab.retrieval.cli import add_search_parser
parser = argparse.ArgumentParser(prog="tipslab")
add_search_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


@pytest.mark.slow
def test_index_scenes_then_search_in_a_fresh_process(tiny_model, tmp_path, capsys):
    import json
    import re
    import subprocess
    import sys

    from tipslab.retrieval.index_dir import sha256_file

    assert cli("index", tiny_model, "scenes:val", "--scenes-val", 8, "--out", tmp_path / "idx", "--quiet") == 0
    assert "8 images, 512 patch vectors of dim 192" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == sha256_file(tiny_model / "model.safetensors")
    assert manifest["model"]["model_cfg"]["vision"]["img_size"] == 112 and manifest["feature"] == "dense"
    from tipslab.datamodules.preprocess import Preprocessing

    assert manifest["preprocessing"] == Preprocessing(112).describe()  # the one preprocessing, as used

    # A fresh process, given only the directory and the text.
    run = subprocess.run([sys.executable, "-c", FRESH_SEARCH, "search", str(tmp_path / "idx"), "a red circle",
                          "--threshold", "0"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines()
            if re.match(r"\s*\d+\s+-?\d\.\d{4}\s+\d\.\d{3}\s+\(\d+,\d+,\d+,\d+\)\s+/", line)]
    assert len(rows) == 5, run.stdout
    for line in rows:
        x0, y0, x1, y1 = map(int, re.search(r"\((\d+),(\d+),(\d+),(\d+)\)", line).groups())
        assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112
        assert (tmp_path / "idx" / "images").as_posix() in line  # generated scenes were saved with the index
    out = tmp_path / "idx" / "search" / "a-red-circle"
    assert sorted(p.name for p in out.iterdir()) == [f"hit-0{i}.png" for i in range(1, 6)] + ["hits.png"]
    assert Image.open(out / "hit-01.png").size[0] >= 320


@pytest.mark.slow
def test_incremental_add_with_the_model(tiny_model, tmp_path):
    from tipslab.retrieval.index_dir import IndexDirectory
    from tipslab.retrieval.search import Searcher

    cli("index", tiny_model, "scenes:val:4", "--out", tmp_path / "idx", "--quiet")
    searcher = Searcher(tmp_path / "idx")
    before = searcher.search("a blue square", k=3, threshold=None)  # an untrained model: keep the top k
    old_map = {h.image_id: h.heatmap for h in before}

    assert cli("index", tiny_model, "scenes:val:6", "--out", tmp_path / "idx", "--add", "--quiet") == 0
    index = IndexDirectory.open(tmp_path / "idx")
    assert (index.num_images, index.num_vectors) == (6, 6 * 64)
    assert index.images["key"].to_list() == [f"scenes:val/{i:06d}" for i in range(6)]
    after = Searcher(index, loaded=searcher.loaded).search("a blue square", k=6, per_image=1, threshold=None)
    assert {h.image_id for h in after} == set(range(6))  # the new images are searchable
    for hit in after:
        if hit.image_id in old_map:  # old images score exactly as before
            np.testing.assert_array_equal(hit.heatmap, old_map[hit.image_id])
    # Adding the same scenes again adds nothing.
    assert IndexDirectory.open(tmp_path / "idx").add("scenes:val:6", loaded=searcher.loaded,
                                                     progress=False)["added"] == 0


@pytest.mark.slow
def test_index_carries_its_model_and_changed_weights_are_refused(tmp_path, capsys):
    model = save_tiny(tmp_path / "m", seed=1)
    cli("index", model, "scenes:val:2", "--out", tmp_path / "idx", "--quiet")
    assert sorted(p.name for p in (tmp_path / "idx" / "model").iterdir()) == ["model.safetensors", "model.yaml"]
    capsys.readouterr()
    shutil.copytree(model, tmp_path / "moved")  # the model moved elsewhere
    save_tiny(tmp_path / "m", seed=2)  # same path, retrained: the index still has the weights it was built with
    assert cli("search", tmp_path / "idx", "red circle", "--no-png", "--threshold", "0") == 0
    assert "region(s) for" in capsys.readouterr().out
    assert cli("search", tmp_path / "idx", "red circle", "--no-png", "--threshold", "1") == 0
    assert "note: only 0 of the 5 regions asked for reach confidence 1" in capsys.readouterr().out
    with pytest.raises(TipslabError, match="--model .* does not match the model the index"):
        cli("search", tmp_path / "idx", "red circle", "--no-png", "--model", tmp_path / "m")
    shutil.rmtree(tmp_path / "m")
    assert cli("search", tmp_path / "idx", "red circle", "--no-png", "--model", tmp_path / "moved") == 0
    save_tiny(tmp_path / "idx" / "model", seed=3)  # the copy itself tampered with
    with pytest.raises(TipslabError, match="the index's copy of its model"):
        cli("search", tmp_path / "idx", "red circle", "--no-png")
    with pytest.raises(TipslabError, match="not a tipslab index directory"):
        cli("search", tmp_path, "red circle")
