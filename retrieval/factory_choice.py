"""Choosing a FAISS factory from the collection's size and a memory budget, as autofaiss does.

Small collections get exact search (``Flat``). Larger ones get an inverted file (IVF) whose list
count grows with the square root of the collection (about 4 sqrt(n), at least 39 training vectors
per list, FAISS's own warning threshold), an HNSW coarse quantizer once the list count makes a flat
one slow to scan, and the largest compressed code that fits the budget: SQ8 when a byte per
dimension fits, else 4-bit fast-scan PQ (the fastest code FAISS scans on CPU), with an OPQ rotation
when each sub-quantizer must cover 8 or more dimensions (coarse sub-spaces lose most to uneven
variance, which the rotation spreads). Compressed codes only pick candidates: `IndexDirectory`
re-scores them exactly from the float16 vectors, so recall is tuned on that whole pipeline
(`tuning.tune_nprobe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tipslab.errors import TipslabError

AUTO = "auto"
FLAT_MAX_VECTORS = 100_000  # exact search below this: it scans 100k x 768 in ~10 ms on one core
DEFAULT_BYTES_PER_VECTOR = 100  # the resident budget per vector when none is given
IVF_ID_BYTES = 8  # an IVF list stores each vector's int64 id beside its code
HNSW_QUANTIZER_FROM = 8192  # lists from which a flat coarse quantizer costs more than the scan


@dataclass(frozen=True)
class FactoryChoice:
    """A factory string and why it was chosen (kept in the manifest)."""

    factory: str
    nlist: int
    code_bytes: int  # bytes per vector of the code, without the IVF id
    reason: str


def choose_factory(num_vectors: int, dim: int, *, memory_budget: int | None = None) -> FactoryChoice:
    """The factory for ``num_vectors`` vectors of ``dim`` under ``memory_budget`` resident bytes.

    ``memory_budget`` defaults to `DEFAULT_BYTES_PER_VECTOR` per vector (and to exact search for
    collections of at most `FLAT_MAX_VECTORS`, whose flat index is small anyway).
    """
    if num_vectors <= 0 or dim <= 0:
        raise TipslabError(f"choose_factory: expected a positive collection size and dim, got {num_vectors}, {dim}")
    budget = memory_budget if memory_budget is not None else DEFAULT_BYTES_PER_VECTOR * num_vectors
    per_vector = budget / num_vectors
    if num_vectors <= FLAT_MAX_VECTORS and (memory_budget is None or per_vector >= 4 * dim):
        return FactoryChoice("Flat", 0, 4 * dim, f"{num_vectors} vectors: exact search is fast enough")
    nlist = nlist_for(num_vectors)
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"
    # the coarse centroids (float32) are resident too: their share per vector comes off the code's budget
    code_budget = per_vector - IVF_ID_BYTES - 4 * dim * nlist / num_vectors
    if code_budget >= dim:
        return FactoryChoice(f"{quantizer},SQ8", nlist, dim,
                             f"{per_vector:.0f} B/vector fits a byte per dimension (SQ8)")
    m = _fast_scan_m(dim, code_budget)
    if m is None:
        raise TipslabError(f"memory budget {budget} B for {num_vectors} vectors of dim {dim}: below the smallest "
                           f"code ({IVF_ID_BYTES + 1} B/vector); raise it or pool patches")
    dims_per_sub = dim // m
    opq = f"OPQ{m}," if dims_per_sub >= 8 else ""
    return FactoryChoice(f"{opq}{quantizer},PQ{m}x4fs", nlist, m // 2,
                         f"{per_vector:.0f} B/vector: 4-bit fast-scan PQ, {m} sub-quantizers of {dims_per_sub} dims"
                         + (", OPQ rotation" if opq else ""))


def nlist_for(num_vectors: int) -> int:
    """A power of two near 4 sqrt(n), with at least 39 training vectors per list."""
    target = 4 * math.sqrt(num_vectors)
    nlist = 1 << max(4, round(math.log2(target)))
    while nlist > 16 and num_vectors < 39 * nlist:
        nlist //= 2
    return min(nlist, 1 << 16)


def _fast_scan_m(dim: int, code_budget: float) -> int | None:
    """Most 4-bit sub-quantizers (even, dividing dim) whose m/2 bytes fit the code budget."""
    best = None
    for m in range(2, dim + 1, 2):
        if dim % m == 0 and m / 2 <= code_budget:
            best = m
    return best
