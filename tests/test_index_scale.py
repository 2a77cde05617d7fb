"""Index at scale, kept small: the factory chosen from size and memory budget, nprobe and the
re-scored candidates tuned to a recall target and stored in the manifest, and k x k pooling."""

import numpy as np
import pytest
import torch

from tipslab.errors import TipslabError
from tipslab.retrieval.extract import PatchRecord, SourceImage
from tipslab.retrieval.factory_choice import choose_factory
from tipslab.retrieval.index_dir import IndexDirectory, write_index
from tipslab.retrieval.pooling import pool_vectors
from tipslab.retrieval.tuning import heldout_queries, recall_at_k, tune_nprobe
from tipslab.retrieval.vector_store import exact_top_k

MODEL = {"source": "synthetic", "path": None, "sha256": None, "model_cfg": None}


def clustered_records(images, grid, dim, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    for i in range(images):
        vectors = centres[rng.integers(0, 64, grid[0] * grid[1])] + 0.4 * rng.standard_normal(
            (grid[0] * grid[1], dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield PatchRecord(image=SourceImage(key=f"img{i}", path=f"/x/img{i}.png", size=(64, 64),
                                            pixels=torch.zeros(3, 1, 1)), grid=grid, vectors=vectors)


def test_factory_follows_size_and_budget():
    assert choose_factory(50_000, 768).factory == "Flat"  # small: exact
    one_m = choose_factory(1_000_000, 768)  # default 100 B/vector: 4-bit PQ, 6 dims per sub-quantizer
    assert one_m.factory == "IVF4096,PQ128x4fs" and one_m.code_bytes + 8 <= 100
    assert choose_factory(10_000_000, 768).factory == "IVF16384_HNSW32,PQ128x4fs"  # HNSW coarse quantizer
    assert choose_factory(1_000_000, 768, memory_budget=1000 * 1_000_000).factory == "IVF4096,SQ8"
    tight = choose_factory(1_000_000, 768, memory_budget=40 * 1_000_000)  # 12+ dims per sub-quantizer: OPQ
    assert tight.factory == "OPQ32,IVF4096,PQ32x4fs"  # 40 - 8 B id - 12.6 B of centroids: 32 x 4 bits
    assert choose_factory(2000, 768, memory_budget=100 * 2000).nlist * 39 <= 2000  # enough points per list
    with pytest.raises(TipslabError, match="below the smallest code"):
        choose_factory(1_000_000, 768, memory_budget=8 * 1_000_000)


def test_tune_nprobe_finds_the_smallest_reaching_the_target():
    recall_of = {1: 0.5, 2: 0.7, 4: 0.9, 8: 0.97, 16: 0.99, 5: 0.92, 6: 0.96, 7: 0.965}
    truth = np.arange(10)[None]

    def search(queries, nprobe):  # a fake FAISS whose recall grows with nprobe
        hits = int(round(recall_of[nprobe] * 100))
        return np.array([[*range(10)] if hits >= 95 else [*range(9), 99]])

    nprobe, recall, tried = tune_nprobe(search, 64, np.zeros((1, 4)), truth, k=10, target=0.95)
    assert nprobe == 6 and recall == 1.0 and [n for n, _ in tried] == [1, 2, 4, 5, 6, 8]


def test_auto_index_tunes_to_the_target_and_records_it(tmp_path):
    dim, grid = 32, (8, 8)
    records = list(clustered_records(320, grid, dim))  # 20480 vectors
    index = write_index(iter(records), tmp_path / "idx", factory="auto", bytes_per_vector=20,
                        image_size=112, model=MODEL, progress=False, recall_target=0.9)
    manifest = index.manifest
    assert manifest["factory"].startswith("IVF") and "PQ" in manifest["factory"]
    tuning = manifest["tuning"]
    assert tuning["recall"] >= 0.9 and manifest["search_params"] == f"nprobe={tuning['nprobe']}"
    assert manifest["rerank"] == tuning["rerank"] > 0 and manifest["factory_choice"]["requested"] == "auto"
    assert tuning["seconds"] > 0  # timed, as every candidate count reaching the target is, to keep the fastest
    # fresh held-out queries: the tuned search keeps (near) the target, and raw FAISS order is re-scored
    rng = np.random.default_rng(5)
    queries = heldout_queries(index.store.sample(5000, rng), 50, rng)
    truth = exact_top_k(index.store, queries, 10)
    reopened = IndexDirectory.open(tmp_path / "idx")
    scores, ids = reopened.search_vectors(queries, 10)
    assert recall_at_k(ids, truth, 10) >= 0.85
    exact = np.einsum("qkd,qd->qk", reopened.store.take(ids.ravel()).reshape(50, 10, dim), queries)
    np.testing.assert_allclose(scores, exact, atol=1e-5)  # scores are exact, not PQ estimates
    # nprobe=1 is worse than the tuned setting: the tuning mattered
    one = recall_at_k(reopened.search_vectors(queries, 10, params="nprobe=1")[1], truth, 10)
    assert one < recall_at_k(ids, truth, 10)


def test_pooling_is_recorded_and_applied_on_add(tmp_path):
    records = list(clustered_records(3, (4, 6), 16))
    index = write_index(iter(records[:2]), tmp_path / "idx", image_size=56, model=MODEL, progress=False, pool=2)
    assert index.manifest["pooling"] == 2 and index.num_vectors == 2 * 2 * 3
    info = index.image_info(0)
    assert (info["grid_h"], info["grid_w"]) == (2, 3)
    top_left = records[0].vectors.reshape(4, 6, 16)[:2, :2].reshape(4, 16).mean(axis=0)
    np.testing.assert_allclose(index.image_vectors(0)[0], top_left / np.linalg.norm(top_left), atol=2e-3)
    index.add_records(records[2:], progress=False)
    reopened = IndexDirectory.open(tmp_path / "idx")
    assert reopened.num_vectors == 3 * 6 and reopened.image_info(2)["grid_w"] == 3
    odd, grid = pool_vectors(records[0].vectors[:15], (3, 5), 2)  # edges: a partial cell averages what it holds
    assert grid == (2, 3) and odd.shape == (6, 16)
    np.testing.assert_allclose(np.linalg.norm(odd, axis=1), 1.0, atol=1e-5)


def test_hnsw_quantizer_breadth_is_recorded_and_applied(tmp_path):
    index = write_index(clustered_records(40, (8, 8), 16), tmp_path / "idx", factory="IVF32_HNSW32,Flat",
                        image_size=112, model=MODEL, progress=False, train_size=2560)
    assert index.manifest["search_params"] == "nprobe=16,quantizer_efSearch=64"
    reopened = IndexDirectory.open(tmp_path / "idx")
    reopened.search_vectors(np.ones((1, 16), dtype=np.float32), 5, params="nprobe=20,quantizer_efSearch=90")
    import faiss

    ivf = faiss.extract_index_ivf(reopened.index)
    assert (ivf.nprobe, faiss.downcast_index(ivf.quantizer).hnsw.efSearch) == (20, 90)


def test_heldout_query_pool_keeps_a_fixed_share_of_large_collections():
    from tipslab.retrieval.tuning import pool_size

    assert pool_size(5_000) == 5_000  # small: every vector
    assert pool_size(1_000_000) == 20_000  # the floor
    assert pool_size(10_000_000) == 200_000  # 1 in 50: the same neighbourhood per query as at 1M
    assert pool_size(10**9) == 500_000  # capped (RAM)
