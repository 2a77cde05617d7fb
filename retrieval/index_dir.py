"""The index directory: a self-describing, crash-safe FAISS index of an image collection's patches.

Layout (all written by this module, read by a fresh process with nothing else)::

    manifest.json        what the index is: model (path + sha256), preprocessing, feature, dims,
                         metric, factory, counts, skipped images, vector parts
    index.faiss          FAISS index over every patch vector; FAISS id == vector_id (sequential)
    metadata.parquet     one row per vector: vector_id, image_id, image_path, image_width,
                         image_height, grid_h, grid_w, patch_row, patch_col
    images.parquet       one row per image: image_id, key, image_path, size, grid, first_vector_id,
                         num_vectors (the fast way from a FAISS id to its image)
    vectors/part-*.npy   float16 copies of the vectors, memory-mapped for exact re-scoring and
                         heatmaps (compressed factories cannot reconstruct their inputs)
    images/              generated images (scenes) saved as PNG so overlays can show them; their
                         image_path is relative to the index directory, file images' is absolute

Crash safety. `build_index` writes everything into a temporary directory beside the target and
renames it into place (swapping atomically with an existing one under ``overwrite``).
`IndexDirectory.add` writes new vector parts under fresh names and the replaced files as
``*.pending``; a journal (``.commit.json``) written atomically is the commit point, after which the
renames are redone by whoever opens the directory next. A kill at any moment leaves either the
old index or the new one, never a mix (a killed build leaves a hidden ``.NAME.building-*``
directory beside it, safe to delete). One writer at a time: `add` holds ``.lock``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tipslab.errors import TipslabError
from tipslab.retrieval.extract import (
    FEATURES,
    ImageSource,
    PatchRecord,
    check_source,
    extract_patches,
    open_source,
)

FORMAT = "tipslab-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
IMAGES_FILE = "images.parquet"
VECTORS_DIR = "vectors"
IMAGES_DIR = "images"
JOURNAL = ".commit.json"
LOCK = ".lock"
EXPECTED = (MANIFEST, INDEX_FILE, METADATA_FILE, IMAGES_FILE, VECTORS_DIR + "/")
PART_ROWS = 1 << 20  # vectors per part file; an image never straddles two parts
DEFAULT_NPROBE = 16
ADD_CHUNK = 65536


# ---------------------------------------------------------------- small durable-file helpers

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write_json(tmp, data)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _write_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_parquet(path: Path, frame) -> None:
    frame.write_parquet(path)
    _fsync_path(path)


def _write_faiss(path: Path, index) -> None:
    import faiss

    faiss.write_index(_to_cpu(index), str(path))
    _fsync_path(path)


def _swap_dirs(a: Path, b: Path) -> bool:
    """Exchange two directories in one atomic step (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _commit(root: Path, renames: dict[str, str]) -> None:
    """Replace several files of ``root`` as one unit: journal first, then the renames."""
    _atomic_json(root / JOURNAL, {"renames": renames})
    _redo_journal(root)


def _redo_journal(root: Path) -> None:
    """Finish an interrupted commit. Idempotent: a rename already done has no source left."""
    journal = root / JOURNAL
    if not journal.exists():
        return
    try:
        renames = json.loads(journal.read_text(encoding="utf-8"))["renames"]
    except FileNotFoundError:
        return  # another process finished it a moment ago
    for final, pending in renames.items():
        # A rename already done has no source left; another process may be redoing it too.
        with contextlib.suppress(FileNotFoundError):
            os.replace(root / pending, root / final)
    _fsync_path(root)
    journal.unlink(missing_ok=True)
    _fsync_path(root)


@contextlib.contextmanager
def _locked(root: Path):
    """One writer at a time per index directory (readers need no lock: commits are atomic)."""
    import fcntl

    with open(root / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TipslabError(f"{root}: another process is adding to this index; try again when it is done") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- model identity

def _weights_file(model_path: Path) -> Path | None:
    if model_path.is_file():
        return model_path
    candidate = model_path / "model.safetensors"
    return candidate if candidate.is_file() else None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model_path: str | os.PathLike) -> dict:
    """Where the model is and which weights it holds (sha256 of model.safetensors)."""
    path = Path(model_path).expanduser()
    if not path.exists():
        # A release name (resolved by load_model); nothing on disk to hash.
        return {"source": str(model_path), "path": None, "weights": None, "sha256": None}
    path = path.resolve()
    weights = _weights_file(path)
    info = {"source": str(model_path), "path": str(path), "weights": None, "sha256": None}
    if weights is not None:
        stat = weights.stat()
        info.update(weights=weights.name, sha256=sha256_file(weights), bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return info


def _model_cfg_dict(model_cfg) -> dict | None:
    if model_cfg is None:
        return None
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(model_cfg, DictConfig):
            return OmegaConf.to_container(model_cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is part of the stack
        pass
    return json.loads(json.dumps(model_cfg, default=str))


def load_indexed_model(manifest: dict, where: Path, device: str | None = None):
    """The manifest's model, refusing weights that differ from the ones the index was built with."""
    from tipslab.platform.api import load_model

    info = manifest["model"]
    source = info.get("path") or info.get("source")
    if info.get("path"):
        path = Path(info["path"])
        if not path.exists():
            raise TipslabError(f"{where}/{MANIFEST}: model.path {path} does not exist any more "
                               "(the index needs the model it was built with to embed queries)")
        weights = _weights_file(path)
        if info.get("sha256") and weights is not None:
            stat = weights.stat()
            # Hash only when the file looks changed: hashing GBs of weights on every query is slow.
            if stat.st_size != info.get("bytes") or stat.st_mtime_ns != info.get("mtime_ns"):
                if sha256_file(weights) != info["sha256"]:
                    raise TipslabError(f"{where}/{MANIFEST}: {weights} no longer matches the index's model "
                                       f"(sha256 {info['sha256'][:12]}...); rebuild the index with `tipslab index`")
    loaded = load_model(source)
    if device is not None:
        loaded.encoder.to(device)
    return loaded


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- FAISS helpers

def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_gpu(index):
    """A GPU clone of a Flat/IVF index for searching; the CPU index where that is not possible.

    Untested here (no GPU in CI); kept small on purpose. HNSW and some codecs do not clone.
    """
    faiss = _faiss()
    try:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.referenced_resources = resources  # keep the resources alive with the index
        return gpu_index
    except Exception:  # noqa: BLE001 - any failure means: search on CPU
        return index


def _to_cpu(index):
    faiss = _faiss()
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


def new_faiss_index(factory: str, dim: int):
    """An empty inner-product index from a factory string, or a clear error naming the string."""
    faiss = _faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "rejected"
        raise TipslabError(f"--factory {factory!r}: FAISS cannot build it for dim {dim} ({first})") from None


def _min_train_points(index) -> int:
    """The fewest training vectors FAISS accepts for this index (k-means needs >= k points)."""
    faiss = _faiss()
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


def _search_params(index) -> str:
    """Default search parameters kept in the manifest (IVF: probe 16 lists, or all if fewer)."""
    faiss = _faiss()
    try:
        nlist = int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return ""
    return f"nprobe={min(nlist, DEFAULT_NPROBE)}"


def _apply_params(index, params: str) -> None:
    if not params:
        return
    faiss = _faiss()
    space = faiss.GpuParameterSpace() if "Gpu" in type(index).__name__ else faiss.ParameterSpace()
    try:
        space.set_index_parameters(index, params)
    except RuntimeError as err:
        raise TipslabError(f"search params {params!r}: FAISS rejects them for this index ({err})") from None


# ---------------------------------------------------------------- the vector store

class _PartWriter:
    """Appends float16 vectors to ``vectors/part-NNNNN.npy`` files, splitting at image boundaries."""

    def __init__(self, folder: Path, first_part: int):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.next_part = first_part
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.parts: list[dict] = []

    def add(self, vectors: np.ndarray) -> None:
        if self.pending_rows and self.pending_rows + len(vectors) > PART_ROWS:
            self.flush()
        self.pending.append(vectors.astype(np.float16))
        self.pending_rows += len(vectors)

    def flush(self) -> None:
        if not self.pending_rows:
            return
        name = f"part-{self.next_part:05d}.npy"
        _write_npy(self.folder / name, np.concatenate(self.pending))
        self.parts.append({"file": f"{VECTORS_DIR}/{name}", "rows": self.pending_rows})
        self.next_part += 1
        self.pending, self.pending_rows = [], 0


class _VectorStore:
    """Read access to the float16 parts: rows by global vector id, memory-mapped."""

    def __init__(self, root: Path, parts: list[dict]):
        self.root = root
        self.parts = parts
        self.starts = np.cumsum([0] + [p["rows"] for p in parts])
        self._arrays: dict[int, np.ndarray] = {}

    def _part(self, i: int) -> np.ndarray:
        if i not in self._arrays:
            self._arrays[i] = np.load(self.root / self.parts[i]["file"], mmap_mode="r")
        return self._arrays[i]

    def rows(self, start: int, count: int) -> np.ndarray:
        """float32 rows ``[start, start + count)``; they lie in one part (images never straddle)."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        local = start - int(self.starts[i])
        return np.asarray(self._part(i)[local:local + count], dtype=np.float32)

    def iter_chunks(self, chunk: int = ADD_CHUNK, parts: Iterable[int] | None = None):
        for i in (range(len(self.parts)) if parts is None else parts):
            array = self._part(i)
            for lo in range(0, len(array), chunk):
                yield np.ascontiguousarray(array[lo:lo + chunk], dtype=np.float32)

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        total = int(self.starts[-1])
        picks = np.sort(rng.choice(total, size=min(count, total), replace=False))
        out = np.empty((len(picks), self._part(0).shape[1]), dtype=np.float32)
        for i in range(len(self.parts)):
            lo, hi = np.searchsorted(picks, [self.starts[i], self.starts[i + 1]])
            if hi > lo:
                out[lo:hi] = self._part(i)[picks[lo:hi] - self.starts[i]]
        return out


# ---------------------------------------------------------------- building tables

def _images_frame(rows: list[dict]):
    import polars as pl

    schema = {"image_id": pl.Int64, "key": pl.String, "image_path": pl.String, "image_width": pl.Int32,
              "image_height": pl.Int32, "grid_h": pl.Int32, "grid_w": pl.Int32,
              "first_vector_id": pl.Int64, "num_vectors": pl.Int32}
    return pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)


def _metadata_frame(images):
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


def _save_scene_image(root: Path, key: str, pixels) -> str:
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


def _ingest(records: Iterable[PatchRecord], root: Path, writer: _PartWriter, first_image_id: int,
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
        path = image.path if image.path is not None else _save_scene_image(root, image.key, image.pixels)
        writer.add(vectors)
        rows.append({"image_id": first_image_id + len(rows), "key": image.key, "image_path": path,
                     "image_width": image.size[0], "image_height": image.size[1],
                     "grid_h": record.grid[0], "grid_w": record.grid[1],
                     "first_vector_id": vector_id, "num_vectors": len(vectors)})
        vector_id += len(vectors)
    writer.flush()
    return rows, dim


def _report_skipped(source: ImageSource, progress: bool) -> None:
    if source.skipped and progress:
        print(f"skipped {len(source.skipped)} unreadable image(s) from {source.spec} (listed in {MANIFEST})")


def _model_image_size(loaded, image_size: int | None) -> int:
    if image_size is None:
        cfg = loaded.model_cfg
        try:
            image_size = int(cfg["vision"]["img_size"])
        except (KeyError, TypeError):
            image_size = int(getattr(getattr(loaded.encoder, "vision", None), "img_size", 224))
    if image_size <= 0 or image_size % 14:
        raise TipslabError(f"image_size: expected a positive multiple of the patch size 14, got {image_size}")
    return image_size


# ---------------------------------------------------------------- build

def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        kind = "an index directory" if (out / MANIFEST).exists() else "a path"
        raise TipslabError(f"--out {out}: {kind} already exists; pass --overwrite to replace it "
                           "(or add images to an index with --add)")
    if out.exists() and not out.is_dir():
        raise TipslabError(f"--out {out}: exists and is not a directory")


def build_index(model_path, source, out_dir, factory: str = "Flat", feature: str = "dense", batch_size: int = 16,
                overwrite: bool = False, *, image_size: int | None = None, scenes_count: int | None = None,
                train_size: int | None = None, device: str | None = None, progress: bool = True,
                loaded=None, seed: int = 0) -> "IndexDirectory":
    """Index every image of ``source`` (a folder or ``scenes:val[:N]``) into a new directory.

    ``loaded`` is an already loaded model for ``model_path`` (saves loading it twice in one
    process). IVF-style factories are trained on a sample of the collection's own vectors
    (``train_size``; default 256 per centroid, at least 65536).
    """
    out = Path(out_dir).expanduser().resolve()
    if feature not in FEATURES:
        raise TipslabError(f"--feature: expected one of {FEATURES}, got {feature!r}")
    _check_out(out, overwrite)
    check_source(source)  # a typo in SOURCE should not cost a model load
    identity = model_identity(model_path)
    if loaded is None:
        from tipslab.platform.api import load_model

        loaded = load_model(model_path)
        loaded.encoder.to(device or _default_device())
    size = _model_image_size(loaded, image_size)
    dim = _encoder_dim(loaded.encoder)
    if dim is not None:
        new_faiss_index(factory, dim)  # fail on a bad factory before minutes of extraction
    src = open_source(source, size, scenes_count=scenes_count)
    records = extract_patches(loaded.encoder, src, feature=feature, batch_size=batch_size,
                              total=len(src) or None, progress=progress, desc=f"index {out.name}")
    return write_index(records, out, factory=factory, feature=feature, image_size=size, source=src,
                       model={**identity, "model_cfg": _model_cfg_dict(loaded.model_cfg)},
                       overwrite=overwrite, train_size=train_size, progress=progress, seed=seed)


def write_index(records: Iterable[PatchRecord], out_dir, *, factory: str = "Flat", feature: str = "dense",
                image_size: int, model: dict, source: ImageSource | None = None, overwrite: bool = False,
                train_size: int | None = None, progress: bool = True, seed: int = 0) -> "IndexDirectory":
    """Write an index directory from patch records, however they were computed.

    ``model`` is the manifest's model block (`model_identity` + ``model_cfg``): searching by text
    needs it, searching by vectors does not. ``source`` supplies the spec and the skipped images.
    """
    out = Path(out_dir).expanduser().resolve()
    _check_out(out, overwrite)
    spec = source.spec if source is not None else "records"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    _chmod_like_mkdir(tmp)
    try:
        writer = _PartWriter(tmp / VECTORS_DIR, first_part=0)
        rows, dim = _ingest(records, tmp, writer, 0, 0, None)
        skipped = list(source.skipped) if source is not None else []
        if source is not None:
            _report_skipped(source, progress)
        if not rows:
            why = f" ({len(skipped)} unreadable)" if skipped else ""
            raise TipslabError(f"source {spec}: holds no readable images{why}")
        store = _VectorStore(tmp, writer.parts)
        index = new_faiss_index(factory, dim)
        _train(index, store, factory, train_size, seed, progress)
        _add_to_index(index, store, range(len(writer.parts)), progress)

        images = _images_frame(rows)
        _write_parquet(tmp / IMAGES_FILE, images)
        _write_parquet(tmp / METADATA_FILE, _metadata_frame(images))
        _write_faiss(tmp / INDEX_FILE, index)
        created = _now()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": created,
            "updated": created,
            "tipslab_version": _tipslab_version(),
            "model": model,
            "preprocessing": {
                "image_size": image_size,
                "resize": "whole image to image_size x image_size, bilinear antialiased, aspect not kept, no crop",
                "pixel_range": [0.0, 1.0],
                "mean_std": None,
            },
            "feature": feature,
            "dim": dim,
            "normalisation": "l2",
            "metric": "inner_product",
            "factory": factory,
            "faiss_class": type(_faiss().downcast_index(index)).__name__,
            "search_params": _search_params(index),
            "counts": {"images": len(rows), "vectors": int(index.ntotal), "skipped": len(skipped)},
            "skipped": skipped,
            "vectors": {"dtype": "float16", "parts": writer.parts},
            "sources": [{"spec": spec, "added": created, "images": len(rows), "skipped": len(skipped)}],
        }
        _write_json(tmp / MANIFEST, manifest)
        _fsync_path(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexDirectory.open(out)


def _chmod_like_mkdir(path: Path) -> None:
    """mkdtemp makes 0700 directories; an index should get the permissions a plain mkdir gives."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished build into place; an existing ``out`` is swapped out in one step."""
    if not out.exists():
        os.rename(tmp, out)
    elif _swap_dirs(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old index
    else:  # no atomic exchange on this system: two renames, old copy kept until the new is in
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(out.parent)


def _encoder_dim(encoder) -> int | None:
    for owner in (getattr(encoder, "vision", None), encoder):
        dim = getattr(owner, "embed_dim", None)
        if isinstance(dim, int):
            return dim
    return None


def _tipslab_version() -> str:
    import tipslab

    return getattr(tipslab, "__version__", "unknown")


def _train(index, store: _VectorStore, factory: str, train_size: int | None, seed: int, progress: bool) -> None:
    if index.is_trained:
        return
    total = int(store.starts[-1])
    needed = _min_train_points(index)
    if total < needed:
        raise TipslabError(f"--factory {factory!r}: training needs at least {needed} vectors, the collection "
                           f"has {total}; use a smaller nlist/code size or --factory Flat")
    try:
        nlist = int(_faiss().extract_index_ivf(index).nlist)
    except RuntimeError:
        nlist = 1
    count = train_size or max(needed, 256 * nlist, 65536)
    if progress:
        print(f"training {factory} on {min(count, total)} of {total} vectors")
    try:
        index.train(store.sample(count, np.random.default_rng(seed)))
    except RuntimeError as err:
        raise TipslabError(f"--factory {factory!r}: FAISS training failed ({str(err).strip().splitlines()[-1]})") from None


def _add_to_index(index, store: _VectorStore, parts: Iterable[int], progress: bool) -> None:
    from tqdm.auto import tqdm

    parts = list(parts)
    total = sum(store.parts[i]["rows"] for i in parts)
    with tqdm(total=total, desc="faiss add", unit="vec", disable=not progress or total < 4 * ADD_CHUNK) as bar:
        for chunk in store.iter_chunks(parts=parts):
            index.add(chunk)
            bar.update(len(chunk))


# ---------------------------------------------------------------- open / read / add

class IndexDirectory:
    """An opened index directory: its manifest, tables, vector store and FAISS index."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._index = None
        self._search_index = None
        self._images = None
        self._metadata = None
        self.store = _VectorStore(path, manifest["vectors"]["parts"])

    # -- opening

    @classmethod
    def open(cls, path) -> "IndexDirectory":
        root = Path(path).expanduser()
        if not root.exists():
            raise TipslabError(f"{root}: does not exist (expected a tipslab index directory made by `tipslab index`)")
        if not root.is_dir():
            raise TipslabError(f"{root}: is not a directory (expected a tipslab index directory)")
        root = root.resolve()
        if (root / JOURNAL).exists():
            try:
                _redo_journal(root)  # finish an add that was killed after its commit point
            except OSError as err:
                raise TipslabError(f"{root}: an interrupted add must be finished but the directory "
                                   f"is not writable ({err})") from None
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise TipslabError(f"{root} is not a tipslab index directory: missing {MANIFEST} "
                               f"(expected files: {', '.join(EXPECTED)})")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TipslabError(f"{manifest_path}: is not valid JSON ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise TipslabError(f"{manifest_path}: 'format' is not {FORMAT!r} (not a tipslab index manifest)")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise TipslabError(f"{manifest_path}: format_version {version!r} is not one this tipslab reads "
                               f"(<= {FORMAT_VERSION}); upgrade tipslab")
        for key in ("model", "dim", "feature", "factory", "counts", "vectors", "preprocessing"):
            if key not in manifest:
                raise TipslabError(f"{manifest_path}: missing key {key!r}")
        for name in (INDEX_FILE, METADATA_FILE, IMAGES_FILE):
            if not (root / name).is_file():
                raise TipslabError(f"{root}: missing {name} (listed in {MANIFEST}; expected files: {', '.join(EXPECTED)})")
        for part in manifest["vectors"]["parts"]:
            if not (root / part["file"]).is_file():
                raise TipslabError(f"{root}: missing vector part {part['file']} (listed in {MANIFEST})")
        directory = cls(root, manifest)
        stored = int(directory.store.starts[-1])
        if stored != manifest["counts"]["vectors"]:
            raise TipslabError(f"{root}: vector parts hold {stored} rows, {MANIFEST} says "
                               f"{manifest['counts']['vectors']}")
        return directory

    # -- properties

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def num_images(self) -> int:
        return int(self.manifest["counts"]["images"])

    @property
    def num_vectors(self) -> int:
        return int(self.manifest["counts"]["vectors"])

    @property
    def feature(self) -> str:
        return self.manifest["feature"]

    @property
    def image_size(self) -> int:
        return int(self.manifest["preprocessing"]["image_size"])

    @property
    def index(self):
        """The CPU FAISS index (loaded on first use, checked against the manifest)."""
        if self._index is None:
            faiss = _faiss()
            index = faiss.read_index(str(self.path / INDEX_FILE))
            if index.ntotal != self.num_vectors or index.d != self.dim:
                raise TipslabError(f"{self.path}/{INDEX_FILE}: holds {index.ntotal} vectors of dim {index.d}, "
                                   f"{MANIFEST} says {self.num_vectors} of dim {self.dim}")
            self._index = index
        return self._index

    @property
    def images(self):
        """Per-image table (polars), row i == image_id i."""
        if self._images is None:
            import polars as pl

            self._images = pl.read_parquet(self.path / IMAGES_FILE)
            if len(self._images) != self.num_images:
                raise TipslabError(f"{self.path}/{IMAGES_FILE}: {len(self._images)} rows, "
                                   f"{MANIFEST} says {self.num_images} images")
        return self._images

    @property
    def metadata(self):
        """Per-vector table (polars), row i == vector_id i."""
        if self._metadata is None:
            import polars as pl

            self._metadata = pl.read_parquet(self.path / METADATA_FILE)
        return self._metadata

    # -- reading

    def image_ids_of(self, vector_ids) -> np.ndarray:
        """Image id of each vector id (-1 stays -1: FAISS's "no result")."""
        ids = np.asarray(vector_ids, dtype=np.int64)
        firsts = self.images["first_vector_id"].to_numpy()
        owner = np.searchsorted(firsts, ids, side="right") - 1
        return np.where(ids < 0, -1, owner)

    def image_vectors(self, image_id: int) -> np.ndarray:
        """float32 ``[num_vectors, D]`` of one image, row-major over its patch grid."""
        row = self.images.row(int(image_id), named=True)
        return self.store.rows(int(row["first_vector_id"]), int(row["num_vectors"]))

    def image_info(self, image_id: int) -> dict:
        return self.images.row(int(image_id), named=True)

    def resolve_image_path(self, image_path: str) -> Path:
        """Stored paths are absolute, or relative to the index (generated images under images/)."""
        path = Path(image_path)
        return path if path.is_absolute() else self.path / path

    def search_vectors(self, queries, k: int, *, params: str | None = None, gpu: bool | None = None):
        """Raw FAISS top-k: (scores float32 [Q, k], vector ids int64 [Q, k]); ids -1 pad short lists.

        ``params`` is a FAISS parameter string (e.g. ``"nprobe=32"``); default the manifest's.
        ``gpu`` None = use a GPU when one is present.
        """
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise TipslabError(f"query vectors: expected dim {self.dim} (the index's), got {q.shape[1]}")
        if k <= 0:
            raise TipslabError(f"k: expected a positive integer, got {k}")
        index = self._searcher(gpu)
        if "Gpu" in type(index).__name__:
            k = min(k, 2048)  # FAISS GPU limit
        _apply_params(index, self.manifest.get("search_params", "") if params is None else params)
        scores, ids = index.search(q, min(k, max(self.num_vectors, 1)))
        return scores, ids

    def _searcher(self, gpu: bool | None):
        use_gpu = gpu_available() if gpu is None else gpu
        if not use_gpu:
            return self.index
        if self._search_index is None:
            self._search_index = _to_gpu(self.index)
        return self._search_index

    def load_model(self, device: str | None = None):
        return load_indexed_model(self.manifest, self.path, device or _default_device())

    # -- adding

    def add(self, source, *, batch_size: int = 16, progress: bool = True, loaded=None,
            scenes_count: int | None = None) -> dict:
        """Append the images of ``source`` that are not indexed yet (by key); returns counts.

        New images get the next image ids and vector ids; IVF centroids stay as trained. The
        model is the manifest's (refused if its weights changed), so old and new vectors agree.
        """
        with self._writing():
            if loaded is None:
                loaded = self.load_model()
            src = open_source(source, self.image_size, scenes_count=scenes_count)
            known = set(self.images["key"].to_list())
            already = 0

            def unseen():
                nonlocal already
                for image in src:
                    if image.key in known:
                        already += 1  # skip before encoding: re-adding a grown folder is cheap
                        continue
                    known.add(image.key)
                    yield image

            records = extract_patches(loaded.encoder, unseen(), feature=self.feature, batch_size=batch_size,
                                      total=len(src) or None, progress=progress, desc=f"add to {self.path.name}")
            counts = self._append(records, src, progress)
            counts["already_indexed"] += already
            return counts

    def add_records(self, records: Iterable[PatchRecord], *, source: ImageSource | None = None,
                    progress: bool = True) -> dict:
        """Append precomputed patch records (keys already indexed are skipped); returns counts."""
        with self._writing():
            return self._append(records, source, progress)

    @contextlib.contextmanager
    def _writing(self):
        """Hold the writer lock, finish or clear any interrupted add, and start from the disk state."""
        root = self.path
        with _locked(root):
            _redo_journal(root)
            for stale in list(root.glob("*.pending")) + list(root.glob(f"{VECTORS_DIR}/*.tmp")):
                stale.unlink()  # leftovers of an add killed before its commit point
            fresh = IndexDirectory.open(root)
            self.manifest, self.store = fresh.manifest, fresh.store
            self._index = self._search_index = self._images = self._metadata = None
            yield

    def _append(self, records: Iterable[PatchRecord], source: ImageSource | None, progress: bool) -> dict:
        import polars as pl

        root = self.path
        known = set(self.images["key"].to_list())
        already = 0

        def unseen():
            nonlocal already
            for record in records:
                if record.image.key in known:
                    already += 1
                    continue
                known.add(record.image.key)
                yield record

        parts = self.manifest["vectors"]["parts"]
        writer = _PartWriter(root / VECTORS_DIR, first_part=_next_part_number(parts))
        rows, _ = _ingest(unseen(), root, writer, self.num_images, self.num_vectors, self.dim)
        skipped = list(source.skipped) if source is not None else []
        spec = source.spec if source is not None else "records"
        if source is not None:
            _report_skipped(source, progress)
        counts = {"added": len(rows), "already_indexed": already, "skipped": len(skipped)}
        if not rows:
            if progress:
                print(f"nothing new to add from {spec}")
            return counts

        all_parts = parts + writer.parts
        store = _VectorStore(root, all_parts)
        index = self.index
        _add_to_index(index, store, range(len(parts), len(all_parts)), progress)
        added = _images_frame(rows)
        images = pl.concat([self.images, added])
        metadata = pl.concat([self.metadata, _metadata_frame(added)])

        manifest = dict(self.manifest)
        manifest["updated"] = _now()
        # Unreadable images known now: one entry per path, dropping any that has since been indexed.
        indexed = set(images["key"].to_list())
        unreadable = {e["path"]: e for e in list(self.manifest.get("skipped", [])) + skipped if e["path"] not in indexed}
        manifest["counts"] = {"images": len(images), "vectors": int(index.ntotal), "skipped": len(unreadable)}
        manifest["skipped"] = list(unreadable.values())
        manifest["vectors"] = {**self.manifest["vectors"], "parts": all_parts}
        manifest["sources"] = list(self.manifest.get("sources", [])) + [
            {"spec": spec, "added": manifest["updated"], "images": len(rows), "skipped": len(skipped)}]

        _write_faiss(root / (INDEX_FILE + ".pending"), index)
        _write_parquet(root / (IMAGES_FILE + ".pending"), images)
        _write_parquet(root / (METADATA_FILE + ".pending"), metadata)
        _write_json(root / (MANIFEST + ".pending"), manifest)
        _fsync_path(root / VECTORS_DIR)
        # Commit point: the journal. The manifest is renamed last, so a reader that opens the
        # directory mid-commit still sees the old counts (and redoes the renames itself).
        _commit(root, {name: name + ".pending" for name in (INDEX_FILE, IMAGES_FILE, METADATA_FILE, MANIFEST)})

        self.manifest, self.store = manifest, store
        self._images, self._metadata, self._search_index = images, metadata, None
        return counts


def _next_part_number(parts: list[dict]) -> int:
    numbers = [int(Path(p["file"]).stem.split("-")[-1]) for p in parts]
    return max(numbers, default=-1) + 1
