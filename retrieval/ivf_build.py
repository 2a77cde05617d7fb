"""Building large IVF indexes in less time: two-level k-means for many lists, and exact flat
assignment while adding through an HNSW coarse quantizer.

One-level k-means costs samples x lists x dim per iteration: at 4096 lists it is most of a 1M
build, at 16384 lists hours on one core. FAISS's own `contrib.clustering.two_level_clustering`
(the recipe of its billion-scale benchmarks) clusters into sqrt(nlist) groups, then each group
into its share of the lists: samples x 2 sqrt(nlist) x dim per iteration. Centroids are
spherical for inner-product indexes (the vectors are unit length, and so are the centroids the
quantizer compares them with).

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
    try:
        centroids, _ = two_level_clustering(x, int(math.sqrt(nlist)), nlist, seed=seed, verbose=False,
                                            spherical=ivf.metric_type == faiss.METRIC_INNER_PRODUCT)
    except Exception:  # noqa: BLE001 - e.g. a first-level group too small for its lists: one level, as FAISS does
        return False
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ivf.train(x)  # the quantizer is full, so FAISS skips its k-means and trains only the codes
    index.is_trained = True
    return True


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
