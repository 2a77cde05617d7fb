"""One extraction process's share of an index build, and the merge of every share into one index.

Rank r of W extracts images r, r + W, ... of the source into its own folder beside the target,
``.NAME.shards/rank-RRRRR-of-WWWWW/``: float16 vector parts (`vector_store.PartWriter`), a
table of its images (with each image's place in the whole source), generated images as PNG,
and last, written atomically, ``done.json`` (what was extracted: source listing, model sha256,
feature, image size; the rows, parts, skipped images). A share without ``done.json`` is
unfinished and is extracted again; one whose ``done.json`` matches a rerun is reused, so a
rerun after a crash only redoes what was lost.

`merged_records` reads the finished shares back in source order (the order one process would
have produced) as `PatchRecord`s for `write_index`, which trains one FAISS index over them and
publishes the directory atomically; the staging folder goes once the index is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from tipslab.errors import TipslabError
from tipslab.retrieval.build_steps import save_scene_image
from tipslab.retrieval.durable import atomic_json, write_parquet
from tipslab.retrieval.extract import ImageSource, PatchRecord, SourceImage
from tipslab.retrieval.index_layout import VECTORS_DIR
from tipslab.retrieval.vector_store import PartWriter, VectorStore

DONE = "done.json"
STARTED = "started.json"  # pid of the process extracting a share (for operators and tests)
ROWS = "images.parquet"
# What must match for a finished share to be reused by a rerun.
IDENTITY_KEYS = ("spec", "rank", "world", "listing", "model_sha256", "feature", "image_size")


def staging_dir(out: Path) -> Path:
    """Where the shares of a build of ``out`` live until the merge has published it."""
    return out.parent / f".{out.name}.shards"


def share_dir(staging: Path, rank: int, world: int) -> Path:
    return staging / f"rank-{rank:05d}-of-{world:05d}"


def read_done(folder: Path) -> dict | None:
    """A share's ``done.json``, or None when the share is unfinished (or its marker unreadable)."""
    try:
        return json.loads((folder / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finished_share(folder: Path, identity: dict) -> dict | None:
    """The share's ``done.json`` when it is finished with the same identity and its parts are whole."""
    done = read_done(folder)
    if not isinstance(done, dict) or any(done.get(k) != identity.get(k) for k in IDENTITY_KEYS):
        return None
    for part in done.get("parts", []):
        if not (folder / part["file"]).is_file():
            return None
    return done


def write_share(records: Iterable[PatchRecord], source: ImageSource, folder: Path, identity: dict,
                extra: dict) -> dict:
    """Store one process's records in ``folder`` and mark the share finished (``done.json`` last)."""
    import polars as pl

    if folder.exists():
        shutil.rmtree(folder)  # an unfinished share from a killed run
    folder.mkdir(parents=True)
    atomic_json(folder / STARTED, {"pid": os.getpid()})
    writer = PartWriter(folder / VECTORS_DIR, first_part=0)
    rows = []
    for record in records:
        image = record.image
        generated = image.path is None
        path = save_scene_image(folder, image.key, image.pixels) if generated else image.path
        writer.add(record.vectors)
        rows.append({"position": image.position, "key": image.key, "image_path": path, "generated": generated,
                     "image_width": image.size[0], "image_height": image.size[1],
                     "grid_h": record.grid[0], "grid_w": record.grid[1], "num_vectors": len(record.vectors)})
    writer.finish()
    schema = {"position": pl.Int64, "key": pl.String, "image_path": pl.String, "generated": pl.Boolean,
              "image_width": pl.Int32, "image_height": pl.Int32, "grid_h": pl.Int32, "grid_w": pl.Int32,
              "num_vectors": pl.Int32}
    write_parquet(folder / ROWS, pl.DataFrame(rows, schema=schema))
    done = {**identity, **extra, "images": len(rows), "parts": writer.parts, "skipped": list(source.skipped),
            "preprocessing": source.preprocessing}
    atomic_json(folder / DONE, done)
    return done


def check_shares(staging: Path, world: int) -> list[dict]:
    """Every share's ``done.json``, or a one-line error naming those that are not finished."""
    dones = [read_done(share_dir(staging, rank, world)) for rank in range(world)]
    missing = [rank for rank, done in enumerate(dones) if done is None]
    if missing:
        raise TipslabError(f"{staging}: rank(s) {missing} of {world} have not finished extracting; "
                           "run the same command again to finish them")
    first = dones[0]
    for rank, done in enumerate(dones):
        for key in ("spec", "model_sha256", "feature", "image_size", "world"):
            if done.get(key) != first.get(key):
                raise TipslabError(f"{share_dir(staging, rank, world)}/{DONE}: {key} {done.get(key)!r} differs "
                                   f"from rank 0's {first.get(key)!r}; delete {staging} and index again")
    return dones


def merged_source(dones: list[dict]) -> ImageSource:
    """The whole source as the merge sees it: its spec, preprocessing and every share's skipped images."""
    skipped = [entry for done in dones for entry in done.get("skipped", [])]
    return ImageSource(spec=dones[0]["spec"], images=(), count=sum(d["images"] for d in dones), skipped=skipped,
                       preprocessing=dones[0].get("preprocessing"))


def merged_records(staging: Path, dones: list[dict]) -> Iterator[PatchRecord]:
    """Every share's records in source order (by position), vectors read from the float16 parts."""
    import polars as pl
    import torch

    world = len(dones)
    tables, stores = [], []
    for rank, done in enumerate(dones):
        folder = share_dir(staging, rank, world)
        table = pl.read_parquet(folder / ROWS)
        firsts = np.concatenate([[0], np.cumsum(table["num_vectors"].to_numpy())[:-1]]).astype(np.int64)
        tables.append(table.with_columns(pl.lit(rank).alias("rank"), pl.Series("first", firsts)))
        stores.append(VectorStore(folder, done["parts"]))
    order = pl.concat(tables).sort("position")
    empty = torch.zeros(0)
    for row in order.iter_rows(named=True):
        folder = share_dir(staging, row["rank"], world)
        if row["generated"]:  # saved by the share as PNG; the index keeps its own copy
            pixels, path = _png_pixels(folder / row["image_path"]), None
        else:
            pixels, path = empty, row["image_path"]
        image = SourceImage(key=row["key"], path=path, size=(row["image_width"], row["image_height"]),
                            pixels=pixels, position=row["position"])
        vectors = stores[row["rank"]].rows(row["first"], row["num_vectors"])
        yield PatchRecord(image=image, grid=(row["grid_h"], row["grid_w"]), vectors=vectors)


def _png_pixels(path: Path):
    import torch
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)
