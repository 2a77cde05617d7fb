"""The float16 copies of an index's vectors (``vectors/part-*.npy``): a writer that appends them to
part files split at image boundaries, and a memory-mapped store that reads rows by vector id for
exact re-scoring, heatmaps and training samples (compressed FAISS codes cannot give them back)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tipslab.retrieval.durable import write_npy
from tipslab.retrieval.index_files import open_part
from tipslab.retrieval.index_layout import VECTORS_DIR

PART_ROWS = 1 << 20  # vectors per part file; an image never straddles two parts
ADD_CHUNK = 65536


class PartWriter:
    """Appends float16 vectors to ``vectors/part-NNNNN.npy`` files, splitting at image boundaries.

    A full part is written (atomically, fsynced) by a background thread while the next one fills,
    and parts fill two buffers that are reused: on the VMs measured here touching fresh memory
    cost more than copying into it (docs/SCALE.md). `finish` flushes the last part and waits for
    every write; ``parts`` describes the files, which exist once `finish` has returned.
    """

    def __init__(self, folder: Path, first_part: int, part_rows: int = PART_ROWS):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.next_part = first_part
        self.part_rows = int(part_rows)
        self.pending_rows = 0
        self.parts: list[dict] = []
        self.buffers: list[np.ndarray] = []  # at most two, [part_rows, dim] float16
        self._current: np.ndarray | None = None
        self._writing: np.ndarray | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def add(self, vectors: np.ndarray) -> None:
        count = len(vectors)
        if self.pending_rows and self.pending_rows + count > self.part_rows:
            self.flush()
        if self._current is None:
            self._current = self._free_buffer(int(vectors.shape[1]), count)
        self._current[self.pending_rows:self.pending_rows + count] = vectors  # float16 on the way in
        self.pending_rows += count

    def flush(self) -> None:
        """Hand the filled part to the writing thread (after the previous write has finished)."""
        if not self.pending_rows:
            return
        name = f"part-{self.next_part:05d}.npy"
        self.parts.append({"file": f"{VECTORS_DIR}/{name}", "rows": self.pending_rows})
        self._wait()
        self._writing, rows = self._current, self.pending_rows
        self._thread = threading.Thread(target=self._write, args=(self.folder / name, self._writing[:rows]),
                                        name="part-writer", daemon=True)
        self._thread.start()
        self._current, self.pending_rows = None, 0
        self.next_part += 1

    def finish(self) -> None:
        """Write what is pending and wait until every part is on disk; raises a write's error."""
        self.flush()
        self._wait()

    def _free_buffer(self, dim: int, rows: int) -> np.ndarray:
        if rows > self.part_rows or (self.buffers and self.buffers[0].shape[1] != dim):
            return np.empty((rows, dim), np.float16)  # one image over a whole part: a buffer of its own
        for buffer in self.buffers:
            if buffer is not self._writing:
                return buffer
        self.buffers.append(np.empty((self.part_rows, dim), np.float16))
        return self.buffers[-1]

    def _write(self, path: Path, rows: np.ndarray) -> None:
        try:
            write_npy(path, rows)
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread by _wait
            self._error = err

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread, self._writing = None, None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class VectorStore:
    """Read access to the float16 parts: rows by global vector id, memory-mapped."""

    def __init__(self, root: Path, parts: list[dict], dim: int | None = None):
        self.root = root
        self.parts = parts
        self._dim = dim
        self.starts = np.cumsum([0] + [p["rows"] for p in parts])
        self._arrays: dict[int, np.ndarray] = {}

    def _part(self, i: int) -> np.ndarray:
        if i not in self._arrays:
            path = self.root / self.parts[i]["file"]
            self._arrays[i] = open_part(path, int(self.parts[i]["rows"]), self._dim)
            self._dim = int(self._arrays[i].shape[1])
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
        out = np.empty((len(picks), self.dim), dtype=np.float32)
        for i in range(len(self.parts)):
            lo, hi = np.searchsorted(picks, [self.starts[i], self.starts[i + 1]])
            if hi > lo:
                out[lo:hi] = self._part(i)[picks[lo:hi] - self.starts[i]]
        return out

    def take(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows of any vector ids (in the order given)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        owner = np.searchsorted(self.starts, ids, side="right") - 1
        for i in np.unique(owner):
            where = np.flatnonzero(owner == i)
            out[where] = self._part(int(i))[ids[where] - self.starts[i]]
        return out

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._part(0)
        return int(self._dim)


def rescore(store: VectorStore, queries: np.ndarray, candidates: np.ndarray, k: int):
    """Exact top-k among each query's candidate ids (-1 = none), scored from the float16 store.

    Returns (scores float32 [Q, k], ids int64 [Q, k]) padded with (-inf, -1) as FAISS pads.
    """
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for qi, (cand, query) in enumerate(zip(candidates, queries)):
        cand = np.unique(cand[cand >= 0])
        if not len(cand):
            continue
        exact = store.take(cand) @ query
        order = np.argsort(-exact, kind="stable")[:k]
        scores[qi, :len(order)], ids[qi, :len(order)] = exact[order], cand[order]
    return scores, ids


def exact_top_k(store: VectorStore, queries: np.ndarray, k: int, excluded: np.ndarray | None = None,
                chunk: int = ADD_CHUNK) -> np.ndarray:
    """Exact inner-product top-k ids ``[Q, k]`` over every stored vector, reading the parts in chunks
    (ground truth for recall; never holds more than one chunk in float32)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    start = 0
    for block in store.iter_chunks(chunk):
        s = q @ block.T
        if excluded is not None and len(excluded):
            hit = excluded[(excluded >= start) & (excluded < start + len(block))] - start
            s[:, hit] = -np.inf
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(block)), s.shape)], axis=1)
        top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k] if cand_s.shape[1] > k else np.argsort(-cand_s, axis=1)
        best_s = np.take_along_axis(cand_s, top, axis=1)
        best_i = np.take_along_axis(cand_i, top, axis=1)
        start += len(block)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1)
