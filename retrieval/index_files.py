"""Reading an index directory's files safely: the manifest checked key by key, every file's size
checked against the one the manifest recorded when it was written (a truncated or replaced file is
caught at open, without reading gigabytes), and readers that turn a file the libraries cannot
parse into a one-line `TipslabError` naming the file instead of a FAISS / polars / numpy traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tipslab.errors import TipslabError
from tipslab.retrieval.index_layout import (
    EXPECTED,
    FORMAT,
    FORMAT_VERSION,
    IMAGES_FILE,
    INDEX_FILE,
    MANIFEST,
    METADATA_FILE,
)

SIZED_FILES = (INDEX_FILE, IMAGES_FILE, METADATA_FILE)

# key -> (expected type(s), what to say); checked before anything trusts the manifest
_MANIFEST_TYPES = {
    "model": (dict, "an object"),
    "dim": (int, "a positive integer"),
    "feature": (str, "a string"),
    "factory": (str, "a string"),
    "counts": (dict, "an object"),
    "vectors": (dict, "an object"),
    "preprocessing": (dict, "an object"),
}


def file_sizes(root: Path, parts: list[dict], suffix: str = "") -> tuple[dict, list[dict]]:
    """The ``files`` block of a manifest ({name: {"bytes": n}}) and the parts with their sizes
    (``suffix``: the tables are still under their pending names)."""
    files = {name: {"bytes": (root / (name + suffix)).stat().st_size} for name in SIZED_FILES}
    sized = [{**part, "bytes": (root / part["file"]).stat().st_size} for part in parts]
    return files, sized


def read_manifest(root: Path) -> dict:
    """The manifest of ``root``, every key the reader relies on checked for presence and type."""
    path = root / MANIFEST
    if not path.is_file():
        raise TipslabError(f"{root} is not a tipslab index directory: missing {MANIFEST} "
                           f"(expected files: {', '.join(EXPECTED)})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TipslabError(f"{path}: is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TipslabError(f"{path}: 'format' is not {FORMAT!r} (not a tipslab index manifest)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TipslabError(f"{path}: format_version {version!r} is not one this tipslab reads "
                           f"(<= {FORMAT_VERSION}); upgrade tipslab")
    for key, (kind, what) in _MANIFEST_TYPES.items():
        if key not in manifest:
            raise TipslabError(f"{path}: missing key {key!r}")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise TipslabError(f"{path}: {key!r} should be {what}, got {type(manifest[key]).__name__}")
    if manifest["dim"] <= 0:
        raise TipslabError(f"{path}: 'dim' should be a positive integer, got {manifest['dim']}")
    _check_int_fields(path, manifest["counts"], "counts", ("images", "vectors"))
    _check_int_fields(path, manifest["preprocessing"], "preprocessing", ("image_size",))
    parts = manifest["vectors"].get("parts")
    if not isinstance(parts, list):
        raise TipslabError(f"{path}: 'vectors.parts' should be a list of {{file, rows}}, got {type(parts).__name__}")
    for i, part in enumerate(parts):
        if not (isinstance(part, dict) and isinstance(part.get("file"), str) and isinstance(part.get("rows"), int)
                and not isinstance(part.get("rows"), bool)):
            raise TipslabError(f"{path}: 'vectors.parts[{i}]' should be {{\"file\": str, \"rows\": int}}, got {part!r}")
    if not isinstance(manifest.get("search_params", ""), str):
        raise TipslabError(f"{path}: 'search_params' should be a string such as \"nprobe=16\"")
    deleted = manifest.get("deleted", [])
    if not isinstance(deleted, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in deleted):
        raise TipslabError(f"{path}: 'deleted' should be a list of image ids")
    return manifest


def _check_int_fields(path: Path, block: dict, name: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = block.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TipslabError(f"{path}: '{name}.{key}' should be a non-negative integer, got {value!r}")


def check_files(root: Path, manifest: dict) -> None:
    """Every file the manifest lists exists, with the size it was written with (when recorded)."""
    files = manifest.get("files", {})
    for name in SIZED_FILES:
        if not (root / name).is_file():
            raise TipslabError(f"{root}: missing {name} (listed in {MANIFEST}; expected files: {', '.join(EXPECTED)})")
        _check_size(root / name, files.get(name, {}).get("bytes") if isinstance(files, dict) else None)
        if name.endswith(".parquet"):
            _check_parquet_magic(root / name)
    for part in manifest["vectors"]["parts"]:
        path = root / part["file"]
        if not path.is_file():
            raise TipslabError(f"{root}: missing vector part {part['file']} (listed in {MANIFEST})")
        _check_size(path, part.get("bytes"))


def _check_size(path: Path, expected) -> None:
    if not isinstance(expected, int):
        return  # written before sizes were recorded
    actual = path.stat().st_size
    if actual != expected:
        raise TipslabError(f"{path}: {actual} bytes, {MANIFEST} recorded {expected} (truncated or replaced; "
                           "rebuild the index)")


def _check_parquet_magic(path: Path) -> None:
    """A parquet file starts and ends with b"PAR1": four bytes each end catch a replaced file at open."""
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(max(0, path.stat().st_size - 4))
        tail = handle.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise TipslabError(f"{path}: not a parquet table (damaged or replaced); rebuild the index")


def read_faiss(path: Path):
    import faiss

    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise TipslabError(f"{path}: not a readable FAISS index ({_last_line(err)}); rebuild the index") from None


def read_parquet(path: Path, columns: list[str]):
    """A parquet table holding at least ``columns``."""
    import polars as pl

    try:
        frame = pl.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - polars raises several types for a damaged file
        raise TipslabError(f"{path}: not a readable parquet table ({_last_line(err)}); rebuild the index") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TipslabError(f"{path}: missing columns {missing} (expected {columns})")
    return frame


def open_part(path: Path, rows: int, dim: int | None) -> np.ndarray:
    """A float16 vector part, memory-mapped, checked to hold ``rows`` x ``dim`` (any dim if None)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise TipslabError(f"{path}: not a readable vector part ({_last_line(err)}); rebuild the index") from None
    if array.ndim != 2 or array.shape != (rows, dim or (array.shape[1] if array.ndim == 2 else -1)) \
            or array.dtype != np.float16:
        raise TipslabError(f"{path}: holds {array.dtype} {tuple(array.shape)}, {MANIFEST} says float16 "
                           f"({rows}, {dim})")
    return array


def _last_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1][:200] if text else type(err).__name__
