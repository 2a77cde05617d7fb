"""Patch-search benchmark: FAISS Flat against compressed factories on synthetic patch vectors.

Prints build time, query latency (one query at a time, and per query in a batch), memory per
vector and recall@k against exact search, with ratios to Flat measured in the same run. The
vectors are clustered (like patch embeddings: many near-duplicates of a few visual concepts),
L2-normalised, searched by inner product. Compressed codes fetch ``rerank`` candidates that are
re-scored exactly from a float16 copy, as `tipslab search` does. Never asserted in tests.

    python bench/bench_search.py            # ~100k x 192, sized for 2 CPU cores
    python bench/bench_search.py --n 1000000 --dim 768 --threads 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def clustered_vectors(n: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    data = centres[rng.integers(0, clusters, size=n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def rerank(ids: np.ndarray, queries: np.ndarray, store16: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k among each query's candidates, from the float16 store."""
    out = np.empty((len(ids), k), dtype=np.int64)
    for i, (cand, q) in enumerate(zip(ids, queries)):
        cand = cand[cand >= 0]
        scores = store16[cand].astype(np.float32) @ q
        out[i] = cand[np.argsort(-scores)[:k]]
    return out


def e2e(args, data: np.ndarray, queries: np.ndarray) -> None:
    """Whole `search_by_vectors` (FAISS + per-image exact re-scoring + regions) on an index directory."""
    import tempfile
    from pathlib import Path

    import torch

    from tipslab.retrieval.extract import PatchRecord, SourceImage
    from tipslab.retrieval.index_dir import write_index
    from tipslab.retrieval.search import search_by_vectors

    grid = 16  # 16 x 16 patches per image, like 224 px at patch 14
    per = grid * grid
    images = len(data) // per
    pixels = torch.zeros(3, 1, 1)
    records = [PatchRecord(image=SourceImage(key=f"img{i}", path=f"/synthetic/img{i}.png", size=(224, 224),
                                             pixels=pixels),
                           grid=(grid, grid), vectors=data[i * per:(i + 1) * per]) for i in range(images)]
    with tempfile.TemporaryDirectory() as tmp:
        for factory in ("Flat", f"IVF{args.nlist},SQ8"):
            t0 = time.perf_counter()
            index = write_index(records, Path(tmp) / factory.replace(",", "_"), factory=factory, image_size=224,
                                model={"source": "synthetic"}, progress=False)
            build = time.perf_counter() - t0
            search_by_vectors(index, queries[:1], k=5)  # warm the memory maps and tables
            t0 = time.perf_counter()
            for q in queries[:args.single]:
                search_by_vectors(index, q[None], k=5)
            single = (time.perf_counter() - t0) * 1000 / args.single
            print(f"index dir {factory:<14} {images} images x {per} patches: write {build:.2f} s, "
                  f"search k=5 (100 candidates, <=20 images re-scored, regions) {single:.2f} ms/query")


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rerank", type=int, default=100, help="candidates re-scored exactly for compressed codes")
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--nprobe", type=int, default=16)
    # 1 by default: on a shared 2-core box, OpenMP spin-waits make 2-thread single queries ~10x slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-e2e", action="store_true", help="skip the index-directory search timing")
    args = parser.parse_args()

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    data = clustered_vectors(args.n, args.dim, max(64, args.n // 500), rng)
    # Queries: perturbed collection vectors, like text queries near some patches.
    queries = data[rng.integers(0, args.n, size=args.queries)] + 0.3 * rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    store16 = data.astype(np.float16)

    pq_m = next(m for m in (args.dim // 4, args.dim // 2, 1) if args.dim % (2 * m) == 0)  # 4 and 2 dims per code
    # 4-bit fast-scan PQ: 8-bit PQ trains ~80x slower here (82 s vs 1 s at 100k x 192, 1 thread).
    factories = ["Flat", f"IVF{args.nlist},Flat", f"IVF{args.nlist},SQ8", f"IVF{args.nlist},PQ{pq_m}x4fs",
                 f"IVF{args.nlist},PQ{2 * pq_m}x4fs"]
    print(f"{args.n} x {args.dim} clustered L2-normalised vectors, {args.queries} queries, k={args.k}, "
          f"threads={args.threads}, nprobe={args.nprobe}, rerank={args.rerank} (compressed codes)")

    results, truth = [], None
    for factory in factories:
        index = faiss.index_factory(args.dim, factory, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        if not index.is_trained:
            index.train(data[rng.choice(args.n, size=min(args.n, 256 * args.nlist), replace=False)])
        index.add(data)
        build = time.perf_counter() - t0
        if "IVF" in factory:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", args.nprobe)
        exact_codes = factory.endswith("Flat")
        fetch = args.k if exact_codes else args.rerank

        t0 = time.perf_counter()
        _, ids = index.search(queries, fetch)
        batch_ms = (time.perf_counter() - t0) * 1000 / args.queries
        t0 = time.perf_counter()
        for q in queries[:args.single]:
            index.search(q[None], fetch)
        single_ms = (time.perf_counter() - t0) * 1000 / args.single
        if truth is None:
            truth = ids
        found = ids if exact_codes else rerank(ids, queries, store16, args.k)
        if not exact_codes:  # rerank cost counts against the query
            t0 = time.perf_counter()
            rerank(ids[:args.single], queries[:args.single], store16, args.k)
            single_ms += (time.perf_counter() - t0) * 1000 / args.single
        code_bytes = faiss.serialize_index(index).size / args.n
        raw = recall_at(ids[:, :args.k], truth, args.k)
        results.append((factory, build, single_ms, batch_ms, code_bytes, raw, recall_at(found, truth, args.k)))

    flat = results[0]
    header = f"{'factory':<20}{'build s':>9}{'1-query ms':>12}{'x Flat':>8}{'batch ms/q':>12}{'B/vec':>8}" \
             f"{'R@' + str(args.k) + ' raw':>10}{'R@' + str(args.k) + ' final':>12}"
    print(header)
    print("-" * len(header))
    for factory, build, single, batch, size, raw, final in results:
        print(f"{factory:<20}{build:>9.2f}{single:>12.3f}{single / flat[2]:>8.2f}{batch:>12.3f}{size:>8.1f}"
              f"{raw:>10.3f}{final:>12.3f}")
    if not args.no_e2e:
        e2e(args, data, queries)
    print("raw = recall of the index's own top-k; final = after exact re-scoring of the top "
          f"{args.rerank} candidates from the float16 store (= raw for Flat codes). "
          f"The float16 store adds {2 * args.dim} B/vector on disk (memory-mapped).")


if __name__ == "__main__":
    main()
