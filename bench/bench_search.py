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

Real vectors mixed in (``--real N``, default 1000): the patch vectors of N built-in scenes,
extracted by tipslab's own pipeline with a fresh tiny encoder (or ``--model``), lifted to the
bench's dim by a fixed random isometry when the model's is smaller (inner products unchanged),
and interleaved with the synthetic images. Their queries (column "R real") are patches of
further scenes that are not indexed: real held-out vectors.

Streaming: synthetic images come from per-image seeds (any chunk is reproducible alone), the
index is written part by part as float16 (never the collection in float32 in RAM), FAISS trains
on a sample and adds in chunks, and exact ground truth streams over the parts. ``--legacy-build``
builds as before `retrieval/ivf_build.py` (one-level k-means, adds through the HNSW quantizer),
for before / after tables in the same conditions.

Patch-like vectors: each image shows 4 "concepts" (one per 1000 vectors), each over a block of
its 16 x 16 patch grid; a patch is its concept's centre, plus the concept's look in this image,
plus variation along a shared 32-d subspace, plus isotropic noise (neighbouring patches of one
object are near-duplicates, as in real dense features). Evaluation queries are text-like: a
concept's centre looked at anew, near many images' patches at once (harder than the stored-vector
queries nprobe is tuned on, so the measured recall is an honest check of the tuning).

    nice -n 19 python bench/bench_search.py --sizes 1000000 2000000        # 1M and 2M x 768, real vectors mixed in
    nice -n 19 python bench/bench_search.py --sizes 1000000 --legacy-build # the build before ivf_build.py
    nice -n 19 python bench/bench_search.py --sizes 1000000 10000000 --build-threads 2 --tmp /big/disk  # ~16 GB of parts
    python bench/bench_search.py --sizes 20000 --dim 192 --queries 50 --real 50  # smoke run
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

GRID = 16  # patches per side of a synthetic image (224 px at patch 14)
FRESH_TINY = {"vision": {"size": "tiny", "img_size": 112, "drop_path_rate": 0.0},
              "text": {"size": "tiny", "vocab_size": 49408, "context_length": 32}}
LOOK = 0.35  # how far a concept's look in one image is from its centre (per dimension)


def concept_space(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Concept centres (one per 1000 vectors, at least 64) and the shared 32-d variation basis."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(64, n // 1000), dim)).astype(np.float32)
    basis = rng.standard_normal((32, dim)).astype(np.float32) / np.sqrt(32)
    return centres, basis


def patch_like_records(n: int, centres: np.ndarray, basis: np.ndarray, seed: int, real=()):
    """PatchRecords of synthetic images, n vectors in all with the ``real`` records spread evenly
    among them, generated one image at a time (image i from its own seed)."""
    import torch

    from tipslab.retrieval.extract import PatchRecord, SourceImage

    dim = centres.shape[1]
    per = GRID * GRID
    pixels = torch.zeros(3, 1, 1)
    ys, xs = np.mgrid[0:GRID, 0:GRID]
    synthetic = max(0, n - sum(len(r.vectors) for r in real)) // per
    every = max(1, synthetic // max(1, len(real)))
    pending = iter(real)
    for i in range(synthetic):
        if i % every == 0 and (record := next(pending, None)) is not None:
            yield record
        rng = np.random.default_rng([seed, i])
        look = centres[rng.integers(0, len(centres), size=4)] + LOOK * rng.standard_normal((4, dim)).astype(np.float32)
        cut_y, cut_x = rng.integers(3, GRID - 3, size=2)
        block = ((ys >= cut_y).astype(int) * 2 + (xs >= cut_x)).ravel()
        vectors = (look[block] + 0.5 * rng.standard_normal((per, 32)).astype(np.float32) @ basis
                   + 0.25 * rng.standard_normal((per, dim)).astype(np.float32))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield PatchRecord(image=SourceImage(key=f"img{i}", path=f"/synthetic/img{i}.png", size=(224, 224),
                                            pixels=pixels), grid=(GRID, GRID), vectors=vectors)
    yield from pending


def real_scene_vectors(count: int, held_out: int, dim: int, model: str | None, seed: int):
    """(records of ``count`` scenes, patch vectors [M, dim] of ``held_out`` further scenes), extracted
    by `tipslab index`'s own pipeline with ``model`` or a fresh tiny encoder."""
    import torch

    from tipslab.retrieval.extract import extract_patches, open_source

    if model is not None:
        from tipslab.modules.api import load_model

        loaded = load_model(model)
        encoder, size = loaded.encoder, int(loaded.model_cfg["vision"]["img_size"])
    else:
        from tipslab.modules.encoder import build_encoder

        torch.manual_seed(seed)
        encoder, size = build_encoder(FRESH_TINY), FRESH_TINY["vision"]["img_size"]
    records = list(extract_patches(encoder, open_source(f"scenes:val:{count + held_out}", size), progress=False))
    width = records[0].vectors.shape[1]
    if width > dim:
        raise SystemExit(f"--model: its {width}-d vectors do not fit --dim {dim}")
    # a fixed isometry R^width -> R^dim: inner products, hence neighbours, are those of the model's own vectors
    lift = np.linalg.qr(np.random.default_rng(seed + 3).standard_normal((dim, width)))[0].T.astype(np.float32)
    for record in records:
        record.vectors = np.ascontiguousarray(record.vectors @ lift if width < dim else record.vectors)
    return records[:count], np.concatenate([r.vectors for r in records[count:]])


def concept_queries(centres: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Text-like queries: a concept seen in no particular image (its centre, looked at anew), whose
    nearest patches are spread over many images and inverted lists."""
    q = centres[rng.integers(0, len(centres), size=count)]
    q = q + LOOK * rng.standard_normal(q.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


TIE = 1e-3  # scores this close to the true k-th are ties at float16 precision


def recalls(search, sets, store) -> list[float]:
    """k-recall@k per query set; for the real set also the tie-tolerant share (last column)."""
    from tipslab.retrieval.tuning import recall_at_k

    out = []
    for q, truth in sets:
        found = search(q)
        out.append(recall_at_k(found, truth, truth.shape[1]))
    if len(sets) > 2:
        out.append(tie_tolerant_recall(store, *sets[2], found))
    return out


def tie_tolerant_recall(store, queries, truth, found) -> float:
    """Share of the returned top k whose exact score reaches the true k-th score less `TIE`: real
    patches have hundreds of near-equal neighbours (flat regions), where plain k-recall@k counts
    swapped ties as misses."""
    hits = []
    for q, t, f in zip(queries, truth, found):
        kth = float((store.take(t) @ q).min())
        got = store.take(f[f >= 0]) @ q
        hits.append(float((got >= kth - TIE).sum()) / len(t))
    return float(np.mean(hits))


def latencies(search, queries: np.ndarray, threads: int = 1) -> tuple[np.ndarray, float, float]:
    """ids of each query searched alone on ``threads`` FAISS threads, and the p50 / p95 latency in ms."""
    import faiss

    building = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        return _timed(search, queries)
    finally:
        faiss.omp_set_num_threads(building)


def _timed(search, queries: np.ndarray) -> tuple[np.ndarray, float, float]:
    search(queries[:1])  # warm up (page in the memory maps, allocate)
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids.append(search(q[None]))
        times.append((time.perf_counter() - t0) * 1000)
    return np.concatenate(ids), float(np.percentile(times, 50)), float(np.percentile(times, 95))


def index_bytes(index, folder: Path) -> int:
    """The index's serialised size, through a file: `faiss.serialize_index` would hold a second copy in RAM."""
    import faiss

    path = Path(folder) / "baseline.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def baselines(store, n: int, dim: int, nlist: int, sets, args, rng, centroids=None) -> list[tuple]:
    """Plain FAISS on the same vectors: Flat up to --flat-max, and IVF-SQ8 with the auto index's list
    count (and its coarse centroids when given: k-means is not what is compared), nprobe tuned alike."""
    import faiss

    from tipslab.retrieval.tuning import heldout_queries, pool_size, tune_nprobe
    from tipslab.retrieval.vector_store import exact_top_k

    rows = []
    factories = ([] if n > args.flat_max else ["Flat"]) + [f"IVF{nlist},SQ8"]
    tune_q = heldout_queries(store.sample(pool_size(n), rng), args.queries, rng)
    tune_truth = exact_top_k(store, tune_q, args.k)
    for factory in factories:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        if "IVF" in factory and centroids is not None:
            faiss.extract_index_ivf(index).quantizer.add(centroids)  # full quantizer: train() fits SQ8 only
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
        _, p50, p95 = latencies(search, sets[1][0], args.threads)
        size = index_bytes(index, args.tmp_dir) / n
        if "IVF" in factory and centroids is not None:
            note += ", the auto index's lists"
        rows.append((f"faiss {factory}", note, build, size, p50, p95, *recalls(search, sets, store)))
        del index
    return rows


def run_size(n: int, args, root: Path, real=None) -> list[tuple]:
    from tipslab.retrieval.factory_choice import nlist_for
    from tipslab.retrieval.index_dir import write_index
    from tipslab.retrieval.tuning import heldout_queries, pool_size
    from tipslab.retrieval.vector_store import exact_top_k

    real_records, real_held = real if real is not None else ([], None)
    t0 = time.perf_counter()
    centres, basis = concept_space(n, args.dim, args.seed)
    index = write_index(patch_like_records(n, centres, basis, args.seed, real_records), root / f"n{n}",
                        factory="auto", image_size=224, model={"source": "synthetic"}, progress=args.verbose,
                        recall_target=args.target, seed=args.seed, pool=args.pool)
    build = time.perf_counter() - t0
    n_vec = index.num_vectors
    rng = np.random.default_rng(args.seed + 7)  # evaluation queries: not the ones nprobe was tuned on
    kinds = [heldout_queries(index.store.sample(pool_size(index.num_vectors), rng), args.queries, rng),
             concept_queries(centres, args.queries, rng)]
    if real_held is not None:  # patches of scenes that are not in the index
        kinds.append(real_held[rng.choice(len(real_held), size=min(args.queries, len(real_held)), replace=False)])
    t1 = time.perf_counter()
    sets = [(queries, exact_top_k(index.store, queries, args.k)) for queries in kinds]  # streams over the parts
    truth_s = time.perf_counter() - t1
    search = lambda q: index.search_vectors(q, args.k)[1]  # noqa: E731
    _, p50, p95 = latencies(search, sets[1][0], args.threads)
    import faiss

    size = (index.path / "index.faiss").stat().st_size / n_vec
    tuned = index.manifest["tuning"] or {}
    phases = " ".join(f"{k.split('_')[0]} {v:.0f}" for k, v in index.manifest["build_seconds"].items())
    note = (f"{index.manifest['factory']} {index.manifest['search_params']} rerank={index.manifest['rerank']}; "
            f"s: {phases}; exact truth {truth_s:.0f}" + ("; legacy build" if args.legacy_build else ""))
    rows = [(f"tipslab auto (n={n_vec})", note, build, size, p50, p95, *recalls(search, sets, index.store))]
    print_row(rows[0])  # before the baselines, which take as long again
    if tuned and args.verbose:
        print(f"  tuning: {tuned['tried']}")
    ivf = faiss.extract_index_ivf(index.index) if "IVF" in index.manifest["factory"] else None
    nlist = int(ivf.nlist) if ivf is not None else nlist_for(n_vec)
    # the auto index's coarse centroids, unless OPQ rotated them out of the vectors' space
    centroids = (ivf.quantizer.reconstruct_n(0, nlist) if ivf is not None and "OPQ" not in index.manifest["factory"]
                 else None)
    if not args.no_baselines:
        rows += baselines(index.store, n_vec, args.dim, nlist, sets, args, rng, centroids)
    return rows


HEADER = (f"{'index':<28}{'build s':>9}{'B/vec':>8}{'p50 ms':>9}{'p95 ms':>9}{'R held':>8}{'R text':>8}{'R real':>8}"
          f"{'R real~':>9}  settings")


def print_row(row) -> None:
    name, note, build, size, p50, p95, held, text, *real = row
    real = f"{real[0]:>8.3f}{real[1]:>9.3f}" if real else f"{'-':>8}{'-':>9}"
    print(f"{name:<28}{build:>9.1f}{size:>8.1f}{p50:>9.3f}{p95:>9.3f}{held:>8.3f}{text:>8.3f}{real}  {note}", flush=True)


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.95, help="recall target nprobe is tuned to")
    parser.add_argument("--pool", type=int, default=1, help="k x k patch pooling")
    parser.add_argument("--flat-max", type=int, default=1_000_000,
                        help="largest size with a Flat baseline (it holds the collection in float32)")
    parser.add_argument("--real", type=int, default=1000, help="built-in scenes whose real patch vectors are mixed in")
    parser.add_argument("--real-held-out", type=int, default=100, help="further scenes whose patches are the real queries")
    parser.add_argument("--model", default=None, help="model extracting the real vectors (default: a fresh tiny encoder)")
    parser.add_argument("--legacy-build", action="store_true",
                        help="one-level k-means and adds through the HNSW quantizer (the build before ivf_build.py)")
    # 1 thread: single-query latency on a shared box; OpenMP spin-waits make 2 threads slower here.
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads of the timed single queries")
    parser.add_argument("--build-threads", type=int, default=1,
                        help="FAISS threads while building, tuning and measuring recall (e.g. every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--tmp", default=None, help="folder for the index directories (default: system temp)")
    args = parser.parse_args()

    faiss.omp_set_num_threads(args.build_threads)
    if args.legacy_build:
        from tipslab.retrieval import ivf_build

        ivf_build.TWO_LEVEL_FROM, ivf_build.FLAT_ASSIGN = 1 << 62, False
    real = None
    if args.real:
        t0 = time.perf_counter()
        real = real_scene_vectors(args.real, args.real_held_out, args.dim, args.model, args.seed)
        print(f"real vectors: {sum(len(r.vectors) for r in real[0])} patches of {args.real} scenes mixed in, "
              f"{len(real[1])} of {args.real_held_out} held-out scenes as queries "
              f"({'--model' if args.model else 'fresh tiny encoder'}, {time.perf_counter() - t0:.0f} s)")
    print(f"patch-like L2-normalised {args.dim}-d vectors, {args.queries} single queries, {args.k}-recall@{args.k} "
          f"vs exact, target {args.target}, threads={args.threads} (build {args.build_threads}), pool={args.pool}")
    results = {}
    if args.tmp is not None:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in args.sizes:
            print(HEADER)
            print("-" * len(HEADER), flush=True)
            args.tmp_dir = Path(tmp)
            rows = run_size(n, args, Path(tmp), real)
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
          "tuning's; R text = on text-like concept queries (latency is timed on these); R real = on patches of "
          f"held-out scenes (real vectors); R real~ = the share of those hits within {TIE} of the true 10th score "
          "(ties at float16 precision). build s includes making the vectors; s: its phases (extract = "
          "vectors in and float16 parts written). "
          f"Peak RSS of this run {peak:.0f} MiB.")


if __name__ == "__main__":
    main()
