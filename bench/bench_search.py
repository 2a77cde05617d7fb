"""Patch-search benchmark at scale: `tipslab index --factory auto` against plain FAISS baselines.

For each collection size, synthetic patch-like vectors (768-d by default) are generated in chunks
and written as an index directory with ``factory="auto"`` (factory from size and memory budget,
nprobe tuned to the recall target on held-out queries, compressed candidates re-scored exactly
from the memory-mapped float16 vectors). Separate evaluation queries then measure, one query at
a time on one thread: p50 / p95 latency, 10-recall@10 against exact search (two query kinds), build time and
resident bytes per vector (the FAISS index, which lives in RAM; the float16 vectors stay on disk,
memory-mapped, only candidate rows are read). The same run measures plain FAISS baselines on the
same vectors: Flat (exact; skipped above --flat-max) and IVF-SQ8 with the same list count and
nprobe tuned to the same target. Nothing here is asserted in tests.

Patch-like vectors: each image shows 4 "concepts" (one per 1000 vectors), each over a block of
its 16 x 16 patch grid; a patch is its concept's centre, plus the concept's look in this image,
plus variation along a shared 32-d subspace, plus isotropic noise (neighbouring patches of one
object are near-duplicates, as in real dense features). Evaluation queries are text-like: a
concept's centre looked at anew, near many images' patches at once (harder than the stored-vector
queries nprobe is tuned on, so the measured recall is an honest check of the tuning).

    nice -n 10 python bench/bench_search.py                      # 100k and 1M x 768
    python bench/bench_search.py --sizes 20000 --dim 64 --queries 50   # smoke run
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

GRID = 16  # patches per side of a synthetic image (224 px at patch 14)
LOOK = 0.35  # how far a concept's look in one image is from its centre (per dimension)


def concept_space(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Concept centres (one per 1000 vectors, at least 64) and the shared 32-d variation basis."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(64, n // 1000), dim)).astype(np.float32)
    basis = rng.standard_normal((32, dim)).astype(np.float32) / np.sqrt(32)
    return centres, basis


def patch_like_records(n: int, centres: np.ndarray, basis: np.ndarray, seed: int):
    """PatchRecords of synthetic images, n vectors in all, generated one image at a time."""
    import torch

    from tipslab.retrieval.extract import PatchRecord, SourceImage

    rng = np.random.default_rng(seed + 1)
    dim = centres.shape[1]
    per = GRID * GRID
    pixels = torch.zeros(3, 1, 1)
    ys, xs = np.mgrid[0:GRID, 0:GRID]
    for i in range(n // per):
        look = centres[rng.integers(0, len(centres), size=4)] + LOOK * rng.standard_normal((4, dim)).astype(np.float32)
        cut_y, cut_x = rng.integers(3, GRID - 3, size=2)
        block = ((ys >= cut_y).astype(int) * 2 + (xs >= cut_x)).ravel()
        vectors = (look[block] + 0.5 * rng.standard_normal((per, 32)).astype(np.float32) @ basis
                   + 0.25 * rng.standard_normal((per, dim)).astype(np.float32))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield PatchRecord(image=SourceImage(key=f"img{i}", path=f"/synthetic/img{i}.png", size=(224, 224),
                                            pixels=pixels), grid=(GRID, GRID), vectors=vectors)


def concept_queries(centres: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Text-like queries: a concept seen in no particular image (its centre, looked at anew), whose
    nearest patches are spread over many images and inverted lists."""
    q = centres[rng.integers(0, len(centres), size=count)]
    q = q + LOOK * rng.standard_normal(q.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def recalls(search, sets) -> list[float]:
    from tipslab.retrieval.tuning import recall_at_k

    return [recall_at_k(search(q), truth, truth.shape[1]) for q, truth in sets]


def latencies(search, queries: np.ndarray) -> tuple[np.ndarray, float, float]:
    """ids of each query searched alone, and the p50 / p95 latency in ms."""
    search(queries[:1])  # warm up (page in the memory maps, allocate)
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids.append(search(q[None]))
        times.append((time.perf_counter() - t0) * 1000)
    return np.concatenate(ids), float(np.percentile(times, 50)), float(np.percentile(times, 95))


def baselines(store, n: int, dim: int, nlist: int, sets, args, rng) -> list[tuple]:
    import faiss

    from tipslab.retrieval.tuning import heldout_queries, tune_nprobe
    from tipslab.retrieval.vector_store import exact_top_k

    rows = []
    factories = ([] if n > args.flat_max else ["Flat"]) + [f"IVF{nlist},SQ8"]
    tune_q = heldout_queries(store.sample(20_000, rng), args.queries, rng)
    tune_truth = exact_top_k(store, tune_q, args.k)
    for factory in factories:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        if not index.is_trained:
            index.train(store.sample(64 * nlist, rng))
        for chunk in store.iter_chunks():
            index.add(chunk)
        note = "exact"
        if "IVF" in factory:  # the same recall target, tuned the same way (no re-scoring: plain FAISS)
            ivf = faiss.extract_index_ivf(index)

            def run(q, nprobe, ivf=ivf, index=index):
                ivf.nprobe = nprobe
                return index.search(q, args.k)[1]

            nprobe, _, _ = tune_nprobe(run, nlist, tune_q, tune_truth, k=args.k, target=args.target)
            ivf.nprobe = nprobe
            note = f"nprobe={nprobe}"
        build = time.perf_counter() - t0
        search = lambda q, index=index: index.search(q, args.k)[1]  # noqa: E731
        _, p50, p95 = latencies(search, sets[1][0])
        size = faiss.serialize_index(index).size / n
        rows.append((f"faiss {factory}", note, build, size, p50, p95, *recalls(search, sets)))
        del index
    return rows


def run_size(n: int, args, root: Path) -> list[tuple]:
    from tipslab.retrieval.factory_choice import nlist_for
    from tipslab.retrieval.index_dir import write_index
    from tipslab.retrieval.tuning import heldout_queries
    from tipslab.retrieval.vector_store import exact_top_k

    t0 = time.perf_counter()
    centres, basis = concept_space(n, args.dim, args.seed)
    index = write_index(patch_like_records(n, centres, basis, args.seed), root / f"n{n}", factory="auto", image_size=224,
                        model={"source": "synthetic"}, progress=args.verbose, recall_target=args.target,
                        seed=args.seed, pool=args.pool)
    build = time.perf_counter() - t0
    n_vec = index.num_vectors
    rng = np.random.default_rng(args.seed + 7)  # evaluation queries: not the ones nprobe was tuned on
    sets = []
    for queries in (heldout_queries(index.store.sample(20_000, rng), args.queries, rng),
                    concept_queries(centres, args.queries, rng)):
        sets.append((queries, exact_top_k(index.store, queries, args.k)))
    search = lambda q: index.search_vectors(q, args.k)[1]  # noqa: E731
    _, p50, p95 = latencies(search, sets[1][0])
    import faiss

    size = faiss.serialize_index(index.index).size / n_vec
    tuned = index.manifest["tuning"] or {}
    note = f"{index.manifest['factory']} {index.manifest['search_params']} rerank={index.manifest['rerank']}"
    rows = [(f"tipslab auto (n={n_vec})", note, build, size, p50, p95, *recalls(search, sets))]
    print_row(rows[0])  # before the baselines, which take as long again
    if tuned and args.verbose:
        print(f"  tuning: {tuned['tried']}")
    nlist = int(faiss.extract_index_ivf(index.index).nlist) if "IVF" in index.manifest["factory"] else nlist_for(n_vec)
    if not args.no_baselines:
        rows += baselines(index.store, n_vec, args.dim, nlist, sets, args, rng)
    return rows


HEADER = (f"{'index':<28}{'build s':>9}{'B/vec':>8}{'p50 ms':>9}{'p95 ms':>9}{'R held':>8}{'R text':>8}"
          "  settings")


def print_row(row) -> None:
    name, note, build, size, p50, p95, held, text = row
    print(f"{name:<28}{build:>9.1f}{size:>8.1f}{p50:>9.3f}{p95:>9.3f}{held:>8.3f}{text:>8.3f}  {note}", flush=True)


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.95, help="recall target nprobe is tuned to")
    parser.add_argument("--pool", type=int, default=1, help="k x k patch pooling")
    parser.add_argument("--flat-max", type=int, default=2_000_000, help="largest size with a Flat baseline")
    # 1 thread: single-query latency on a shared box; OpenMP spin-waits make 2 threads slower here.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--tmp", default=None, help="folder for the index directories (default: system temp)")
    args = parser.parse_args()

    faiss.omp_set_num_threads(args.threads)
    print(f"patch-like L2-normalised {args.dim}-d vectors, {args.queries} single queries, {args.k}-recall@{args.k} "
          f"vs exact, target {args.target}, threads={args.threads}, pool={args.pool}")
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in args.sizes:
            print(HEADER)
            print("-" * len(HEADER), flush=True)
            rows = run_size(n, args, Path(tmp))
            results[n] = rows
            for row in rows[1:]:
                print_row(row)
            import shutil

            shutil.rmtree(Path(tmp) / f"n{n}", ignore_errors=True)
    if len(results) > 1:
        small, large = args.sizes[0], args.sizes[-1]
        for i, (name, *_rest) in enumerate(results[small]):
            match = [r for r in results[large] if r[0].split(" (")[0] == name.split(" (")[0]]
            if match:
                print(f"p50 growth {small} -> {large} ({large / small:.0f}x vectors), {name.split(' (')[0]}: "
                      f"{match[0][4] / results[small][i][4]:.2f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"B/vec = the FAISS index's bytes (resident) per vector; the float16 vectors add {2 * args.dim} B/vector "
          f"on disk, memory-mapped. R held = {args.k}-recall@{args.k} vs exact on fresh held-out queries like the "
          "tuning's; R text = on text-like concept queries (latency is timed on these). "
          f"Peak RSS of this run {peak:.0f} MiB.")


if __name__ == "__main__":
    main()
