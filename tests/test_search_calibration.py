"""Query side of search: prompt templates that read right, calibrated confidence with a threshold
(an absent query returns nothing even when its raw cosine is higher), and `tipslab.search`."""

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from test_search import save_tiny

import tipslab
from tipslab.retrieval.extract import PatchRecord, SourceImage
from tipslab.retrieval.index_dir import build_index, write_index
from tipslab.retrieval.search import DEFAULT_TEMPLATES, prompts_for, search_by_vectors

DIM, GH, GW = 8, 3, 3


def test_templates_do_not_double_the_article():
    prompts = prompts_for("a red circle")
    assert "a photo of a red circle." in prompts and "a photo of the red circle." in prompts
    assert prompts[0] == "a red circle"  # the bare template keeps the user's words
    assert not any(" a a " in p or " a the " in p or "the a " in p for p in prompts)
    assert "a photo of an orange square." in prompts_for("orange square")
    assert "there is an orange square in the scene." in prompts_for("an orange square")
    assert prompts_for("the blue star")[1:] == prompts_for("blue star")[1:]  # the article goes, the rest agrees
    assert "a photo of a blue star." in prompts_for("the blue star")
    assert prompts_for("a photo of a dog on a beach") == ["a photo of a dog on a beach"]  # already a caption
    assert prompts_for("Two dogs.") == ["Two dogs."]
    assert len(prompts_for("red circle")) == len(DEFAULT_TEMPLATES)


def unit(*weights):
    v = np.zeros(DIM, dtype=np.float32)
    for i, w in weights:
        v[i] = w
    return v / np.linalg.norm(v)


def background_index(root):
    """Every patch is "background" (e4) except one planted patch 0.6 e0 + 0.8 e5 in image 2."""
    records = []
    for i in range(4):
        grid = np.tile(unit((4, 1.0)), (GH * GW, 1))
        if i == 2:
            grid[4] = unit((0, 0.6), (5, 0.8))
        path = root / f"img{i}.png"
        Image.new("RGB", (42, 42)).save(path)
        image = SourceImage(key=str(path), path=str(path), size=(42, 42), pixels=torch.zeros(3, 42, 42))
        records.append(PatchRecord(image=image, grid=(GH, GW), vectors=grid))
    model = {"source": "synthetic", "path": None, "sha256": None, "model_cfg": None}
    return write_index(records, root / "idx", image_size=42, model=model, progress=False)


def test_absent_query_with_a_higher_cosine_gives_no_hit_once_calibrated(tmp_path):
    index = background_index(tmp_path)
    present = unit((0, 1.0))  # in the index: one patch, cosine 0.6
    absent = unit((4, 1.0), (6, 1.0))  # nowhere, but cosine 0.71 with every background patch
    nulls = unit((4, 1.0))[None]  # a background prompt
    raw_present = search_by_vectors(index, present[None], k=3)
    raw_absent = search_by_vectors(index, absent[None], k=3)
    assert raw_absent[0].score > raw_present[0].score  # the defect: raw cosine ranks the absent query higher

    kept = search_by_vectors(index, np.stack([present, absent]), k=3, queries=["present", "absent"],
                             null_vectors=nulls, logit_scale=1 / 0.07, threshold=0.5)
    assert [(h.query, h.image_id, h.box) for h in kept] == [("present", 2, (14, 14, 28, 28))]
    assert kept[0].confidence > 0.99 and kept[0].score == pytest.approx(0.6, abs=2e-3)
    everything = search_by_vectors(index, absent[None], k=3, null_vectors=nulls, logit_scale=1 / 0.07)
    # No threshold: top k. Searched relative to the background prompt, the best "absent" region is
    # the planted patch, where query and background tie (confidence 0.5, not a match); the rest is low.
    assert len(everything) == 3 and everything[0].image_id == 2 and everything[0].confidence == pytest.approx(0.5)
    assert all(h.confidence < 0.05 for h in everything[1:])


def test_python_api_returns_a_dataframe(tmp_path):
    model = save_tiny(tmp_path / "model")
    build_index(model, "scenes:val:4", tmp_path / "idx", progress=False)
    frame = tipslab.search(tmp_path / "idx", "a red circle", k=3, threshold=None, heatmap=True)
    assert isinstance(frame, pl.DataFrame) and frame.height == 3
    assert frame.columns == ["query", "rank", "image", "image_key", "image_id", "box", "score", "confidence",
                             "heatmap"]
    assert frame["rank"].to_list() == [1, 2, 3] and frame["box"].dtype == pl.Array(pl.Int64, 4)
    assert np.asarray(frame["heatmap"][0].to_list()).shape == (8, 8)  # 112 px / 14 px patches
    assert frame["confidence"].is_between(0, 1).all() and not frame["score"].has_nulls()
    assert frame["image"].str.ends_with(".png").all()
    # A threshold no region reaches: no rows, the same columns (without heatmaps unless asked).
    empty = tipslab.search(tmp_path / "idx", ["a red circle", "a blue square"], k=3, threshold=1.0)
    assert empty.height == 0 and empty.columns == frame.columns[:-1]
