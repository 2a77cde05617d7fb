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

Deleting an image records its id in the manifest (``deleted``); searches skip its vectors, which
stay on disk until the index is rebuilt. Opening checks the manifest's keys and types and every
file's size against the one recorded; a damaged file is a one-line error naming it.

The pieces live beside this module: `index_build` (build_index / write_index), `index_layout`
(file names), `index_files` (manifest and file checks, safe readers), `durable` (fsynced writes,
the journal, the lock), `faiss_backend`, `factory_choice` and `tuning` (auto factory and nprobe),
`candidates` (top-k with deletions and exact re-scoring), `vector_store` (the float16 parts),
`pooling`, `model_identity` (the model's sha256, reloading it) and `build_steps` (tables,
training, publishing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tipslab.errors import TipslabError
from tipslab.retrieval.build_steps import add_to_index, images_frame, ingest, metadata_frame, now_utc, report_skipped
from tipslab.retrieval.candidates import search_candidates
from tipslab.retrieval.durable import (
    JOURNAL,
    commit,
    fsync_path,
    locked,
    redo_journal,
    write_faiss,
    write_json,
    write_parquet,
)
from tipslab.retrieval.extract import ImageSource, PatchRecord, extract_patches, open_source
from tipslab.retrieval.faiss_backend import GPU_MAX_K, apply_params, gpu_available, to_gpu
from tipslab.retrieval.index_build import build_index, write_index  # noqa: F401 - the public entry points
from tipslab.retrieval.index_files import check_files, file_sizes, read_faiss, read_manifest, read_parquet
from tipslab.retrieval.index_layout import FORMAT_VERSION, IMAGES_FILE, INDEX_FILE, MANIFEST, METADATA_FILE, VECTORS_DIR
from tipslab.retrieval.model_identity import default_device, load_indexed_model
from tipslab.retrieval.model_identity import model_identity as model_identity  # noqa: F401 - cli imports it here
from tipslab.retrieval.model_identity import sha256_file as sha256_file  # noqa: F401 - tests import it from here
from tipslab.retrieval.pooling import pool_records
from tipslab.retrieval.vector_store import PartWriter, VectorStore

IMAGE_COLUMNS = ["image_id", "key", "image_path", "image_width", "image_height", "grid_h", "grid_w",
                 "first_vector_id", "num_vectors"]
METADATA_COLUMNS = ["vector_id", "image_id", "image_path", "patch_row", "patch_col"]


class IndexDirectory:
    """An opened index directory: its manifest, tables, vector store and FAISS index."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._index = None
        self._search_index = None
        self._images = None
        self._metadata = None
        self._deleted_mask = None
        self.store = VectorStore(path, manifest["vectors"]["parts"], int(manifest["dim"]))

    # -- opening

    @classmethod
    def open(cls, path) -> "IndexDirectory":
        """Open and check an index directory (manifest keys and types, every file's recorded size)."""
        root = Path(path).expanduser()
        if not root.exists():
            raise TipslabError(f"{root}: does not exist (expected a tipslab index directory made by `tipslab index`)")
        if not root.is_dir():
            raise TipslabError(f"{root}: is not a directory (expected a tipslab index directory)")
        root = root.resolve()
        if (root / JOURNAL).exists():
            try:
                redo_journal(root)  # finish an add that was killed after its commit point
            except OSError as err:
                raise TipslabError(f"{root}: an interrupted add must be finished but the directory "
                                   f"is not writable ({err})") from None
        manifest = read_manifest(root)
        check_files(root, manifest)
        directory = cls(root, manifest)
        stored = int(directory.store.starts[-1])
        if stored != manifest["counts"]["vectors"]:
            raise TipslabError(f"{root}/{MANIFEST}: vector parts hold {stored} rows, 'counts.vectors' says "
                               f"{manifest['counts']['vectors']}")
        bad = [i for i in manifest.get("deleted", []) if not 0 <= i < manifest["counts"]["images"]]
        if bad:
            raise TipslabError(f"{root}/{MANIFEST}: 'deleted' holds image ids outside the index: {bad[:5]}")
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
    def decode(self) -> str:
        """How the index's images were decoded (`Preprocessing.decode`; indexes from before it: full)."""
        return self.manifest["preprocessing"].get("decode", "full")

    @property
    def index(self):
        """The CPU FAISS index (loaded on first use, checked against the manifest)."""
        if self._index is None:
            index = read_faiss(self.path / INDEX_FILE)
            if index.ntotal != self.num_vectors or index.d != self.dim:
                raise TipslabError(f"{self.path}/{INDEX_FILE}: holds {index.ntotal} vectors of dim {index.d}, "
                                   f"{MANIFEST} says {self.num_vectors} of dim {self.dim}")
            self._index = index
        return self._index

    @property
    def images(self):
        """Per-image table (polars), row i == image_id i."""
        if self._images is None:
            self._images = read_parquet(self.path / IMAGES_FILE, IMAGE_COLUMNS)
            if len(self._images) != self.num_images:
                raise TipslabError(f"{self.path}/{IMAGES_FILE}: {len(self._images)} rows, "
                                   f"{MANIFEST} says {self.num_images} images")
        return self._images

    @property
    def metadata(self):
        """Per-vector table (polars), row i == vector_id i."""
        if self._metadata is None:
            self._metadata = read_parquet(self.path / METADATA_FILE, METADATA_COLUMNS)
            if len(self._metadata) != self.num_vectors:
                raise TipslabError(f"{self.path}/{METADATA_FILE}: {len(self._metadata)} rows, "
                                   f"{MANIFEST} says {self.num_vectors} vectors")
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

    @property
    def deleted(self) -> list[int]:
        """Ids of deleted images (their vectors are skipped by every search)."""
        return list(self.manifest.get("deleted", []))

    def search_vectors(self, queries, k: int, *, params: str | None = None, gpu: bool | None = None):
        """Top-k vectors: (scores float32 [Q, k], vector ids int64 [Q, k]); ids -1 pad short lists.

        Deleted images never appear. Compressed codes fetch the manifest's ``rerank`` candidates
        and return them re-scored exactly from the float16 vectors. ``params`` is a FAISS
        parameter string (e.g. ``"nprobe=32"``); default the manifest's (tuned when built with
        ``--factory auto``). ``gpu`` None = use a GPU when one is present.
        """
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise TipslabError(f"query vectors: expected dim {self.dim} (the index's), got {q.shape[1]}")
        if k <= 0:
            raise TipslabError(f"k: expected a positive integer, got {k}")
        params = self.manifest.get("search_params", "") if params is None else params
        total = max(self.num_vectors, 1)

        def faiss_search(batch, fetch):
            index = self._searcher(gpu, fetch)
            apply_params(index, params)
            return index.search(batch, fetch)

        dead = self._dead if self.deleted else None
        return search_candidates(faiss_search, self.store, q, min(k, total), total=total,
                                 rerank=int(self.manifest.get("rerank", 0) or 0), dead=dead)

    def _dead(self, vector_ids: np.ndarray) -> np.ndarray:
        if self._deleted_mask is None:
            self._deleted_mask = np.zeros(self.num_images, dtype=bool)
            self._deleted_mask[self.deleted] = True
        return self._deleted_mask[self.image_ids_of(vector_ids)]

    def _searcher(self, gpu: bool | None, fetch: int):
        use_gpu = gpu_available() if gpu is None else gpu
        if not use_gpu or fetch > GPU_MAX_K:  # FAISS GPU returns at most 2048 neighbours: search on CPU
            return self.index
        if self._search_index is None:
            self._search_index = to_gpu(self.index)
        return self._search_index

    def load_model(self, device: str | None = None, model=None):
        """The index's model (``model`` overrides where it is loaded from; see `load_indexed_model`)."""
        return load_indexed_model(self.manifest, self.path, device or default_device(), model=model)

    # -- adding

    def add(self, source, *, batch_size: int | None = None, progress: bool = True, loaded=None,
            scenes_count: int | None = None, decode_workers: int | None = None) -> dict:
        """Append the images of ``source`` that are not indexed yet (by key); returns counts.

        New images get the next image ids and vector ids; IVF centroids stay as trained. The
        model is the manifest's (refused if its weights changed), so old and new vectors agree.
        """
        with self._writing():
            if loaded is None:
                loaded = self.load_model()
            # Decoded as the index's images were, so old and new vectors agree.
            src = open_source(source, self.image_size, scenes_count=scenes_count, workers=decode_workers,
                              decode=self.decode)
            known = self._live_keys()
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
        with locked(root):
            redo_journal(root)
            for stale in list(root.glob("*.pending")) + list(root.glob(f"{VECTORS_DIR}/*.tmp")):
                stale.unlink()  # leftovers of an add killed before its commit point
            fresh = IndexDirectory.open(root)
            self.manifest, self.store = fresh.manifest, fresh.store
            self._index = self._search_index = self._images = self._metadata = self._deleted_mask = None
            yield

    def _append(self, records: Iterable[PatchRecord], source: ImageSource | None, progress: bool) -> dict:
        import polars as pl

        root = self.path
        known = self._live_keys()
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
        writer = PartWriter(root / VECTORS_DIR, first_part=_next_part_number(parts))
        pool = int(self.manifest.get("pooling", 1) or 1)
        rows, _ = ingest(pool_records(unseen(), pool), root, writer, self.num_images, self.num_vectors, self.dim)
        skipped = list(source.skipped) if source is not None else []
        spec = source.spec if source is not None else "records"
        if source is not None:
            report_skipped(source, progress)
        counts = {"added": len(rows), "already_indexed": already, "skipped": len(skipped)}
        if not rows:
            if progress:
                print(f"nothing new to add from {spec}")
            return counts

        all_parts = parts + writer.parts
        store = VectorStore(root, all_parts, self.dim)
        index = self.index
        add_to_index(index, store, range(len(parts), len(all_parts)), progress)
        added = images_frame(rows)
        images = pl.concat([self.images, added])
        metadata = pl.concat([self.metadata, metadata_frame(added)])

        manifest = dict(self.manifest)
        manifest["updated"] = now_utc()
        # Unreadable images known now: one entry per path, dropping any that has since been indexed.
        indexed = set(images["key"].to_list())
        unreadable = {e["path"]: e for e in list(self.manifest.get("skipped", [])) + skipped if e["path"] not in indexed}
        manifest["counts"] = {"images": len(images), "vectors": int(index.ntotal), "skipped": len(unreadable)}
        manifest["skipped"] = list(unreadable.values())
        manifest["sources"] = list(self.manifest.get("sources", [])) + [
            {"spec": spec, "added": manifest["updated"], "images": len(rows), "skipped": len(skipped)}]

        write_faiss(root / (INDEX_FILE + ".pending"), index)
        write_parquet(root / (IMAGES_FILE + ".pending"), images)
        write_parquet(root / (METADATA_FILE + ".pending"), metadata)
        manifest["files"], sized_parts = file_sizes(root, all_parts, suffix=".pending")
        manifest["vectors"] = {**self.manifest["vectors"], "parts": sized_parts}
        self._commit_manifest(manifest, (INDEX_FILE, IMAGES_FILE, METADATA_FILE))
        self.store = store
        self._images, self._metadata, self._search_index = images, metadata, None
        return counts

    def _commit_manifest(self, manifest: dict, replaced: tuple[str, ...]) -> None:
        """Replace ``replaced`` (already written as ``*.pending``) and the manifest as one unit."""
        root = self.path
        if "format_version" in manifest:
            manifest["format_version"] = FORMAT_VERSION
        write_json(root / (MANIFEST + ".pending"), manifest)
        fsync_path(root / VECTORS_DIR)
        # Commit point: the journal. The manifest is renamed last, so a reader that opens the
        # directory mid-commit still sees the old counts (and redoes the renames itself).
        commit(root, {name: name + ".pending" for name in (*replaced, MANIFEST)})
        self.manifest = manifest
        self._deleted_mask = None

    def _live_keys(self) -> set[str]:
        keys = self.images["key"].to_list()
        dead = set(self.deleted)
        return {key for i, key in enumerate(keys) if i not in dead}

    # -- deleting

    def delete(self, image_ids: Iterable[int]) -> int:
        """Delete images by id: searches skip them from now on (their vectors stay on disk until a
        rebuild; adding the same file again indexes it anew). Returns how many were newly deleted."""
        wanted = []
        for image_id in image_ids:
            if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
                raise TipslabError(f"delete: image ids are integers, got {image_id!r}")
            wanted.append(int(image_id))
        with self._writing():
            outside = [i for i in wanted if not 0 <= i < self.num_images]
            if outside:
                raise TipslabError(f"delete: image id(s) {outside[:5]} not in {self.path} "
                                   f"(ids run 0..{self.num_images - 1})")
            before = set(self.deleted)
            after = sorted(before | set(wanted))
            if len(after) == len(before):
                return 0
            manifest = {**self.manifest, "deleted": after, "updated": now_utc()}
            self._commit_manifest(manifest, ())
            return len(after) - len(before)


def _next_part_number(parts: list[dict]) -> int:
    numbers = [int(Path(p["file"]).stem.split("-")[-1]) for p in parts]
    return max(numbers, default=-1) + 1
