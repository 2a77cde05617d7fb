"""From query vectors to the index's top-k vector ids: FAISS candidates, deleted images dropped,
and (for compressed codes) the candidates re-scored exactly from the float16 vectors, so a lossy
code only decides which vectors are looked at, never their final order."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tipslab.retrieval.vector_store import VectorStore, rescore


def search_candidates(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], store: VectorStore,
                      queries: np.ndarray, k: int, *, total: int, rerank: int = 0,
                      dead: Callable[[np.ndarray], np.ndarray] | None = None):
    """(scores float32 [Q, k], ids int64 [Q, k]), padded with -1 ids like FAISS.

    ``search(queries, n)`` is the FAISS search; ``rerank`` candidates (at least k) are fetched
    and re-scored exactly when > 0; ``dead(ids) -> bool mask`` marks deleted vectors, which are
    dropped, fetching 4x more until k live ones are found or the index is exhausted.
    """
    fetch = min(max(k, rerank), total)
    while True:
        scores, ids = search(queries, fetch)
        if dead is not None:
            ids = np.where((ids >= 0) & dead(np.maximum(ids, 0)), -1, ids)
        live = (ids >= 0).sum(axis=1)
        if dead is None or live.min(initial=k) >= min(k, total) or fetch >= total:
            break
        fetch = min(4 * fetch, total)
    if rerank:
        return rescore(store, queries, ids, k)
    # drop the holes left by deleted vectors, keeping FAISS's order
    order = np.argsort(ids < 0, axis=1, kind="stable")
    ids, scores = np.take_along_axis(ids, order, axis=1)[:, :k], np.take_along_axis(scores, order, axis=1)[:, :k]
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, ids
