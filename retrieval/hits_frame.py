"""The Python API of region search: `tipslab.search(index_dir, "query", k=...)` -> a polars DataFrame.

One row per hit: query, rank, image (the file's path), image_key, image_id, box [x0, y0, x1, y1]
(original pixels, x1/y1 exclusive), score (cosine), confidence (calibrated, 0..1) and, on request,
the image's patch-score heatmap. Opened indexes and their models are kept between calls, so a
notebook pays the model load once.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from tipslab.retrieval.search import DEFAULT_THRESHOLD, Hit, Searcher

_SEARCHERS: dict[tuple, Searcher] = {}
_LOCK = threading.Lock()
_MAX_KEPT = 4  # opened indexes kept; the oldest is dropped beyond


def hits_frame(hits: Sequence[Hit], heatmap: bool = False) -> pl.DataFrame:
    """The hits as a DataFrame (the schema is the same when there are none)."""
    columns = {
        "query": pl.Series([h.query for h in hits], dtype=pl.String),
        "rank": pl.Series([h.rank for h in hits], dtype=pl.Int64),
        "image": pl.Series([h.image_path for h in hits], dtype=pl.String),
        "image_key": pl.Series([h.image_key for h in hits], dtype=pl.String),
        "image_id": pl.Series([h.image_id for h in hits], dtype=pl.Int64),
        "box": pl.Series([list(map(int, h.box)) for h in hits], dtype=pl.Array(pl.Int64, 4)),
        "score": pl.Series([h.score for h in hits], dtype=pl.Float64),
        "confidence": pl.Series([h.confidence for h in hits], dtype=pl.Float64),
    }
    if heatmap:
        columns["heatmap"] = pl.Series([h.heatmap.astype("float32").tolist() for h in hits],
                                       dtype=pl.List(pl.List(pl.Float32)))
    return pl.DataFrame(columns)


def _searcher(index_dir, model, device) -> Searcher:
    path = Path(index_dir).expanduser().resolve()
    manifest = path / "manifest.json"
    # The manifest changes on every add: a changed one means a fresh open.
    stamp = manifest.stat().st_mtime_ns if manifest.is_file() else None
    key = (str(path), stamp, None if model is None else str(model), device)
    with _LOCK:
        searcher = _SEARCHERS.get(key)
        if searcher is None:
            searcher = Searcher(index_dir, model=model, device=device)
            _SEARCHERS[key] = searcher
            while len(_SEARCHERS) > _MAX_KEPT:
                _SEARCHERS.pop(next(iter(_SEARCHERS)))
        return searcher


def search(index_dir, query: str | Sequence[str], k: int = 5, *, heatmap: bool = False,
           threshold: float | None = DEFAULT_THRESHOLD, model=None, device: str | None = None,
           **options) -> pl.DataFrame:
    """Top ``k`` regions of ``index_dir`` matching ``query`` (a text, or several: ``k`` each).

    Regions whose confidence is below ``threshold`` are left out (None keeps the top ``k``), so
    the frame may have fewer than ``k`` rows per query, or none. ``heatmap=True`` adds each hit
    image's patch-score grid. ``model`` overrides the index's model (same weights only);
    ``options`` go to `tipslab.retrieval.search.search_by_vectors` (per_image, fraction, ...).
    """
    searcher = _searcher(index_dir, model, device)
    return hits_frame(searcher.search(query, k, threshold=threshold, **options), heatmap=heatmap)
