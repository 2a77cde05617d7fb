"""A manifest (parquet or CSV) as a map-style source: one row per image, its path and its captions.

Columns: ``image_path`` (absolute, or relative to ``root``: by default the manifest's folder)
and, per granularity, the column `caption_fields.CaptionMapping` names (``data.captions``; by
default ``alt``, ``short``, ``long``), null or empty meaning "this granularity is missing for
this row". An optional ``id`` column names the samples; otherwise the row number does. Only the
needed columns are read (polars' lazy scan). Images go through the one reader (`image_io`).
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import torch

from tipslab.datamodules.caption_fields import GRANULARITIES, CaptionMapping
from tipslab.datamodules.image_io import MAX_PIXELS, UnreadableImage, read_image_reduced
from tipslab.datamodules.sample import CorruptSample
from tipslab.errors import TipslabError

CAPTION_COLUMNS = GRANULARITIES
IMAGE_COLUMN = "image_path"


class EmptyCaptions(CorruptSample):
    kind = "empty_caption"


def scan_manifest(path: Path) -> pl.LazyFrame:
    """A lazy frame of a ``.parquet`` or ``.csv`` manifest; a bad file is a TipslabError naming it."""
    if not path.is_file():
        raise TipslabError(f"manifest {path}: no such file; expected a parquet or CSV file with columns "
                           f"{IMAGE_COLUMN} and any of {', '.join(CAPTION_COLUMNS)}")
    try:
        if path.suffix.lower() == ".csv":
            return pl.scan_csv(path, infer_schema=False)  # every column a string: paths and texts
        return pl.scan_parquet(path)
    except Exception as err:  # polars raises its own error types for malformed input
        raise TipslabError(f"manifest {path}: not a readable manifest file ({err})") from err


class ManifestDataset(torch.utils.data.Dataset):
    """``dataset[i] -> {"image": PIL RGB, "captions": {...}, "id": str}``; raises `CorruptSample`."""

    def __init__(self, path: str | os.PathLike, root: str | os.PathLike | None = None,
                 captions: CaptionMapping | None = None, max_pixels: int = MAX_PIXELS):
        self.path = Path(path)
        self.max_pixels = int(max_pixels)
        # ``(width, height) -> factor``: how far a JPEG may decode smaller (set by the data module
        # with ``data.decode_draft``, as for shards); None: full size.
        self.decode_scale = None
        # True: a plain JPEG stays encoded for the device to decode (``data.decode_on_device``).
        self.keep_jpeg = False
        mapping = captions or CaptionMapping()
        frame = scan_manifest(self.path)
        try:
            columns = frame.collect_schema().names()
        except Exception as err:  # polars reads the header/footer here
            kind = "CSV" if self.path.suffix.lower() == ".csv" else "parquet"
            raise TipslabError(f"manifest {self.path}: not a readable {kind} file ({err})") from err
        if IMAGE_COLUMN not in columns:
            raise TipslabError(f"manifest {self.path}: missing column '{IMAGE_COLUMN}' (has: {', '.join(columns)})")
        wanted = {g: mapping.column(g) for g in GRANULARITIES}
        wrong = {g: c for g, c in wanted.items() if g in mapping.explicit and c not in columns}
        if wrong:
            g, c = next(iter(wrong.items()))
            raise TipslabError(f"manifest {self.path}: data.captions.{g}={c!r} is not a column (has: {', '.join(columns)})")
        self.caption_columns = {g: c for g, c in wanted.items() if c in columns}
        if not self.caption_columns:
            raise TipslabError(f"manifest {self.path}: no caption column; expected at least one of "
                               f"{', '.join(CAPTION_COLUMNS)} or a data.captions mapping (has: {', '.join(columns)})")
        keep = [IMAGE_COLUMN, *dict.fromkeys(self.caption_columns.values())] + (["id"] if "id" in columns else [])
        try:
            table = frame.select(keep).collect()
        except Exception as err:
            raise TipslabError(f"manifest {self.path}: cannot read its rows ({err})") from err
        if table.height == 0:
            raise TipslabError(f"manifest {self.path}: has no rows")
        self.root = Path(root) if root else self.path.parent
        self.image_paths = table[IMAGE_COLUMN].cast(pl.String).to_list()
        self.ids = table["id"].cast(pl.String).to_list() if "id" in table.columns else [
            f"{i:08d}" for i in range(table.height)]
        self.captions = [{g: row[c] for g, c in self.caption_columns.items()}
                         for row in table.select(list(dict.fromkeys(self.caption_columns.values()))).to_dicts()]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        raw = self.image_paths[index]
        if raw is None:
            raise UnreadableImage(f"manifest {self.path} row {index}", "missing_file", "image_path is null")
        path = Path(raw) if os.path.isabs(raw) else self.root / raw
        captions = {k: v for k, v in self.captions[index].items() if isinstance(v, str) and v.strip()}
        if not captions:
            raise EmptyCaptions(f"manifest {self.path} row {index} ({self.ids[index]}): every caption is empty")
        conversions: list[str] = []
        image, full = read_image_reduced(path, self.decode_scale, name=f"manifest {self.path} row {index}: {path}",
                                         max_pixels=self.max_pixels, conversions=conversions,
                                         keep_jpeg=self.keep_jpeg)
        sample = {"image": image, "captions": captions, "id": self.ids[index], "_conversions": conversions}
        if image.size != full:  # decoded smaller: crops are drawn on the full size
            sample["source_size"] = full
        return sample
