"""`tipslab index` and `tipslab search`: the command-line face of the retrieval package.

`add_index_parser(subparsers)` / `add_search_parser(subparsers)` register the subcommands on the
`tipslab` console script (platform/cli.py); each sets ``func`` to a function(args) -> exit code.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tipslab.errors import TipslabError
from tipslab.retrieval.regions import REGION_FRACTION, REGION_UPSAMPLE


def _int_at_least(low: int, expected: str):
    """An argparse type: an integer >= ``low``, else the error says ``expected``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "0 or a positive integer")


def _unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def add_index_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "index", help="index the patch embeddings of an image collection (FAISS + metadata)",
        description="Extract patch embeddings of every image in SOURCE with MODEL_PATH and write a "
                    "self-describing index directory that `tipslab search` can query.")
    parser.add_argument("model_path", metavar="MODEL_PATH", help="tipslab checkpoint directory (or official model)")
    parser.add_argument("source", metavar="SOURCE",
                        help="a folder of images, or scenes:val / scenes:val:N (the built-in scenes val split)")
    parser.add_argument("--out", required=True, metavar="DIR", help="index directory to write")
    parser.add_argument("--factory", default="auto",
                        help="FAISS index factory string, inner product metric (e.g. Flat, IVF256,SQ8), or auto "
                             "(default): chosen from the collection's size and --bytes-per-vector, nprobe tuned "
                             "to --recall-target")
    parser.add_argument("--bytes-per-vector", type=_positive_int, default=None, metavar="B",
                        help="memory budget of --factory auto: resident bytes per vector (default 100; "
                             "exact search up to 100k vectors)")
    parser.add_argument("--recall-target", type=float, default=0.95,
                        help="10-recall@10 that --factory auto tunes nprobe to on held-out queries (default 0.95)")
    parser.add_argument("--pool", type=_positive_int, default=1, metavar="K",
                        help="index K x K pooled patches (K^2 fewer vectors, coarser regions; default 1)")
    parser.add_argument("--feature", choices=("dense", "final"), default="dense",
                        help="dense: last block's value path (best patch-text alignment, default); final: output tokens")
    parser.add_argument("--scenes-val", type=_positive_int, default=None, metavar="N",
                        help="number of scenes for SOURCE scenes:val (default 64)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="images per forward pass (default: 16 on CPU, sized to the GPU's free memory)")
    parser.add_argument("--image-size", type=_positive_int, default=None,
                        help="resize images to this square size (multiple of 14; default the model's img_size)")
    parser.add_argument("--device", default=None, help="torch device (default cuda when present, else cpu)")
    parser.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                        help="extract with N processes (rank r takes images r, r+N, ...; one GPU each when present), "
                             "merged into one index; under torchrun the world size sets this (default 1)")
    parser.add_argument("--decode-workers", type=_non_negative_int, default=None, metavar="N",
                        help="processes decoding images for each extraction process (default: up to 8 with a "
                             "GPU, sharing the cores among --workers; 0 on a CPU, where the model needs the cores)")
    # `Preprocessing.decode`'s choices, spelled out: importing preprocess would load torchvision at start-up.
    parser.add_argument("--decode", choices=("full", "reduced"), default=None,
                        help="reduced: JPEGs at least twice the model's input size decode at 1/2, 1/4 or 1/8 first "
                             "(DCT scaling; several times faster for photos, vectors a little different from "
                             "`tipslab embed`'s); recorded in the index, --add follows it (default full)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    mode.add_argument("--add", action="store_true",
                      help="add SOURCE's images that are not indexed yet to the existing index at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_index)
    _add_delete_parser(subparsers)
    return parser


def _add_delete_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "index-delete", help="delete images from an index directory (by image id or by path / key)",
        description="Delete images from an index: searches skip them from then on (their vectors stay on disk "
                    "until the index is rebuilt; adding the file again indexes it anew).")
    parser.add_argument("index_dir", metavar="DIR", help="index directory written by `tipslab index`")
    parser.add_argument("images", metavar="IMAGE", nargs="+",
                        help="image ids (as in images.parquet) or image paths / keys as indexed")
    parser.set_defaults(func=run_delete)
    return parser


def run_delete(args) -> int:
    from tipslab.retrieval.index_dir import IndexDirectory

    index = IndexDirectory.open(args.index_dir)
    keys = index.images["key"].to_list()
    live = {key: i for i, key in enumerate(keys) if i not in set(index.deleted)}
    ids = []
    for item in args.images:
        key = item if item in live else str(Path(item).expanduser().resolve())  # keys of files are absolute paths
        if item.isdigit():
            ids.append(int(item))
        elif key in live:
            ids.append(live[key])
        else:
            raise TipslabError(f"IMAGE {item!r}: neither an image id nor the path / key of an indexed image "
                               f"in {index.path}")
    newly = index.delete(ids)
    print(f"deleted {newly} image(s) from {index.path} ({len(ids) - newly} already deleted); "
          f"{index.num_images - len(index.deleted)} remain searchable")
    return 0


def run_index(args) -> int:
    from tipslab.retrieval.index_dir import IndexDirectory, build_index
    from tipslab.retrieval.sharded_build import build_index_sharded, build_index_torchrun, torchrun_rank

    start = time.perf_counter()
    progress = not args.quiet
    distributed = torchrun_rank()
    if (args.workers > 1 or distributed) and args.add:
        raise TipslabError("--add: runs in one process; drop --workers (or torchrun) to add images to an index")
    if distributed and args.workers > 1:
        raise TipslabError(f"--workers {args.workers}: under torchrun each process is one worker; drop --workers")
    build = {"factory": args.factory, "feature": args.feature, "batch_size": args.batch_size,
             "overwrite": args.overwrite, "image_size": args.image_size, "scenes_count": args.scenes_val,
             "device": args.device, "progress": progress, "bytes_per_vector": args.bytes_per_vector,
             "recall_target": args.recall_target, "pool": args.pool, "decode_workers": args.decode_workers,
             "decode": args.decode or "full"}
    if distributed:
        index = build_index_torchrun(args.model_path, args.source, args.out, **build)
        if index is None:  # rank 0 merges and reports
            return 0
    elif args.workers > 1:
        index = build_index_sharded(args.model_path, args.source, args.out, args.workers, **build)
    elif args.add:
        if not Path(args.out).exists():
            raise TipslabError(f"--out {args.out}: no index there to --add to; build one first (without --add)")
        index = IndexDirectory.open(args.out)
        if args.image_size is not None and args.image_size != index.image_size:
            raise TipslabError(f"--image-size {args.image_size}: the index at {args.out} was built at "
                               f"{index.image_size}; an index holds one size")
        if args.decode is not None and args.decode != index.decode:
            raise TipslabError(f"--decode {args.decode}: the index at {args.out} was built with --decode "
                               f"{index.decode}; added images are decoded the same way (drop --decode)")
        if args.feature != index.feature:
            raise TipslabError(f"--feature {args.feature}: the index at {args.out} holds {index.feature!r} features")
        _check_same_model(args.model_path, index)
        counts = index.add(args.source, batch_size=args.batch_size, progress=progress,
                           scenes_count=args.scenes_val, decode_workers=args.decode_workers)
        print(f"added {counts['added']} image(s) to {index.path} ({counts['already_indexed']} already indexed, "
              f"{counts['skipped']} unreadable skipped)")
    else:
        index = build_index(args.model_path, args.source, args.out, **build)
    counts = index.manifest["counts"]
    print(f"index {index.path}: {counts['images']} images, {counts['vectors']} patch vectors of dim {index.dim} "
          f"({index.manifest['factory']}, {index.feature} features), {counts['skipped']} skipped "
          f"[{time.perf_counter() - start:.1f} s]")
    return 0


def _check_same_model(model_path: str, index) -> None:
    from tipslab.retrieval.index_dir import model_identity

    given = model_identity(model_path)
    recorded = index.manifest["model"]
    if given.get("sha256") and recorded.get("sha256") and given["sha256"] != recorded["sha256"]:
        raise TipslabError(f"MODEL_PATH {model_path}: not the model the index at {index.path} was built with "
                           f"({recorded.get('path') or recorded.get('source')}); vectors of two models do not mix")


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "search", help="find regions matching a text query in an index directory",
        description="Rank image regions of an index directory by similarity to a text query; print "
                    "a table and write overlay PNGs.")
    parser.add_argument("index_dir", metavar="DIR", help="index directory written by `tipslab index`")
    parser.add_argument("query", metavar="TEXT", help='what to look for, e.g. "a red circle"')
    parser.add_argument("--k", type=_positive_int, default=5, help="number of regions to return (default 5)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the PNGs (default DIR/search/<query slug>)")
    parser.add_argument("--no-png", action="store_true", help="print the table only")
    parser.add_argument("--no-templates", action="store_true",
                        help="embed the raw query instead of averaging prompt templates")
    parser.add_argument("--candidates", type=_positive_int, default=None,
                        help="patches fetched from FAISS before re-scoring (default max(100, 20 k))")
    parser.add_argument("--per-image", type=_positive_int, default=2, help="regions per image at most (default 2)")
    parser.add_argument("--fraction", type=float, default=REGION_FRACTION,
                        help="region threshold as a fraction of each image's score range "
                             f"(default {REGION_FRACTION})")
    parser.add_argument("--upsample", type=_positive_int, default=REGION_UPSAMPLE,
                        help="regions are found on the score map upsampled this many times, so boxes can end "
                             f"inside a patch (default {REGION_UPSAMPLE}; 1: the patch grid)")
    parser.add_argument("--threshold", type=_unit_float, default=None, metavar="P",
                        help="keep regions whose confidence (the query's share against background prompts, "
                             "0..1) is at least P (default 0.5); 0 keeps the top k whatever they score")
    parser.add_argument("--model", default=None, metavar="MODEL_PATH",
                        help="the model to embed the query with (default: the index's own copy, else the "
                             "path it was built from); refused unless it has the index's weights")
    parser.add_argument("--params", default=None, help='FAISS search parameters, e.g. "nprobe=32"')
    parser.add_argument("--device", default=None, help="torch device (default cuda when present, else cpu)")
    parser.set_defaults(func=run_search)
    return parser


def format_table(hits) -> str:
    rows = [("rank", "score", "conf", "box (x0,y0,x1,y1)", "image")]
    rows += [(str(h.rank), f"{h.score:.4f}", f"{h.confidence:.3f}", "({},{},{},{})".format(*h.box), h.image_path)
             for h in hits]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join([r[0].rjust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]), r[3].ljust(widths[3]),
                        r[4]]) for r in rows]
    return "\n".join(lines)


def fewer_hits_note(found: int, k: int, threshold: float | None) -> str | None:
    """What to tell the user when a search returns fewer than k regions."""
    if found >= k:
        return None
    if threshold:
        return (f"only {found} of the {k} regions asked for reach confidence {threshold:g}"
                + (": nothing in the index matches well" if found == 0 else "")
                + " (--threshold 0 shows the best regions anyway)")
    return f"only {found} of the {k} regions asked for exist in the index"


def run_search(args) -> int:
    from tipslab.retrieval.search import (
        DEFAULT_TEMPLATES,
        DEFAULT_THRESHOLD,
        Searcher,
        fills_text_context,
        text_context_length,
    )

    searcher = Searcher(args.index_dir, device=args.device, model=args.model)
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    hits = searcher.search(args.query, args.k, templates=None if args.no_templates else DEFAULT_TEMPLATES,
                           candidates=args.candidates, per_image=args.per_image, fraction=args.fraction, upsample=args.upsample,
                           params=args.params, threshold=threshold or None)
    if fills_text_context(searcher.loaded, args.query):
        print(f"note: the query fills the text tower's context of {text_context_length(searcher.loaded)} "
              "tokens; the rest was cut off")
    print(f"{len(hits)} region(s) for \u201c{args.query}\u201d in {searcher.index.path} "
          f"({searcher.index.num_images} images):")
    if hits:
        print(format_table(hits))
    note = fewer_hits_note(len(hits), args.k, threshold)
    if note:
        print(f"note: {note}")
    if hits and not args.no_png:
        from tipslab.retrieval.overlay import slugify, write_overlays

        out = Path(args.out) if args.out else searcher.index.path / "search" / slugify(args.query)
        try:
            written = write_overlays(hits, out)[args.query]
        except OSError as err:
            raise TipslabError(f"--out {out}: cannot write the PNGs there ({err.strerror or err}); "
                               "pass another --out or --no-png") from None
        print(f"pictures: {len(written) - 1} hit PNG(s) and the contact sheet {written[-1]}")
    return 0
