"""The steps writing an index is made of, shared by `build_index` / `write_index` and
`IndexDirectory.add`: the per-image and per-vector tables, ingesting patch records into vector
parts and image rows, training and filling the FAISS index, and publishing a finished build in
place of an existing directory."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tipslab.errors import TipslabError
from tipslab.retrieval.durable import fsync_path, swap_dirs
from tipslab.retrieval.extract import ImageSource, PatchRecord
from tipslab.retrieval.faiss_backend import (
    QUANTIZER_EF_ADD,
    cluster_on_gpu,
    gpu_available,
    ivf_of,
    min_train_points,
    set_quantizer_ef,
)
from tipslab.retrieval.index_layout import IMAGES_DIR, MANIFEST
from tipslab.retrieval.ivf_build import flat_assignment, train_two_level
from tipslab.retrieval.vector_store import ADD_CHUNK, PartWriter, VectorStore


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- building tables

def images_frame(rows: list[dict]):
    import polars as pl

    schema = {"image_id": pl.Int64, "key": pl.String, "image_path": pl.String, "image_width": pl.Int32,
              "image_height": pl.Int32, "grid_h": pl.Int32, "grid_w": pl.Int32,
              "first_vector_id": pl.Int64, "num_vectors": pl.Int32}
    return pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)


def metadata_frame(images):
    """One row per vector, expanded from the per-image table (an image's vectors are contiguous)."""
    import polars as pl

    counts = images["num_vectors"].to_numpy().astype(np.int64)
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(images)), counts)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    within = np.arange(total, dtype=np.int64) - np.repeat(offsets, counts)
    grid_w = images["grid_w"].to_numpy()[owner].astype(np.int64)
    first = int(images["first_vector_id"][0]) if len(images) else 0
    return pl.DataFrame({
        "vector_id": np.arange(first, first + total, dtype=np.int64),
        "image_id": images["image_id"].to_numpy()[owner],
        "image_path": images["image_path"].gather(owner),
        "image_width": images["image_width"].to_numpy()[owner],
        "image_height": images["image_height"].to_numpy()[owner],
        "grid_h": images["grid_h"].to_numpy()[owner],
        "grid_w": grid_w.astype(np.int32),
        "patch_row": (within // grid_w).astype(np.int32),
        "patch_col": (within % grid_w).astype(np.int32),
    })


def save_scene_image(root: Path, key: str, pixels) -> str:
    """Write a generated image as PNG under images/; returns its path relative to the index."""
    from PIL import Image

    name = key.replace(":", "-").replace("/", "-") + ".png"
    array = (pixels.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    target = root / IMAGES_DIR / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, target)
    return f"{IMAGES_DIR}/{name}"


def ingest(records: Iterable[PatchRecord], root: Path, writer: PartWriter, first_image_id: int,
            first_vector_id: int, dim: int | None) -> tuple[list[dict], int | None]:
    """Store each record's vectors and describe its image; returns (image rows, dim)."""
    rows = []
    vector_id = first_vector_id
    for record in records:
        vectors = record.vectors
        if dim is None:
            dim = int(vectors.shape[1])
        elif vectors.shape[1] != dim:
            raise TipslabError(f"{record.image.key}: embedding dim {vectors.shape[1]} differs from the index's {dim}")
        image = record.image
        path = image.path if image.path is not None else save_scene_image(root, image.key, image.pixels)
        writer.add(vectors)
        rows.append({"image_id": first_image_id + len(rows), "key": image.key, "image_path": path,
                     "image_width": image.size[0], "image_height": image.size[1],
                     "grid_h": record.grid[0], "grid_w": record.grid[1],
                     "first_vector_id": vector_id, "num_vectors": len(vectors)})
        vector_id += len(vectors)
    writer.finish()
    return rows, dim


def report_skipped(source: ImageSource, progress: bool) -> None:
    if source.skipped and progress:
        print(f"skipped {len(source.skipped)} unreadable image(s) from {source.spec} (listed in {MANIFEST})")


def model_image_size(loaded, image_size: int | None) -> int:
    if image_size is None:
        cfg = loaded.model_cfg
        try:
            image_size = int(cfg["vision"]["img_size"])
        except (KeyError, TypeError):
            image_size = int(getattr(getattr(loaded.encoder, "vision", None), "img_size", 224))
    if image_size <= 0 or image_size % 14:
        raise TipslabError(f"image_size: expected a positive multiple of the patch size 14, got {image_size}")
    return image_size


# ---------------------------------------------------------------- build steps

def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        kind = "an index directory" if (out / MANIFEST).exists() else "a path"
        raise TipslabError(f"--out {out}: {kind} already exists; pass --overwrite to replace it "
                           "(or add images to an index with --add)")
    if out.exists() and not out.is_dir():
        raise TipslabError(f"--out {out}: exists and is not a directory")


def chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 directories; an index should get the permissions a plain mkdir gives."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def publish(tmp: Path, out: Path) -> None:
    """Move the finished build into place; an existing ``out`` is swapped out in one step."""
    if not out.exists():
        os.rename(tmp, out)
    elif swap_dirs(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old index
    else:  # no atomic exchange on this system: two renames, old copy kept until the new is in
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(out.parent)


def encoder_dim(encoder) -> int | None:
    for owner in (getattr(encoder, "vision", None), encoder):
        dim = getattr(owner, "embed_dim", None)
        if isinstance(dim, int):
            return dim
    return None


def tipslab_version() -> str:
    import tipslab

    return getattr(tipslab, "__version__", "unknown")


def train_index(index, store: VectorStore, factory: str, train_size: int | None, seed: int, progress: bool) -> None:
    if index.is_trained:
        return
    total = int(store.starts[-1])
    needed = min_train_points(index)
    if total < needed:
        raise TipslabError(f"--factory {factory!r}: training needs at least {needed} vectors, the collection "
                           f"has {total}; use a smaller nlist/code size or --factory Flat")
    ivf = ivf_of(index)
    nlist = int(ivf.nlist) if ivf is not None else 1
    count = train_size or max(needed, 256 * nlist, 65536)
    cluster_on_gpu(index)
    if progress:
        print(f"training {factory} on {min(count, total)} of {total} vectors")
    sample = store.sample(count, np.random.default_rng(seed))
    try:
        if not (ivf is not None and not gpu_available() and train_two_level(index, sample, seed)):
            index.train(sample)
    except RuntimeError as err:
        raise TipslabError(f"--factory {factory!r}: FAISS training failed ({str(err).strip().splitlines()[-1]})") from None


def add_to_index(index, store: VectorStore, parts: Iterable[int], progress: bool) -> None:
    from tqdm.auto import tqdm

    parts = list(parts)
    total = sum(store.parts[i]["rows"] for i in parts)
    set_quantizer_ef(index, QUANTIZER_EF_ADD)  # assign each vector to its nearest list, not a near one
    with (tqdm(total=total, desc="faiss add", unit="vec", disable=not progress or total < 4 * ADD_CHUNK) as bar,
          flat_assignment(index)):
        for chunk in store.iter_chunks(parts=parts):
            index.add(chunk)
            bar.update(len(chunk))
