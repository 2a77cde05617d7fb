"""Building large IVF indexes in less time: two-level k-means for many lists, and exact flat
assignment while adding through an HNSW coarse quantizer.

One-level k-means costs samples x lists x dim per iteration: at 4096 lists it is most of a 1M
build, at 16384 lists hours on one core. FAISS's own `contrib.clustering.two_level_clustering`
(the recipe of its billion-scale benchmarks) clusters into sqrt(nlist) groups, then each group
into its share of the lists: samples x 2 sqrt(nlist) x dim per iteration. Centroids are
spherical for inner-product indexes (the vectors are unit length, and so are the centroids the
quantizer compares them with). A vector put in the wrong first-level group can never reach its
right list, and with many more natural clusters than groups that is most of them: on the search
bench's 10M vectors (10k concepts, 16384 lists) each list's centroid mixed several concepts
(a vector's mean similarity to its list 0.46, against 0.81 once refined), so PQ coded large
residuals and recall stalled at 0.41 whatever nprobe. A few Lloyd iterations over all lists
at once, on a sub-sample (`REFINE_ITERS`, `REFINE_PER_LIST`), undo that for a fraction of the
one-level cost.

Adding through an HNSW quantizer searched wide enough to assign each vector to its nearest list
(`faiss_backend.QUANTIZER_EF_ADD`) costs more than an exact BLAS scan of the centroids: while
adding, the quantizer is swapped for a flat copy of the same centroids (same lists, exact
assignment), and put back for searching.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from tipslab.retrieval.faiss_backend import faiss_module, hnsw_quantizer, ivf_of

TWO_LEVEL_FROM = 1024  # lists from which k-means runs in two levels
REFINE_ITERS = 2  # Lloyd iterations over all lists after the two levels (0: none)
REFINE_PER_LIST = 16  # sub-sample per list for them: ~27 s an iteration at 16384 lists x 768-d on 2 cores
FLAT_ASSIGN = True  # add through a flat copy of an HNSW quantizer's centroids (bench/bench_search.py --legacy-build)


def train_two_level(index, sample: np.ndarray, seed: int) -> bool:
    """Train ``index`` (IVF, possibly behind OPQ / other pre-transforms) with two-level k-means.

    Returns False, leaving the index untouched, where it does not apply (no IVF layer, fewer than
    `TWO_LEVEL_FROM` lists, or a quantizer that must train itself)."""
    faiss = faiss_module()
    ivf = ivf_of(index)
    if ivf is None or ivf.nlist < TWO_LEVEL_FROM or not ivf.quantizer.is_trained or ivf.quantizer.ntotal:
        return False
    from faiss.contrib.clustering import two_level_clustering

    outer = faiss.downcast_index(index)
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if isinstance(outer, faiss.IndexPreTransform):  # OPQ first: the lists live in the rotated space
        for i in range(outer.chain.size()):
            transform = outer.chain.at(i)
            transform.train(x)
            x = transform.apply(x)
    nlist = int(ivf.nlist)
    spherical = ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    try:
        centroids, _ = two_level_clustering(x, int(math.sqrt(nlist)), nlist, seed=seed, verbose=False,
                                            spherical=spherical)
    except Exception:  # noqa: BLE001 - e.g. a first-level group too small for its lists: one level, as FAISS does
        return False
    centroids = refine_centroids(np.ascontiguousarray(centroids, dtype=np.float32), x, spherical, seed)
    ivf.quantizer.add(centroids)
    ivf.train(x)  # the quantizer is full, so FAISS skips its k-means and trains only the codes
    index.is_trained = True
    return True


def refine_centroids(centroids: np.ndarray, x: np.ndarray, spherical: bool, seed: int,
                     iterations: int | None = None) -> np.ndarray:
    """``iterations`` (default `REFINE_ITERS`) Lloyd steps of all ``centroids`` [nlist, D] together
    on a sub-sample of ``x``: each point to its nearest centroid (exact, FAISS's BLAS scan), each
    centroid to its points' mean (unit length when ``spherical``); a list left empty keeps its centroid."""
    faiss = faiss_module()
    nlist, dim = centroids.shape
    iterations = REFINE_ITERS if iterations is None else iterations
    rng = np.random.default_rng(seed)
    points = x if len(x) <= REFINE_PER_LIST * nlist else x[np.sort(rng.choice(len(x), REFINE_PER_LIST * nlist,
                                                                                   replace=False))]
    points = np.ascontiguousarray(points, dtype=np.float32)
    centroids = centroids.copy()
    for _ in range(iterations):
        flat = faiss.IndexFlatIP(dim) if spherical else faiss.IndexFlatL2(dim)
        flat.add(centroids)
        owner = flat.search(points, 1)[1].ravel()
        order = np.argsort(owner, kind="stable")
        lists, starts, counts = np.unique(owner[order], return_index=True, return_counts=True)
        means = np.add.reduceat(points[order], starts, axis=0) / counts[:, None]
        if spherical:
            means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        centroids[lists] = means
    return centroids


@contextlib.contextmanager
def flat_assignment(index):
    """While in the block, ``index.add`` assigns through an exact flat copy of its HNSW quantizer."""
    quantizer = hnsw_quantizer(index) if FLAT_ASSIGN else None
    if quantizer is None:
        yield
        return
    faiss = faiss_module()
    ivf = ivf_of(index)
    flat = faiss.IndexFlat(int(quantizer.d), int(quantizer.metric_type))
    flat.add(quantizer.reconstruct_n(0, quantizer.ntotal))
    original = ivf.quantizer
    ivf.quantizer = flat
    try:
        yield
    finally:
        ivf.quantizer = original
