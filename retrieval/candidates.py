"""From query vectors to the index's top-k vector ids: FAISS candidates, deleted images dropped,
and (for compressed codes) the candidates re-scored exactly from the float16 vectors, so a lossy
code only decides which vectors are looked at, never their final order.

When a query's exact top 10 sits deep in the codes' candidate list, the codes do not order its
neighbourhood (dense features of flat regions: hundreds of patches within the codes' error of
each other), so better neighbours likely lie past the list's end; such a query alone is searched
again with 4x the candidates, up to `DEEPEN_MAX` x. Easy queries pay nothing for this.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tipslab.retrieval.vector_store import VectorStore, rescore

DEEPEN_AT = 0.5  # the exact top hits reaching past this share of the candidates: search deeper
DEEPEN_HEAD = 10  # the top hits judged (as tuned: 10-recall@10); a large k's tail always sits deep
DEEPEN_MAX = 16  # at most this many times the tuned candidates per query
DEEPEN_STEP = 4  # each deeper search fetches this many times the last


def search_candidates(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], store: VectorStore,
                      queries: np.ndarray, k: int, *, total: int, rerank: int = 0,
                      dead: Callable[[np.ndarray], np.ndarray] | None = None):
    """(scores float32 [Q, k], ids int64 [Q, k]), padded with -1 ids like FAISS.

    ``search(queries, n)`` is the FAISS search; ``rerank`` candidates (at least k) are fetched
    and re-scored exactly when > 0 (deepened per query, see the module's docstring);
    ``dead(ids) -> bool mask`` marks deleted vectors, which are dropped, fetching 4x more until
    k live ones are found or the index is exhausted.
    """
    fetch = min(max(k, rerank), total)
    faiss_scores, ids, ended = _live_candidates(search, queries, k, fetch, total, dead)
    if not rerank:
        return _faiss_order(faiss_scores, ids, k)
    scores, best = rescore(store, queries, ids, k)
    todo, limit = np.flatnonzero(_too_deep(ids, best, ended)), min(total, DEEPEN_MAX * fetch)
    while len(todo) and fetch < limit:
        fetch = min(DEEPEN_STEP * fetch, limit)
        _, ids, ended = _live_candidates(search, queries[todo], k, fetch, total, dead)
        scores[todo], best[todo] = deeper = rescore(store, queries[todo], ids, k)
        todo = todo[_too_deep(ids, deeper[1], ended)]
    return scores, best


def _live_candidates(search, queries, k, fetch, total, dead):
    """FAISS's (scores, ids) [Q, fetch'], deleted ids set to -1, fetching more until k are live;
    and bool [Q]: FAISS ran out of vectors in the lists it probed (its list ends in -1)."""
    while True:
        scores, ids = search(queries, fetch)
        ended = ids[:, -1] < 0 if ids.shape[1] else np.ones(len(ids), dtype=bool)
        if dead is not None:
            ids = np.where((ids >= 0) & dead(np.maximum(ids, 0)), -1, ids)
        live = (ids >= 0).sum(axis=1)
        if dead is None or live.min(initial=k) >= min(k, total) or fetch >= total:
            return scores, ids, ended
        fetch = min(4 * fetch, total)


def _too_deep(candidates: np.ndarray, best: np.ndarray, ended: np.ndarray) -> np.ndarray:
    """bool [Q]: the exact top `DEEPEN_HEAD` include a candidate past `DEEPEN_AT` of the list, and
    the probed lists hold more vectors than were fetched."""
    deep = np.zeros(len(candidates), dtype=bool)
    for row, (cand, top) in enumerate(zip(candidates, best)):
        head = top[:DEEPEN_HEAD]
        where = np.flatnonzero(np.isin(cand, head[head >= 0]))
        deep[row] = len(where) > 0 and where[-1] >= DEEPEN_AT * len(cand)
    return deep & ~ended


def _faiss_order(scores, ids, k):
    """Exact codes: FAISS's own scores and order, the holes left by deleted vectors dropped."""
    order = np.argsort(ids < 0, axis=1, kind="stable")
    ids, scores = np.take_along_axis(ids, order, axis=1)[:, :k], np.take_along_axis(scores, order, axis=1)[:, :k]
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, ids
