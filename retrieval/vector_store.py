"""The float16 copies of an index's vectors (``vectors/part-*.npy``): a writer that appends them to
part files split at image boundaries, and a memory-mapped store that reads rows by vector id for
exact re-scoring, heatmaps and training samples (compressed FAISS codes cannot give them back)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tipslab.retrieval.durable import _write_npy
from tipslab.retrieval.index_layout import VECTORS_DIR

PART_ROWS = 1 << 20  # vectors per part file; an image never straddles two parts
ADD_CHUNK = 65536


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
