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

The pieces live beside this module: `index_layout` (file names), `durable` (fsynced writes, the
journal, the lock), `faiss_backend`, `vector_store` (the float16 parts), `model_identity` (the
model's sha256, reloading it) and `build_steps` (tables, training, publishing).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tipslab.errors import TipslabError
from tipslab.retrieval.build_steps import (
    _add_to_index,
    _check_out,
    _chmod_like_mkdir,
    _encoder_dim,
    _images_frame,
    _ingest,
    _metadata_frame,
    _model_image_size,
    _now,
    _publish,
    _report_skipped,
    _tipslab_version,
    _train,
)
from tipslab.retrieval.durable import (
    JOURNAL,
    _commit,
    _fsync_path,
    _locked,
    _redo_journal,
    _write_faiss,
    _write_json,
    _write_parquet,
)
from tipslab.retrieval.extract import (
    FEATURES,
    ImageSource,
    PatchRecord,
    check_source,
    extract_patches,
    open_source,
)
from tipslab.retrieval.faiss_backend import (
    _apply_params,
    _faiss,
    _search_params,
    _to_gpu,
    gpu_available,
    new_faiss_index,
)
from tipslab.retrieval.index_layout import (
    EXPECTED,
    FORMAT,
    FORMAT_VERSION,
    IMAGES_FILE,
    INDEX_FILE,
    MANIFEST,
    METADATA_FILE,
    VECTORS_DIR,
)
from tipslab.retrieval.model_identity import (
    _default_device,
    _model_cfg_dict,
    bundle_model,
    load_indexed_model,
    model_identity,
)
from tipslab.retrieval.model_identity import sha256_file as sha256_file  # re-exported: tests import it from here
from tipslab.retrieval.vector_store import _PartWriter, _VectorStore

# ---------------------------------------------------------------- build

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
        from tipslab.modules.api import load_model

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
                       overwrite=overwrite, train_size=train_size, progress=progress, seed=seed,
                       bundle_model_from=model_path)


def write_index(records: Iterable[PatchRecord], out_dir, *, factory: str = "Flat", feature: str = "dense",
                image_size: int, model: dict, source: ImageSource | None = None, overwrite: bool = False,
                train_size: int | None = None, progress: bool = True, seed: int = 0,
                bundle_model_from=None) -> "IndexDirectory":
    """Write an index directory from patch records, however they were computed.

    ``model`` is the manifest's model block (`model_identity` + ``model_cfg``): searching by text
    needs it, searching by vectors does not. ``source`` supplies the spec and the skipped images.
    ``bundle_model_from``: a tipslab checkpoint directory copied into ``model/`` (`bundle_model`).
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
        if bundle_model_from is not None:
            manifest["model"] = {**manifest["model"], "bundled": bundle_model(bundle_model_from, tmp)}
        _write_json(tmp / MANIFEST, manifest)
        _fsync_path(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexDirectory.open(out)


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

    def load_model(self, device: str | None = None, model=None):
        """The index's model (``model`` overrides where it is loaded from; see `load_indexed_model`)."""
        return load_indexed_model(self.manifest, self.path, device or _default_device(), model=model)

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
