"""Building an index directory: `build_index` (a model over an image source) and `write_index`
(patch records however computed) write every file into a temporary directory beside the target and
rename it into place. With ``factory="auto"`` the FAISS factory is chosen from the collection's
size and a memory budget (`factory_choice`) and an IVF index's nprobe is tuned to a recall target
on held-out queries (`tuning`); both land in the manifest with the file sizes that `IndexDirectory.open`
checks.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tipslab.datamodules.preprocess import Preprocessing
from tipslab.errors import TipslabError
from tipslab.retrieval.build_steps import (
    add_to_index,
    check_out,
    chmod_like_mkdir,
    encoder_dim,
    images_frame,
    ingest,
    metadata_frame,
    model_image_size,
    now_utc,
    publish,
    report_skipped,
    tipslab_version,
    train_index,
)
from tipslab.retrieval.candidates import search_candidates
from tipslab.retrieval.durable import fsync_path, write_faiss, write_json, write_parquet
from tipslab.retrieval.extract import FEATURES, ImageSource, PatchRecord, check_source, extract_patches, open_source
from tipslab.retrieval.factory_choice import AUTO, choose_factory
from tipslab.retrieval.faiss_backend import (
    default_search_params,
    exact_codes,
    faiss_module,
    ivf_of,
    new_faiss_index,
    search_params_for,
    set_nprobe,
)
from tipslab.retrieval.index_files import file_sizes
from tipslab.retrieval.index_layout import (
    FORMAT,
    FORMAT_VERSION,
    IMAGES_FILE,
    INDEX_FILE,
    MANIFEST,
    METADATA_FILE,
    VECTORS_DIR,
)
from tipslab.retrieval.model_identity import bundle_model, default_device, model_cfg_dict, model_identity
from tipslab.retrieval.pooling import pool_records
from tipslab.retrieval.tuning import DEFAULT_QUERIES, DEFAULT_TARGET, heldout_queries, pool_size, tune_nprobe
from tipslab.retrieval.vector_store import PartWriter, VectorStore, exact_top_k

RERANK = (100, 400, 1600)  # candidates re-scored exactly per query (compressed codes): the fewest reaching the target
TUNE_K = 10  # recall is tuned as 10-recall@10
SPEEDUP_TO_SWITCH = 1.1  # a larger candidate count is kept only when this much faster (timing noise)
TUNE_MARGIN = 0.01  # tuned above the target by ~2 standard errors of a 200-query recall, so fresh queries meet it
TRAIN_PER_LIST = 64  # auto: k-means samples per list (FAISS caps at 256; 64 trains 4x faster, same recall here)


def build_index(model_path, source, out_dir, factory: str = "Flat", feature: str = "dense", batch_size: int | None = None,
                overwrite: bool = False, *, image_size: int | None = None, scenes_count: int | None = None,
                train_size: int | None = None, device: str | None = None, progress: bool = True,
                loaded=None, seed: int = 0, bytes_per_vector: float | None = None, recall_target: float = DEFAULT_TARGET,
                pool: int = 1, decode_workers: int | None = None, decode: str = "full"):
    """Index every image of ``source`` (a folder or ``scenes:val[:N]``) into a new directory.

    ``loaded`` is an already loaded model for ``model_path`` (saves loading it twice in one
    process). IVF-style factories are trained on a sample of the collection's own vectors
    (``train_size``; default 256 per centroid, at least 65536).
    """
    out = Path(out_dir).expanduser().resolve()
    if feature not in FEATURES:
        raise TipslabError(f"--feature: expected one of {FEATURES}, got {feature!r}")
    check_out(out, overwrite)
    check_source(source)  # a typo in SOURCE should not cost a model load
    identity = model_identity(model_path)
    if loaded is None:
        from tipslab.modules.api import load_model

        loaded = load_model(model_path)
        loaded.encoder.to(device or default_device())
    size = model_image_size(loaded, image_size)
    dim = encoder_dim(loaded.encoder)
    if dim is not None and factory != AUTO:
        new_faiss_index(factory, dim)  # fail on a bad factory before minutes of extraction
    src = open_source(source, size, scenes_count=scenes_count, workers=decode_workers, decode=decode)
    records = extract_patches(loaded.encoder, src, feature=feature, batch_size=batch_size,
                              total=len(src) or None, progress=progress, desc=f"index {out.name}")
    return write_index(records, out, factory=factory, feature=feature, image_size=size, source=src,
                       model={**identity, "model_cfg": model_cfg_dict(loaded.model_cfg)},
                       overwrite=overwrite, train_size=train_size, progress=progress, seed=seed,
                       bytes_per_vector=bytes_per_vector, recall_target=recall_target, pool=pool,
                       bundle_model_from=model_path)


def write_index(records: Iterable[PatchRecord], out_dir, *, factory: str = "Flat", feature: str = "dense",
                image_size: int, model: dict, source: ImageSource | None = None, overwrite: bool = False,
                train_size: int | None = None, progress: bool = True, seed: int = 0,
                bytes_per_vector: float | None = None, recall_target: float = DEFAULT_TARGET, pool: int = 1,
                bundle_model_from=None):
    """Write an index directory from patch records, however they were computed.

    ``model`` is the manifest's model block (`model_identity` + ``model_cfg``): searching by text
    needs it, searching by vectors does not. ``source`` supplies the spec and the skipped images.
    ``factory="auto"`` chooses the factory for ``bytes_per_vector`` resident bytes (default 100;
    exact search up to 100k vectors) and tunes nprobe to ``recall_target``; ``pool`` > 1 indexes k x k pooled patches.
    ``bundle_model_from``: a tipslab checkpoint directory copied into ``model/`` (`bundle_model`).
    """
    from tipslab.retrieval.index_dir import IndexDirectory

    out = Path(out_dir).expanduser().resolve()
    check_out(out, overwrite)
    if not 0 < recall_target <= 1:
        raise TipslabError(f"--recall-target: expected a number in (0, 1], got {recall_target}")
    spec = source.spec if source is not None else "records"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    chmod_like_mkdir(tmp)
    try:
        clock = time.perf_counter()
        writer = PartWriter(tmp / VECTORS_DIR, first_part=0)
        rows, dim = ingest(pool_records(records, pool), tmp, writer, 0, 0, None)
        seconds = {"extract_and_store": time.perf_counter() - clock}
        skipped = list(source.skipped) if source is not None else []
        if source is not None:
            report_skipped(source, progress)
        if not rows:
            why = f" ({len(skipped)} unreadable)" if skipped else ""
            raise TipslabError(f"source {spec}: holds no readable images{why}")
        store = VectorStore(tmp, writer.parts, dim)
        total = int(store.starts[-1])
        budget = None if bytes_per_vector is None else int(bytes_per_vector * total)
        choice = choose_factory(total, dim, memory_budget=budget) if factory == AUTO else None
        chosen = choice.factory if choice else factory
        index = new_faiss_index(chosen, dim)
        if choice and choice.nlist and train_size is None:
            train_size = TRAIN_PER_LIST * choice.nlist
        clock = time.perf_counter()
        train_index(index, store, chosen, train_size, seed, progress)
        seconds["train"] = time.perf_counter() - clock
        add_to_index(index, store, range(len(writer.parts)), progress)
        seconds["add"] = time.perf_counter() - clock - seconds["train"]
        clock = time.perf_counter()
        rerank = 0 if exact_codes(index) else RERANK[0]
        search_params, tuning = default_search_params(index), None
        if factory == AUTO and ivf_of(index) is not None:
            tuning = _tune(index, store, (0,) if rerank == 0 else RERANK, recall_target, seed, progress)
            search_params, rerank = search_params_for(index, tuning["nprobe"]), tuning["rerank"]
        seconds["tune"] = time.perf_counter() - clock

        images = images_frame(rows)
        write_parquet(tmp / IMAGES_FILE, images)
        write_parquet(tmp / METADATA_FILE, metadata_frame(images))
        write_faiss(tmp / INDEX_FILE, index)
        files, parts = file_sizes(tmp, writer.parts)
        created = now_utc()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": created,
            "updated": created,
            "tipslab_version": tipslab_version(),
            "model": model,
            # The one preprocessing every command shares (datamodules/preprocess.py), as the source used it.
            "preprocessing": (source.preprocessing if source is not None and source.preprocessing
                              else Preprocessing(image_size).describe()),
            "feature": feature,
            "dim": dim,
            "normalisation": "l2",
            "metric": "inner_product",
            "factory": chosen,
            "factory_choice": None if choice is None else {"requested": AUTO, "reason": choice.reason,
                                                            "bytes_per_vector": bytes_per_vector},
            "faiss_class": type(faiss_module().downcast_index(index)).__name__,
            "search_params": search_params,
            "rerank": rerank,
            "tuning": tuning,
            "pooling": pool,
            "counts": {"images": len(rows), "vectors": int(index.ntotal), "skipped": len(skipped)},
            "skipped": skipped,
            "deleted": [],
            "files": files,
            "vectors": {"dtype": "float16", "parts": parts},
            "sources": [{"spec": spec, "added": created, "images": len(rows), "skipped": len(skipped)}],
            # where the build's time went (records in and float16 parts written, FAISS training, adding, tuning)
            "build_seconds": {key: round(value, 2) for key, value in seconds.items()},
        }
        if bundle_model_from is not None:
            manifest["model"] = {**manifest["model"], "bundled": bundle_model(bundle_model_from, tmp)}
        write_json(tmp / MANIFEST, manifest)
        fsync_path(tmp)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexDirectory.open(out)


def _tune(index, store: VectorStore, reranks: tuple[int, ...], target: float, seed: int, progress: bool) -> dict:
    """Per count of re-scored candidates, the fewest lists probed reaching ``target`` 10-recall@10 on
    held-out queries; of those that reach it, the fastest (a larger count deepens fewer queries,
    `candidates.py`, and can win); the best recall seen when none does."""
    rng = np.random.default_rng(seed + 1)
    total = int(store.starts[-1])
    queries = heldout_queries(store.sample(pool_size(total), rng), DEFAULT_QUERIES, rng)
    k = min(TUNE_K, total)
    truth = exact_top_k(store, queries, k)
    nlist = int(ivf_of(index).nlist)
    goal = min(1.0, target + TUNE_MARGIN)
    best, fastest = None, None
    for rerank in reranks:
        def run(q, nprobe, rerank=rerank):
            set_nprobe(index, nprobe)
            return search_candidates(index.search, store, q, k, total=total, rerank=rerank)[1]

        nprobe, recall, tried = tune_nprobe(run, nlist, queries, truth, k=k, target=goal)
        found = {"nprobe": nprobe, "recall": recall, "target": target, "k": k, "queries": len(queries),
                 "rerank": rerank, "tried": [list(t) for t in tried]}
        if recall >= goal:
            found["seconds"] = round(_seconds(run, queries, nprobe), 4)
            if fastest is None or found["seconds"] < fastest["seconds"] / SPEEDUP_TO_SWITCH:
                fastest = found
        if progress:
            timed = f", {found['seconds']:.3f} s for all" if "seconds" in found else ""
            print(f"rerank {rerank}, nprobe {nprobe}: {k}-recall@{k} {recall:.3f} on {len(queries)} held-out queries "
                  f"(target {target}){timed}")
        if best is None or recall > best["recall"] + 0.005:
            best = found
    return fastest or best


def _seconds(run, queries: np.ndarray, nprobe: int) -> float:
    """The best of two timed passes of the tuned search over the held-out queries."""
    times = []
    for _ in range(2):
        clock = time.perf_counter()
        run(queries, nprobe)
        times.append(time.perf_counter() - clock)
    return min(times)
