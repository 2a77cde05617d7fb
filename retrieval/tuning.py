"""Tuning an IVF index's nprobe to a recall target on held-out queries, as autofaiss does.

Held-out queries stand where text queries stand: at the centre of a group of patches rather than
on one (a stored vector's neighbourhood in a sample of the collection, averaged and moved by
noise), so their nearest patches spread over many images and inverted lists; queries equal to a
stored vector are easy and would tune nprobe too low. Their exact top-k over the float16 vectors is the ground truth; the
smallest nprobe whose whole search (FAISS candidates re-scored exactly) reaches the target recall
is kept in the manifest, so searches are as fast as the target allows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_TARGET = 0.95
DEFAULT_QUERIES = 200
QUERY_NOISE = 0.3  # norm of the noise added to a (unit) query
GROUP = 32  # stored vectors averaged into one query
POOL_MIN = 20_000  # the sample queries are grouped from: at least this many stored vectors ...
POOL_SHARE = 50  # ... or 1 in this many, so a group covers the same neighbourhood at any size
POOL_MAX = 500_000  # (1.5 GB of 768-d float32)


def pool_size(total: int) -> int:
    """Stored vectors to sample for held-out queries from a collection of ``total``. A fixed
    sample thins out as the collection grows: at 10M vectors of the search bench, 20k hold ~2 per
    concept and a query (the mean of a seed's 32 nearest sampled vectors) averages unrelated
    patches. A fixed share keeps the group at ~1600 nearest neighbours in the collection at any
    size, as at 1M."""
    return int(min(total, max(POOL_MIN, min(POOL_MAX, total // POOL_SHARE))))


def heldout_queries(pool: np.ndarray, count: int, rng: np.random.Generator, noise: float = QUERY_NOISE) -> np.ndarray:
    """``count`` unit queries ``[count, D]``, each the mean of a random pooled vector's ``GROUP``
    nearest pooled vectors (a sample of the collection, `pool_size` of it), moved by noise."""
    pool = np.ascontiguousarray(pool, dtype=np.float32)
    seeds = pool[rng.choice(len(pool), size=count, replace=len(pool) < count)]
    group = min(GROUP, len(pool))
    nearest = np.argpartition(-(seeds @ pool.T), group - 1, axis=1)[:, :group]
    queries = pool[nearest].mean(axis=1)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    dim = pool.shape[1]
    queries += noise / np.sqrt(dim) * rng.standard_normal(queries.shape).astype(np.float32)
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """k-recall@k: the share of the true top-k found in the returned top-k, averaged over queries."""
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def tune_nprobe(search: Callable[[np.ndarray, int], np.ndarray], nlist: int, queries: np.ndarray,
                truth: np.ndarray, *, k: int = 10, target: float = DEFAULT_TARGET) -> tuple[int, float, list]:
    """Smallest nprobe whose ``search(queries, nprobe) -> ids [Q, k]`` reaches ``target`` recall.

    Doubles nprobe until the target is met, then bisects between the last two tries.
    Returns (nprobe, recall, [(nprobe, recall), ...] tried); nlist (every list) if never met.
    """
    tried: dict[int, float] = {}

    def measure(nprobe: int) -> float:
        if nprobe not in tried:
            tried[nprobe] = recall_at_k(search(queries, nprobe), truth, k)
        return tried[nprobe]

    low, high = 0, 1
    while measure(high) < target and high < nlist:
        if high >= 8 and measure(high) <= measure(high // 4) + 0.005:
            break  # a plateau: the codes, not the lists probed, limit recall
        low, high = high, min(2 * high, nlist)
    if tried[high] >= target:
        while high - low > max(1, high // 8):  # within 1/8: finer steps cost more tuning than they save
            mid = (low + high) // 2
            if measure(mid) >= target:
                high = mid
            else:
                low = mid
    return high, tried[high], sorted(tried.items())
