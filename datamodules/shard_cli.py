"""`tipslab shards`: write webdataset shards from a folder of images with caption files, or a manifest.

- A folder: every image (`image_io.IMAGE_EXTENSIONS`, recursively, sorted) with a caption file of
  the same stem beside it: ``photo.txt`` (the alt-text) and/or ``photo.json`` (an object: a
  ``captions`` object of granularities, or any fields, mapped at training time by
  ``data.captions``). The sample id is the path relative to the folder.
- A manifest (parquet or CSV, read with polars): ``--image-column`` (default ``image_path``)
  relative to ``--root`` (default the manifest's folder), one column per granularity
  (``--alt``/``--short``/``--long`` name them; by default the columns ``alt``, ``short``, ``long``).

Image bytes are stored as they are (no re-encoding), after the one image reader has read them:
an unreadable image, or a sample without caption text, is skipped and counted by kind. Shards
close at ``--shard-size`` bytes or ``--samples-per-shard`` samples; each appears complete
(written beside, renamed). The summary gives samples, skipped by kind, shards and bytes.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from tipslab.datamodules.caption_fields import GRANULARITIES
from tipslab.datamodules.image_io import MAX_PIXELS, UnreadableImage, is_image_file, read_image
from tipslab.datamodules.sample_quality import SkipCounter
from tipslab.datamodules.shard_writer import ShardSink, sample_json
from tipslab.errors import TipslabError

SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str) -> int:
    """``"256MB"`` -> bytes (decimal units; KiB/MiB/GiB binary)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not found or found.group(2).lower() not in SIZE_UNITS:
        raise TipslabError(f"--shard-size {text!r}: expected a size such as 500MB, 1GB or 1048576")
    return int(float(found.group(1)) * SIZE_UNITS[found.group(2).lower()])


def add_parser(subparsers):
    parser = subparsers.add_parser("shards", help="write webdataset shards from an image folder or a manifest",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder for shard-000000.tar ...")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images with .txt / .json caption files beside them")
    source.add_argument("--manifest", help="parquet or CSV manifest with an image-path column and caption columns")
    parser.add_argument("--root", help="folder the manifest's image paths are relative to (default: its folder)")
    parser.add_argument("--image-column", default="image_path", help="manifest column of image paths")
    for granularity in GRANULARITIES:
        parser.add_argument(f"--{granularity}", metavar="COLUMN", help=f"manifest column of the {granularity} captions")
    parser.add_argument("--shard-size", default="256MB", help="target bytes per shard (default 256MB)")
    parser.add_argument("--samples-per-shard", type=int, default=None, help="at most this many samples per shard")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_PIXELS, help="larger images are skipped")
    parser.set_defaults(func=run_shards)
    return parser


def _folder_samples(folder: Path, counts: SkipCounter) -> Iterator[tuple[str, Path, dict]]:
    """``(id, image path, members besides the image)`` of a folder; caption-less images skipped."""
    if not folder.is_dir():
        raise TipslabError(f"--images {folder}: not a folder (expected images with .txt / .json captions beside them)")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not images:
        raise TipslabError(f"--images {folder}: no images found")
    for path in images:
        members = {}
        for ext in ("txt", "json"):
            caption = path.with_suffix(f".{ext}")
            if caption.is_file():
                members[ext] = caption.read_bytes()
        if not members:
            counts.skip("no_caption")
            print(f"tipslab shards: skipping {path}: no {path.stem}.txt or {path.stem}.json beside it", file=sys.stderr)
            continue
        yield path.relative_to(folder).as_posix(), path, members


def _manifest_samples(args, counts: SkipCounter) -> Iterator[tuple[str, Path, dict]]:
    from tipslab.datamodules.manifest import scan_manifest

    manifest = Path(args.manifest)
    frame = scan_manifest(manifest)
    try:
        names = frame.collect_schema().names()
    except Exception as err:  # polars reads the header / footer here
        raise TipslabError(f"--manifest {manifest}: not a readable manifest ({err})") from None
    if args.image_column not in names:
        raise TipslabError(f"--manifest {manifest}: no column {args.image_column!r} (has: {', '.join(names)}); "
                           "name the image-path column with --image-column")
    columns = {}
    for granularity in GRANULARITIES:
        named = getattr(args, granularity)
        if named and named not in names:
            raise TipslabError(f"--{granularity} {named}: not a column of {manifest} (has: {', '.join(names)})")
        if named or granularity in names:
            columns[granularity] = named or granularity
    if not columns:
        raise TipslabError(f"--manifest {manifest}: no caption column; name them with --alt / --short / --long "
                           f"(has: {', '.join(names)})")
    root = Path(args.root) if args.root else manifest.parent
    table = frame.select([args.image_column, *dict.fromkeys(columns.values())]).collect()
    for row_index, row in enumerate(table.iter_rows(named=True)):
        raw = row[args.image_column]
        captions = {g: row[c] for g, c in columns.items() if isinstance(row[c], str) and row[c].strip()}
        if raw is None or not captions:
            counts.skip("missing_file" if raw is None else "empty_caption")
            print(f"tipslab shards: skipping {manifest} row {row_index}: "
                  f"{'no image path' if raw is None else 'every caption is empty'}", file=sys.stderr)
            continue
        path = Path(raw) if Path(raw).is_absolute() else root / raw
        yield f"{row_index:09d}", path, {"json": sample_json(f"{row_index:09d}", captions)}


def run_shards(args) -> int:
    from tqdm.auto import tqdm

    target = parse_size(args.shard_size)
    if Path(args.out).is_dir() and any(Path(args.out).glob("*.tar")):
        raise TipslabError(f"{args.out}: already holds .tar shards; write to an empty or new folder")
    counts = SkipCounter()
    source = _folder_samples(Path(args.images), counts) if args.images else _manifest_samples(args, counts)
    sink = ShardSink(args.out, samples_per_shard=args.samples_per_shard, target_bytes=target)
    try:
        for sample_id, path, members in tqdm(source, desc="shards", unit="img", disable=not sys.stderr.isatty()):
            conversions: list[str] = []
            try:
                read_image(path, max_pixels=args.max_image_pixels, conversions=conversions)  # validate only
            except UnreadableImage as err:
                counts.skip(err.kind)
                print(f"tipslab shards: skipping {err}", file=sys.stderr)
                continue
            if args.images:  # the id rides in the json (a .txt-only sample gets one just for it)
                members["json"] = _with_id(members.get("json", b"{}"), sample_id)
                if members["json"] is None:
                    counts.skip("bad_json")
                    print(f"tipslab shards: skipping {path}: its caption .json is not a json object", file=sys.stderr)
                    continue
            counts.ok(conversions)
            ext = path.suffix.lower().lstrip(".")
            sink.add(sink.key(sample_id), {"jpg" if ext == "jpeg" else ext: path.read_bytes(), **members})
        sink.close_shard()
    finally:
        sink.abort()
    if sink.samples == 0:
        raise TipslabError(f"no sample could be written ({counts.summary()}); see the messages above")
    print(f"wrote {sink.samples} samples in {len(sink.paths)} shard(s), {sink.bytes} bytes -> {args.out}; "
          f"{counts.summary()}")
    return 0


def _with_id(data: bytes, sample_id: str) -> bytes | None:
    """A folder's caption json with the sample id added (kept if it has one); None if not an object."""
    try:
        meta = json.loads(data.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    if not isinstance(meta, dict):
        return None
    meta.setdefault("id", sample_id)
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")
