"""Building one index with several extraction processes: `tipslab index --workers N` (N local
processes, e.g. on a many-core CPU or N GPUs of one machine) and `tipslab index` under torchrun
(one process per GPU, on one or several nodes sharing a filesystem).

Rank r of W extracts images r, r + W, ... of the source into its own share (`shard_parts`),
then the shares are merged in source order into ONE index directory: one manifest, one FAISS
index trained over the whole collection, image ids contiguous and in the order one process
gives, so the result equals a one-process build. The merge is `write_index`, which builds
beside the target and renames it into place: until then the last committed index at ``--out``
is untouched. A killed rank leaves its share unfinished; the others' finished shares are kept,
and running the same command again extracts only what is missing, then merges.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from tipslab.errors import TipslabError
from tipslab.retrieval.build_steps import check_out, encoder_dim, model_image_size
from tipslab.retrieval.extract import FEATURES, check_source, extract_patches, open_source
from tipslab.retrieval.factory_choice import AUTO
from tipslab.retrieval.faiss_backend import new_faiss_index
from tipslab.retrieval.model_identity import model_cfg_dict, model_identity
from tipslab.retrieval.shard_parts import (
    check_shares,
    finished_share,
    merged_records,
    merged_source,
    read_done,
    share_dir,
    staging_dir,
    write_share,
)

WAIT_POLL_S = 1.0  # how often rank 0 under torchrun looks for the other ranks' finished shares


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str | None, local_rank: int) -> str:
    """One GPU per process (by local rank) when CUDA is asked for or present, else the CPU."""
    import torch

    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device or "cpu"


def extract_share(model_path, source, out, rank: int, world: int, *, feature: str = "dense",
                  batch_size: int | None = None, image_size: int | None = None, scenes_count: int | None = None,
                  device: str = "cpu", progress: bool = True, factory: str = AUTO,
                  decode_workers: int | None = None, decode: str = "full") -> dict:
    """Extract this rank's share of ``source`` for the index at ``out`` (reused if already finished)."""
    from tipslab.modules.api import load_model

    out = Path(out).expanduser().resolve()
    identity = model_identity(model_path)
    loaded = load_model(model_path)
    loaded.encoder.to(device)
    size = model_image_size(loaded, image_size)
    dim = encoder_dim(loaded.encoder)
    if dim is not None and factory != AUTO:
        new_faiss_index(factory, dim)  # fail on a bad factory before minutes of extraction
    src = open_source(source, size, scenes_count=scenes_count, shard=(rank, world), workers=decode_workers,
                      decode=decode)
    share = {"spec": src.spec, "rank": rank, "world": world, "listing": src.listing,
             "model_sha256": identity.get("sha256"), "feature": feature, "image_size": size}
    folder = share_dir(staging_dir(out), rank, world)
    done = finished_share(folder, share)
    if done is not None:
        if progress:
            print(f"rank {rank}/{world}: reusing its finished share ({done['images']} images) in {folder}")
        return done
    records = extract_patches(loaded.encoder, src, feature=feature, batch_size=batch_size,
                              total=len(src) or None, progress=progress, desc=f"rank {rank}/{world}")
    return write_share(records, src, folder, share, {"model_cfg": model_cfg_dict(loaded.model_cfg)})


def merge_shares(model_path, out, world: int, *, factory: str = AUTO, overwrite: bool = False, progress: bool = True,
                 **write_kwargs):
    """Merge the ``world`` finished shares into one index directory at ``out`` (atomically), then
    remove them. ``write_kwargs`` go to `write_index` (train_size, seed, bytes_per_vector, ...)."""
    from tipslab.retrieval.index_build import write_index

    out = Path(out).expanduser().resolve()
    staging = staging_dir(out)
    dones = check_shares(staging, world)
    identity = model_identity(model_path)
    if identity.get("sha256") != dones[0].get("model_sha256"):
        raise TipslabError(f"MODEL_PATH {model_path}: its weights changed since the shares in {staging} were "
                           "extracted; delete that folder and index again")
    first = dones[0]
    if progress:
        print(f"merging {world} shares ({sum(d['images'] for d in dones)} images) into {out}")
    index = write_index(merged_records(staging, dones), out, factory=factory, feature=first["feature"],
                        image_size=int(first["image_size"]), source=merged_source(dones),
                        model={**identity, "model_cfg": first.get("model_cfg")}, overwrite=overwrite,
                        progress=progress, bundle_model_from=model_path, **write_kwargs)
    shutil.rmtree(staging, ignore_errors=True)
    return index


def build_index_sharded(model_path, source, out_dir, workers: int, *, factory: str = AUTO, feature: str = "dense",
                        batch_size: int | None = None, overwrite: bool = False, image_size: int | None = None,
                        scenes_count: int | None = None, device: str | None = None, progress: bool = True,
                        decode_workers: int | None = None, decode: str = "full", **write_kwargs):
    """`build_index` with ``workers`` local extraction processes, merged into one index."""
    import multiprocessing

    out = Path(out_dir).expanduser().resolve()
    if feature not in FEATURES:
        raise TipslabError(f"--feature: expected one of {FEATURES}, got {feature!r}")
    check_out(out, overwrite)
    check_source(source)
    model_identity(model_path)  # a missing model fails here, once, not in every worker
    extract = {"feature": feature, "batch_size": batch_size, "image_size": image_size, "scenes_count": scenes_count,
               "progress": progress, "factory": factory, "decode_workers": decode_workers, "decode": decode}
    context = multiprocessing.get_context("spawn")  # fork would copy this process's threads and CUDA state
    processes = [context.Process(target=_local_rank_main, name=f"tipslab-index-rank-{rank}",
                                 args=(model_path, source, str(out), rank, workers, device, extract))
                 for rank in range(workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except BaseException:
        for process in processes:
            process.kill()
        raise
    failed = [(rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        what = ", ".join(f"rank {rank} was killed by signal {-code}" if code < 0 else f"rank {rank} failed (exit {code})"
                         for rank, code in failed)
        raise TipslabError(f"index --workers {workers}: {what}; {out} is as last committed. Finished ranks are kept "
                           f"in {staging_dir(out)}: run the same command again to finish")
    return merge_shares(model_path, out, workers, factory=factory, overwrite=overwrite, progress=progress,
                        **write_kwargs)


def _local_rank_main(model_path, source, out: str, rank: int, world: int, device: str | None, extract: dict) -> None:
    """One local worker process: its share of the threads and of the GPUs, one-line errors."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        extract_share(model_path, source, out, rank, world, device=rank_device(device, rank), **extract)
    except TipslabError as err:
        print(f"tipslab index: rank {rank}: error: {err}", file=sys.stderr)
        sys.exit(2)


def build_index_torchrun(model_path, source, out_dir, *, factory: str = AUTO, feature: str = "dense",
                         batch_size: int | None = None, overwrite: bool = False, image_size: int | None = None,
                         scenes_count: int | None = None, device: str | None = None, progress: bool = True,
                         decode_workers: int | None = None, decode: str = "full", **write_kwargs):
    """This process's part of a torchrun build: extract its share; rank 0 then waits for the
    others and merges. Returns the index on rank 0, None elsewhere."""
    rank, world, local_rank = torchrun_rank()
    out = Path(out_dir).expanduser().resolve()
    if rank == 0:
        check_out(out, overwrite)
    extract_share(model_path, source, out, rank, world, feature=feature, batch_size=batch_size, image_size=image_size,
                  scenes_count=scenes_count, device=rank_device(device, local_rank), progress=progress and rank == 0,
                  factory=factory, decode_workers=decode_workers, decode=decode)
    if rank != 0:
        return None
    staging = staging_dir(out)
    # torchrun stops every rank when one fails, so waiting here cannot outlive a dead rank.
    while any(read_done(share_dir(staging, r, world)) is None for r in range(world)):
        time.sleep(WAIT_POLL_S)
    return merge_shares(model_path, out, world, factory=factory, overwrite=overwrite, progress=progress,
                        **write_kwargs)
