"""Optional k x k patch pooling: an image's patch grid averaged over k x k cells (and
re-normalised) before indexing, k^2 fewer vectors for coarser regions. The pooled grid replaces
the patch grid everywhere (tables, heatmaps, boxes); the manifest records k."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import numpy as np
import torch

from tipslab.errors import TipslabError
from tipslab.retrieval.extract import PatchRecord


def pool_vectors(vectors: np.ndarray, grid: tuple[int, int], k: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``[h*w, D]`` -> ``[ceil(h/k)*ceil(w/k), D]`` L2-normalised means; edge cells average what they hold."""
    h, w = grid
    maps = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).T.reshape(1, -1, h, w)
    pooled = torch.nn.functional.avg_pool2d(maps, k, stride=k, ceil_mode=True)
    out = torch.nn.functional.normalize(pooled[0].flatten(1).T, dim=-1)
    return out.numpy(), (int(pooled.shape[2]), int(pooled.shape[3]))


def pool_records(records: Iterable[PatchRecord], k: int) -> Iterator[PatchRecord]:
    if not isinstance(k, int) or k < 1:
        raise TipslabError(f"--pool: expected a positive integer, got {k!r}")
    for record in records:
        if k == 1:
            yield record
            continue
        vectors, grid = pool_vectors(record.vectors, record.grid, k)
        yield replace(record, vectors=vectors, grid=grid)
