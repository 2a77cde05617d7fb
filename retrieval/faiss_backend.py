"""FAISS helpers for index directories: the lazy import, GPU detection and GPU/CPU copies of an
index, new inner-product indexes from a factory string (with errors that name the string), the
fewest vectors an index trains on, and the default and applied search parameters."""

from __future__ import annotations

import contextlib

from tipslab.errors import TipslabError

DEFAULT_NPROBE = 16


def faiss_module():
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = faiss_module()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_gpu(index):
    """A GPU clone of a Flat/IVF index for searching; the CPU index where that is not possible.

    Untested here (no GPU in CI); kept small on purpose. HNSW and some codecs do not clone.
    """
    faiss = faiss_module()
    try:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.referenced_resources = resources  # keep the resources alive with the index
        return gpu_index
    except Exception:  # noqa: BLE001 - any failure means: search on CPU
        return index


def to_cpu(index):
    faiss = faiss_module()
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


def new_faiss_index(factory: str, dim: int):
    """An empty inner-product index from a factory string, or a clear error naming the string."""
    faiss = faiss_module()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "rejected"
        raise TipslabError(f"--factory {factory!r}: FAISS cannot build it for dim {dim} ({first})") from None


def min_train_points(index) -> int:
    """The fewest training vectors FAISS accepts for this index (k-means needs >= k points)."""
    faiss = faiss_module()
    needed, ivf = 1, None
    with contextlib.suppress(RuntimeError):
        ivf = faiss.extract_index_ivf(index)
        needed = int(ivf.nlist)
    pq = getattr(faiss.downcast_index(index), "pq", None)
    if pq is None and ivf is not None:
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
    if pq is not None:
        needed = max(needed, 1 << int(pq.nbits))
    return needed


def default_search_params(index) -> str:
    """Default search parameters kept in the manifest (IVF: probe 16 lists, or all if fewer)."""
    faiss = faiss_module()
    try:
        nlist = int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return ""
    return search_params_for(index, min(nlist, DEFAULT_NPROBE))


def apply_params(index, params: str) -> None:
    if not params:
        return
    faiss = faiss_module()
    space = faiss.GpuParameterSpace() if "Gpu" in type(index).__name__ else faiss.ParameterSpace()
    try:
        space.set_index_parameters(index, params)
    except RuntimeError as err:
        raise TipslabError(f"search params {params!r}: FAISS rejects them for this index ({err})") from None


GPU_MAX_K = 2048  # FAISS GPU indexes return at most this many neighbours per query


def ivf_of(index):
    """The inverted-file layer of an index (through OPQ / pre-transforms), or None."""
    faiss = faiss_module()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def exact_codes(index) -> bool:
    """Whether the index stores vectors uncompressed (its scores need no exact re-scoring)."""
    faiss = faiss_module()
    inner = faiss.downcast_index(index)
    return isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat))


QUANTIZER_EF_ADD = 128  # HNSW coarse quantizer's search breadth while vectors are assigned to lists
QUANTIZER_EF_MIN = 64  # ... and at search: at least this, or 2 x nprobe


def hnsw_quantizer(index):
    """The HNSW coarse quantizer of an IVF index, or None (flat quantizer, or no IVF)."""
    ivf = ivf_of(index)
    if ivf is None:
        return None
    quantizer = faiss_module().downcast_index(ivf.quantizer)
    return quantizer if hasattr(quantizer, "hnsw") else None


def set_quantizer_ef(index, ef: int) -> None:
    """How widely an HNSW coarse quantizer searches. Its default (16) misses nearer lists at high
    dims: vectors land in the wrong lists at add, and probing more lists stops raising recall."""
    quantizer = hnsw_quantizer(index)
    if quantizer is not None:
        quantizer.hnsw.efSearch = int(ef)


def search_params_for(index, nprobe: int) -> str:
    """The parameter string for ``nprobe`` (with the HNSW quantizer's breadth when it has one)."""
    params = f"nprobe={int(nprobe)}"
    if hnsw_quantizer(index) is not None:
        params += f",quantizer_efSearch={max(QUANTIZER_EF_MIN, 2 * int(nprobe))}"
    return params


def set_nprobe(index, nprobe: int) -> None:
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)
        set_quantizer_ef(index, max(QUANTIZER_EF_MIN, 2 * int(nprobe)))


def cluster_on_gpu(index) -> None:
    """Let an IVF index's k-means run on the GPUs when faiss-gpu sees one (the slow part of training);
    the index itself stays on the CPU, where every code type works."""
    faiss = faiss_module()
    ivf = ivf_of(index)
    if ivf is None or not gpu_available():
        return
    with contextlib.suppress(Exception):  # any failure: cluster on the CPU as before
        flat = faiss.IndexFlatIP(ivf.d) if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(ivf.d)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
