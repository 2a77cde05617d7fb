"""Re-scoring compressed candidates: a query whose exact top-k lies deep in the codes' list is
searched deeper, a well-ordered one is not, and deleted vectors stay out either way."""

import numpy as np

from tipslab.retrieval.candidates import DEEPEN_MAX, search_candidates
from tipslab.retrieval.vector_store import PartWriter, VectorStore


def make_store(tmp_path, n=2000, dim=16, seed=0):
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    writer = PartWriter(tmp_path / "vectors", first_part=0)
    writer.add(vectors)
    writer.finish()
    return VectorStore(tmp_path, writer.parts, dim), vectors.astype(np.float16).astype(np.float32)


class OrderedSearch:
    """A FAISS-like search over all vectors in a fixed order per query, counting the rows fetched:
    ``worst_first`` stands for codes that cannot tell a neighbourhood apart."""

    def __init__(self, vectors, worst_first, noise=0.0):
        self.vectors, self.worst_first, self.noise, self.fetched = vectors, worst_first, noise, []

    def __call__(self, queries, n):
        scores = queries @ self.vectors.T
        coded = scores + self.noise * np.random.default_rng(1).standard_normal(scores.shape)  # a code's error
        order = np.argsort(coded if self.worst_first else -coded, axis=1, kind="stable")[:, :n]
        self.fetched.append(n)
        return np.take_along_axis(scores, order, axis=1), order.astype(np.int64)


def exact(vectors, queries, k):
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def test_well_ordered_candidates_are_fetched_once(tmp_path):
    store, vectors = make_store(tmp_path)
    queries = vectors[:5] + 0.01
    search = OrderedSearch(vectors, worst_first=False)
    _, ids = search_candidates(search, store, queries, 10, total=len(vectors), rerank=100)
    assert search.fetched == [100]
    np.testing.assert_array_equal(ids, exact(vectors, queries, 10))


def test_a_top_k_deep_in_the_list_is_searched_deeper_up_to_the_limit(tmp_path):
    store, vectors = make_store(tmp_path)
    queries = vectors[:3]
    search = OrderedSearch(vectors, worst_first=True)
    _, ids = search_candidates(search, store, queries, 10, total=len(vectors), rerank=100)
    assert search.fetched == [100, 400, 1600]  # 4x each time, until DEEPEN_MAX x the tuned 100
    assert 1600 == DEEPEN_MAX * 100
    search.fetched.clear()
    _, ids = search_candidates(search, store, queries, 10, total=len(vectors), rerank=200)
    assert search.fetched == [200, 800, 2000]  # capped at the collection
    np.testing.assert_array_equal(ids, exact(vectors, queries, 10))


def test_only_the_deep_queries_are_searched_again(tmp_path):
    store, vectors = make_store(tmp_path)
    good, bad = OrderedSearch(vectors, False), OrderedSearch(vectors, True)
    rows = []

    def mixed(queries, n):  # query 0 gets good codes, the others bad ones
        rows.append(len(queries))
        first = good(queries[:1], n) if len(queries) == 3 else None
        out = bad(queries, n)
        if first is not None:
            out[0][0], out[1][0] = first[0][0], first[1][0]
        return out

    queries = vectors[10:13]
    _, ids = search_candidates(mixed, store, queries, 10, total=len(vectors), rerank=500)
    assert rows == [3, 2]  # the second search is for the two deep queries alone
    np.testing.assert_array_equal(ids, exact(vectors, queries, 10))


def test_deleted_vectors_stay_out_when_searching_deeper(tmp_path):
    store, vectors = make_store(tmp_path)
    queries = vectors[:2]
    truth = exact(vectors, queries, 10)
    deleted = truth[:, :3].ravel()
    search = OrderedSearch(vectors, worst_first=True)
    _, ids = search_candidates(search, store, queries, 10, total=len(vectors), rerank=500,
                               dead=lambda i: np.isin(i, deleted))
    assert not np.isin(ids, deleted).any()
    kept = np.delete(np.arange(len(vectors)), deleted)
    np.testing.assert_array_equal(ids, kept[exact(vectors[kept], queries, 10)])


def test_a_large_k_is_judged_by_its_top_hits_not_its_tail(tmp_path):
    # k = 200 of 400 candidates: with a code's error the tail of a top-200 reaches deep, while
    # the top 10 stay in front; such codes fetch once (region search asks for 20 x k patches)
    store, vectors = make_store(tmp_path)
    queries = vectors[:4] + 0.01
    search = OrderedSearch(vectors, worst_first=False, noise=0.05)
    _, ids = search_candidates(search, store, queries, 200, total=len(vectors), rerank=400)
    assert search.fetched == [400]
    assert np.mean([len(set(a) & set(b)) for a, b in zip(ids, exact(vectors, queries, 200))]) > 150
