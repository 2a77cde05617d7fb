"""Metadata filters for region search: which images of an index a query may return.

A filter is a dict of conditions on the index's per-image table (images.parquet), all of which
must hold: ``{"key_prefix": "scenes:val/00001", "min_width": 100}``. Used by `tipslab serve`.
"""

from __future__ import annotations

import polars as pl

from tipslab.errors import TipslabError

# name -> (expected JSON type, polars condition built from the value)
FILTERS = {
    "key_prefix": (str, lambda v: pl.col("key").str.starts_with(v)),
    "key_contains": (str, lambda v: pl.col("key").str.contains(v, literal=True)),
    "path_contains": (str, lambda v: pl.col("image_path").str.contains(v, literal=True)),
    "min_width": (int, lambda v: pl.col("image_width") >= v),
    "max_width": (int, lambda v: pl.col("image_width") <= v),
    "min_height": (int, lambda v: pl.col("image_height") >= v),
    "max_height": (int, lambda v: pl.col("image_height") <= v),
    "image_ids": (list, lambda v: pl.col("image_id").is_in(v)),
}


def allowed_images(images: pl.DataFrame, filters: dict) -> set[int]:
    """The image ids that pass every condition of ``filters`` (unknown names are an error)."""
    if not isinstance(filters, dict):
        raise TipslabError(f"filters: expected an object of conditions, got {type(filters).__name__}")
    conditions = []
    for name, value in filters.items():
        if name not in FILTERS:
            raise TipslabError(f"filters: unknown filter {name!r}; expected one of {', '.join(sorted(FILTERS))}")
        kind, condition = FILTERS[name]
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is list and not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            expected = "a list of image ids" if kind is list else kind.__name__
            raise TipslabError(f"filters.{name}: expected {expected}, got {value!r}")
        conditions.append(condition(value))
    if not conditions:
        return set(images["image_id"].to_list())
    return set(images.filter(pl.all_horizontal(conditions))["image_id"].to_list())
