"""Write a scenes split to disk: PNG images, a caption manifest and per-object ground truth.

The folder is what `tipslab index` and the evaluators read when they work on files instead of the
in-memory generator::

    <out>/images/val_000000.png ...
    <out>/manifest.parquet   one row per image: image_path (relative), id, alt, short, long
    <out>/objects.parquet    one row per object: id, image_path, object, class_name, shape, colour,
                             size, texture, position, bbox [x0,y0,x1,y1] (x1/y1 exclusive),
                             height, width, mask_rle (run lengths, row-major, starting with 0s)

``manifest.parquet`` is a valid source for `ManifestDataset` (``data.source=manifest``).
Masks are stored as run lengths rather than PNG files: a few hundred integers per object.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from tipslab.atomic import atomic_write
from tipslab.datamodules.scenes import ScenesDataset
from tipslab.errors import TipslabError


def rle_encode(mask: np.ndarray) -> list[int]:
    """Run lengths of a bool [H, W] mask in row-major order, the first run counting zeros."""
    flat = np.asarray(mask, dtype=bool).ravel()
    # Positions where the value changes; runs alternate 0,1,0,... starting with a (maybe empty) 0 run.
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return [int(r) for r in runs]


def rle_decode(runs: list[int], height: int, width: int) -> np.ndarray:
    """Inverse of `rle_encode`: bool [height, width]."""
    runs = [int(r) for r in runs]
    if sum(runs) != height * width:
        raise TipslabError(f"mask run lengths sum to {sum(runs)}, expected {height}x{width}={height * width}")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(height, width)


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    atomic_write(path, frame.write_parquet)  # readers never see a half-written table


def write_scene_folder(out_dir: str | os.PathLike, num_images: int, image_size: int = 112, seed: int = 0,
                       split: str = "val", overwrite: bool = False) -> Path:
    """Write ``num_images`` scenes of ``split`` under ``out_dir`` (layout in the module docstring)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TipslabError(f"{out}: folder exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    dataset = ScenesDataset(split=split, num_images=num_images, image_size=image_size, seed=seed)

    manifest_rows, object_rows = [], []
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        rel = f"images/{split}_{index:06d}.png"
        Image.fromarray(scene.image).save(out / rel)
        manifest_rows.append({"image_path": rel, "id": scene.id, **scene.captions})
        height, width = scene.image.shape[:2]
        for k, obj in enumerate(scene.objects):
            object_rows.append({
                "id": scene.id, "image_path": rel, "object": k, "class_name": obj.class_name,
                "shape": obj.shape, "colour": obj.colour, "size": obj.size, "texture": obj.texture,
                "position": obj.position, "bbox": list(obj.bbox), "height": height, "width": width,
                "mask_rle": rle_encode(obj.mask),
            })
    _write_parquet(pl.DataFrame(manifest_rows), out / "manifest.parquet")
    _write_parquet(
        pl.DataFrame(object_rows, schema_overrides={"bbox": pl.List(pl.Int32), "mask_rle": pl.List(pl.Int32)}),
        out / "objects.parquet",
    )
    return out


def read_scene_objects(folder: str | os.PathLike) -> pl.DataFrame:
    """The ``objects.parquet`` of a folder written by `write_scene_folder`."""
    path = Path(folder) / "objects.parquet"
    if not path.is_file():
        raise TipslabError(f"{path}: no such file; expected a folder written by write_scene_folder")
    return pl.read_parquet(path)
