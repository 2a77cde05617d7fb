"""A parquet manifest as a map-style source: one row per image, its path and its captions.

Columns: ``image_path`` (absolute, or relative to the manifest's folder) and at least one of
``alt``, ``short``, ``long`` (null or empty means "this granularity is missing for this row").
An optional ``id`` column names the samples; otherwise the row number does. Read with polars.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import torch
from PIL import Image

from tipslab.datamodules.sample import CorruptSample
from tipslab.errors import TipslabError

CAPTION_COLUMNS = ("alt", "short", "long")


class ManifestDataset(torch.utils.data.Dataset):
    """``dataset[i] -> {"image": PIL RGB, "captions": {...}, "id": str}``; raises `CorruptSample`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise TipslabError(f"manifest {self.path}: no such file; expected a parquet file with columns "
                               f"image_path and any of {', '.join(CAPTION_COLUMNS)}")
        try:
            frame = pl.read_parquet(self.path)
        except Exception as err:  # polars raises its own error types for non-parquet input
            raise TipslabError(f"manifest {self.path}: not a readable parquet file ({err})") from err
        if "image_path" not in frame.columns:
            raise TipslabError(f"manifest {self.path}: missing column 'image_path' (has: {', '.join(frame.columns)})")
        self.caption_columns = [c for c in CAPTION_COLUMNS if c in frame.columns]
        if not self.caption_columns:
            raise TipslabError(f"manifest {self.path}: no caption column; expected at least one of "
                               f"{', '.join(CAPTION_COLUMNS)} (has: {', '.join(frame.columns)})")
        if frame.height == 0:
            raise TipslabError(f"manifest {self.path}: has no rows")
        self.root = self.path.parent
        self.image_paths = frame["image_path"].cast(pl.String).to_list()
        self.ids = frame["id"].cast(pl.String).to_list() if "id" in frame.columns else [
            f"{i:08d}" for i in range(frame.height)]
        self.captions = frame.select(self.caption_columns).to_dicts()

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        raw = self.image_paths[index]
        if raw is None:
            raise CorruptSample(f"manifest {self.path} row {index}: image_path is null")
        path = Path(raw) if os.path.isabs(raw) else self.root / raw
        captions = {k: v for k, v in self.captions[index].items() if isinstance(v, str) and v.strip()}
        if not captions:
            raise CorruptSample(f"manifest {self.path} row {index} ({self.ids[index]}): every caption is empty")
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except Exception as err:  # missing file or corrupt data: PIL raises many types
            raise CorruptSample(f"manifest {self.path} row {index}: cannot read image {path} ({err})") from err
        return {"image": image, "captions": captions, "id": self.ids[index]}
