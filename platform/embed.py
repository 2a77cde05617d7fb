"""`tipslab embed`: image, text and patch embeddings of any loadable model, written to one file.

Inputs: image files or folders (`--images`), a manifest parquet with an image-path column
(`--manifest`), texts (`--texts`, `--texts-file`, ``-`` for standard input). Output by suffix:

- `.npz` (read with `allow_pickle=False`): `image_paths`, `image_cls1`, `image_cls2`
  `[N, D]`, with `--patches` `patches [N, h*w, D]` and `patch_grid [2]`, `texts`, `text [M, D]`,
  `temperature`;
- `.parquet`: one row per vector: `kind` (`image_cls1`, `image_cls2`, `patch`, `text`), `source`
  (image path or text), `patch_row`, `patch_col` (patches only), `embedding` (float32 list).

Embeddings are L2-normalised (what similarity uses) unless `--raw`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tipslab.atomic import atomic_write
from tipslab.datamodules.image_io import IMAGE_EXTENSIONS, UnreadableImage, is_image_file
from tipslab.datamodules.sample_quality import SkipCounter
from tipslab.errors import TipslabError

MANIFEST_COLUMNS = ("image_path", "path", "image")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "embed",
        help="write image / text / patch embeddings to .parquet or .npz",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "model",
        nargs="?",
        help="tipslab checkpoint directory, official TIPS file or directory, HF .safetensors, or a "
        "release name (tipsv2-b14, resolved under $TIPSLAB_WEIGHTS_DIR); omit with --vision",
    )
    parser.add_argument("--vision", help="official vision .npz (with --text and --tokenizer)")
    parser.add_argument("--text", help="official text .npz")
    parser.add_argument("--tokenizer", help="SentencePiece tokenizer.model for official models")
    parser.add_argument("--images", nargs="*", default=[], help="image files and/or folders (searched recursively)")
    parser.add_argument("--manifest", help=f"parquet with a column {' / '.join(MANIFEST_COLUMNS)} (paths relative to it)")
    parser.add_argument("--texts", nargs="*", default=[], help="texts to embed")
    parser.add_argument("--texts-file", help="a UTF-8 file with one text per line ('-' reads standard input)")
    parser.add_argument("--patches", action="store_true", help="also write patch embeddings")
    parser.add_argument("--dense", action="store_true", help="patches from the last block's value path (segmentation/search)")
    parser.add_argument("--raw", action="store_true", help="do not L2-normalise")
    parser.add_argument("--decode", choices=("full", "reduced"), default="full",  # `Preprocessing.decode`'s
                        help="reduced: JPEGs at least twice the input size decode at 1/2-1/8 first, as "
                             "`tipslab index --decode reduced` (default full)")
    parser.add_argument("--batch-size", type=int, default=16, help="images or texts per forward pass (default 16)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, help="output file, .parquet or .npz")
    parser.set_defaults(func=run_embed)
    return parser


# ------------------------------------------------------------------------------- inputs
def collect_images(items: list[str], manifest: str | None) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                raise TipslabError(f"--images {path}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise TipslabError(f"--images {path}: no such file or folder")
    if manifest:
        paths.extend(_manifest_images(Path(manifest).expanduser()))
    return paths


def _manifest_images(manifest: Path) -> list[Path]:
    import polars as pl

    if not manifest.is_file():
        raise TipslabError(f"--manifest {manifest}: no such file")
    try:
        table = pl.read_parquet(manifest)
    except Exception as err:  # polars raises several error types for a bad file
        raise TipslabError(f"--manifest {manifest}: not a readable parquet file ({err})") from None
    column = next((c for c in MANIFEST_COLUMNS if c in table.columns), None)
    if column is None:
        raise TipslabError(
            f"--manifest {manifest}: no image column; expected one of {', '.join(MANIFEST_COLUMNS)}, "
            f"found {', '.join(table.columns)}"
        )
    out = []
    for value in table[column].to_list():
        path = Path(str(value)).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        out.append(path)  # a missing file is skipped and counted when read, as an unreadable one
    return out


def collect_texts(texts: list[str], texts_file: str | None) -> list[str]:
    out = list(texts)
    if texts_file == "-":
        import sys

        return out + [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    if texts_file:
        path = Path(texts_file).expanduser()
        if not path.is_file():
            raise TipslabError(f"--texts-file {path}: no such file")
        out.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return out


def read_images(paths: list[Path], preprocess, counts: SkipCounter) -> tuple[list[Path], list[torch.Tensor]]:
    """The readable images of ``paths`` preprocessed (decoded as ``preprocess.decode`` says);
    unreadable ones warned about, counted by kind."""
    kept, pixels = [], []
    for path in paths:
        conversions: list[str] = []
        try:
            image = preprocess.read(path, conversions)[0]
        except UnreadableImage as err:
            counts.skip(err.kind)
            print(f"tipslab embed: skipping {err}", file=sys.stderr)
            continue
        counts.ok(conversions)
        kept.append(path)
        pixels.append(preprocess(image))
    return kept, pixels


# ------------------------------------------------------------------------------- compute
def compute_embeddings(loaded, image_paths: list[Path], texts: list[str], *, patches: bool = False,
                       dense: bool = False, normalize: bool = True, batch_size: int = 16,
                       progress: bool = False) -> dict:
    """Embeddings as numpy arrays (the keys of the .npz output); ``progress`` shows a bar per kind."""
    from tqdm.auto import tqdm

    dim = loaded.encoder.embed_dim
    counts = SkipCounter()
    readable: list[Path] = []
    norm = (lambda t: torch.nn.functional.normalize(t, dim=-1)) if normalize else (lambda t: t)
    cls1, cls2, patch_rows, grid = [], [], [], None
    image_bar = tqdm(total=len(image_paths), desc="embed images", unit="img", disable=not progress or not image_paths)
    for start in range(0, len(image_paths), max(batch_size, 1)):
        chunk, images = read_images(image_paths[start : start + batch_size], loaded.preprocess, counts)
        if not images:
            continue
        readable.extend(chunk)
        pixels = torch.stack(images)
        out = loaded.embed_images(pixels)
        cls1.append(norm(out.cls1).cpu())
        cls2.append(norm(out.cls2).cpu())
        if patches:
            patch_out = loaded.embed_images(pixels, dense=True) if dense else out
            patch_rows.append(norm(patch_out.patches).cpu())
            grid = patch_out.grid
        image_bar.update(len(chunk))
    image_bar.close()
    text_rows = []
    text_bar = tqdm(total=len(texts), desc="embed texts", unit="text", disable=not progress or len(texts) <= batch_size)
    for start in range(0, len(texts), max(batch_size, 1)):
        text_rows.append(norm(loaded.embed_texts(texts[start : start + batch_size])).cpu())
        text_bar.update(len(texts[start : start + batch_size]))
    text_bar.close()

    def stack(rows, shape):
        return torch.cat(rows).numpy().astype(np.float32) if rows else np.zeros(shape, np.float32)

    result = {
        "image_paths": np.array([str(p) for p in readable], dtype=np.str_),
        "image_cls1": stack(cls1, (0, dim)),
        "image_cls2": stack(cls2, (0, dim)),
        "texts": np.array(texts, dtype=np.str_),
        "text": stack(text_rows, (0, dim)),
        "temperature": np.float32(loaded.encoder.temperature.item()),
    }
    if patches:
        result["patches"] = stack(patch_rows, (0, 0, dim))
        result["patch_grid"] = np.array(grid or (0, 0), dtype=np.int64)
    return result


# ------------------------------------------------------------------------------- outputs
def write_npz(result: dict, path: Path) -> None:
    def write(tmp):
        with open(tmp, "wb") as handle:
            np.savez(handle, **result)

    atomic_write(path, write)


def write_parquet(result: dict, path: Path) -> None:
    import polars as pl

    kinds, sources, rows, cols, vectors = [], [], [], [], []

    def add(kind, source, matrix, row=None, col=None):
        kinds.extend([kind] * len(matrix))
        sources.extend(source if isinstance(source, list) else [source] * len(matrix))
        rows.extend(row if row is not None else [None] * len(matrix))
        cols.extend(col if col is not None else [None] * len(matrix))
        vectors.extend(matrix)

    paths = result["image_paths"].tolist()
    add("image_cls1", paths, result["image_cls1"])
    add("image_cls2", paths, result["image_cls2"])
    if "patches" in result and len(paths):
        h, w = (int(v) for v in result["patch_grid"])
        patch_rows = [r for r in range(h) for _ in range(w)]
        patch_cols = [c for _ in range(h) for c in range(w)]
        for i, source in enumerate(paths):
            add("patch", source, result["patches"][i], patch_rows, patch_cols)
    add("text", result["texts"].tolist(), result["text"])
    dim = result["text"].shape[-1]
    table = pl.DataFrame(
        {
            "kind": pl.Series(kinds, dtype=pl.String),
            "source": pl.Series(sources, dtype=pl.String),
            "patch_row": pl.Series(rows, dtype=pl.Int32),
            "patch_col": pl.Series(cols, dtype=pl.Int32),
            "embedding": pl.Series(
                np.asarray(vectors, dtype=np.float32).reshape(-1, dim), dtype=pl.Array(pl.Float32, dim)
            ),
        }
    )
    atomic_write(path, lambda tmp: table.write_parquet(tmp))


def run_embed(args) -> int:
    from tipslab.modules.api import load_model

    out = Path(args.out).expanduser()
    if out.suffix not in (".npz", ".parquet"):
        raise TipslabError(f"--out {out}: expected a .npz or .parquet file")
    if args.batch_size <= 0:
        raise TipslabError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    image_paths = collect_images(args.images, args.manifest)
    texts = collect_texts(args.texts, args.texts_file)
    if not image_paths and not texts:
        raise TipslabError("nothing to embed: give --images, --manifest, --texts or --texts-file")
    if args.model is None and args.vision is None:
        raise TipslabError("give a model (checkpoint, official file/directory, release name) or --vision/--text")
    official = {k: v for k, v in (("text", args.text), ("tokenizer", args.tokenizer)) if v}
    loaded = load_model(args.model or args.vision, device=args.device, **official)
    loaded.preprocess = replace(loaded.preprocess, decode=args.decode)
    result = compute_embeddings(
        loaded, image_paths, texts, patches=args.patches or args.dense, dense=args.dense,
        normalize=not args.raw, batch_size=args.batch_size, progress=not args.quiet,
    )
    if image_paths and not len(result["image_paths"]) and not texts:
        raise TipslabError(f"none of the {len(image_paths)} image(s) could be read (reasons above); nothing written")
    (write_npz if out.suffix == ".npz" else write_parquet)(result, out)
    skipped = len(image_paths) - len(result["image_paths"])
    if skipped:
        print(f"skipped {skipped} unreadable image(s) (listed above)")
    print(f"wrote {len(result['image_paths'])} images, {len(texts)} texts, dim {loaded.encoder.embed_dim} -> {out}")
    return 0
