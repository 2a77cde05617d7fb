"""Patch-embedding extraction: image sources in, one L2-normalised patch matrix per image out.

A *source* is what `tipslab index` is pointed at: a folder of images (read by
`tipslab.datamodules.image_folder.ImageFolder`) or the built-in scenes validation split
(``scenes:val`` / ``scenes:val:N``). Each yields `SourceImage`s: a stable key (the file's
absolute path, or ``scenes:val/000003``), the original size, and the preprocessed tensor
(the whole image resized to a square ``image_size``, no crop, pixels in [0, 1], no mean/std:
what the encoder expects).

`extract_patches` runs the encoder over a source in batches and yields `PatchRecord`s.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tipslab.errors import TipslabError

FEATURES = ("dense", "final")
SCENES_PATTERN = re.compile(r"^scenes:(?P<split>[a-z]+)(?::(?P<count>\d+))?$")
DEFAULT_SCENES_COUNT = 64


@dataclass
class SourceImage:
    """One image of a source, preprocessed for the encoder."""

    key: str  # unique within an index: absolute file path, or "scenes:val/000003"
    path: str | None  # the image file to show in overlays; None for generated images
    size: tuple[int, int]  # original (width, height)
    pixels: torch.Tensor  # [3, S, S]: float32 in [0, 1], or uint8 0-255 (a folder's: / 255 on the device)
    position: int | None = None  # the image's place in the whole source (sharded extraction merges by it)


@dataclass
class PatchRecord:
    """One image's patch embeddings."""

    image: SourceImage
    grid: tuple[int, int]  # (grid_h, grid_w)
    vectors: np.ndarray  # float32 (float16 from a GPU) [grid_h * grid_w, D], rows L2-normalised, row-major


@dataclass
class ImageSource:
    """An iterable of `SourceImage`s plus what it could not read.

    ``skipped`` holds ``{"path": ..., "reason": ...}`` for unreadable images; it is complete
    once iteration has finished.
    """

    spec: str
    images: Iterable[SourceImage]
    count: int | None
    skipped: list[dict] = field(default_factory=list)
    # How the pixels were made (`Preprocessing.describe()`), for the index manifest.
    preprocessing: dict | None = None
    # sha256 of the keys this source lists (a shard's, when sharded): a finished shard is reused only if equal.
    listing: str | None = None

    def __iter__(self) -> Iterator[SourceImage]:
        return iter(self.images)

    def __len__(self) -> int:
        return self.count or 0


def _listing(keys: Iterable[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def _folder_source(folder: Path, image_size: int, shard: tuple[int, int], workers: int, decode: str) -> ImageSource:
    from tipslab.datamodules.image_folder import ImageFolder

    dataset = ImageFolder(str(folder), image_size, decode=decode)
    rank, world = shard
    positions = range(rank, len(dataset.paths), world)
    dataset.paths = dataset.paths[rank::world]  # this process's share, listed before anything is decoded
    source = ImageSource(spec=str(folder), images=(), count=len(dataset),
                         listing=_listing(os.path.abspath(str(p)) for p in dataset.paths))
    where = dict(zip(map(str, dataset.paths), positions))

    def generate():
        for image in dataset.read(workers):
            path = os.path.abspath(image.path)
            yield SourceImage(key=path, path=path, size=image.size, pixels=image.pixels, position=where[image.path])
        source.skipped.extend({"path": os.path.abspath(p), "reason": dataset.errors.get(p, "unreadable")}
                              for p in dataset.skipped)

    source.images = generate()
    return source


def decode_workers(world: int = 1) -> int:
    """Decoding processes per extracting process: none on a CPU (the forward pass needs the cores
    and is far slower than decoding), up to 8 on a GPU machine, sharing the cores among ``world``."""
    if not torch.cuda.is_available():
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(world, 1) - 1))


class _SceneRange:
    """Scenes ``mine[start:stop]`` drawn and stacked (picklable: it runs in decoding processes)."""

    def __init__(self, dataset, mine: range):
        self.dataset, self.mine = dataset, mine

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        return torch.stack([_scene_pixels(self.dataset[i]) for i in self.mine[start:stop]])


def _scenes_source(spec: str, split: str, count: int, image_size: int, seed: int | None,
                   shard: tuple[int, int], workers: int) -> ImageSource:
    from tipslab.datamodules.ordered_chunks import ordered_chunks
    from tipslab.datamodules.scenes import ScenesDataset

    kwargs = {} if seed is None else {"seed": seed}
    dataset = ScenesDataset(split=split, num_images=count, image_size=image_size, **kwargs)
    mine = range(shard[0], len(dataset), shard[1])
    keys = [f"scenes:{split}/{i:06d}" for i in mine]

    def generate():
        places = iter(zip(mine, keys))
        for stacked in ordered_chunks(_SceneRange(dataset, mine), len(mine), workers):
            for pixels in stacked:
                i, key = next(places)
                yield SourceImage(key=key, path=None, size=(int(pixels.shape[-1]), int(pixels.shape[-2])),
                                  pixels=pixels, position=i)

    return ImageSource(spec=spec, images=generate(), count=len(mine), listing=_listing(keys))


def _scene_pixels(sample) -> torch.Tensor:
    """The image tensor of one scenes sample (a tensor, a dict with "image", or an object)."""
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(sample, dict):
        return sample["image"]
    if isinstance(sample, (tuple, list)):
        return sample[0]
    return sample.image


def check_source(spec: str | os.PathLike) -> tuple[str, str, int | None]:
    """Validate a source spec without reading images: ("scenes", split, count) or ("folder", path, None).

    Cheap, so commands call it before loading a model.
    """
    text = str(spec)
    match = SCENES_PATTERN.match(text)
    if match:
        split = match["split"]
        if split != "val":
            raise TipslabError(f"source {text!r}: only the scenes validation split can be indexed (scenes:val[:N])")
        count = int(match["count"]) if match["count"] else None
        if count is not None and count <= 0:
            raise TipslabError(f"source {text!r}: expected a positive number of scenes, got {count}")
        return "scenes", split, count
    folder = Path(text).expanduser()
    if not folder.exists():
        raise TipslabError(f"source {text}: does not exist (expected a folder of images or scenes:val[:N])")
    if not folder.is_dir():
        raise TipslabError(f"source {text}: is not a folder (expected a folder of images or scenes:val[:N])")
    return "folder", str(folder.resolve()), None


def open_source(spec: str | os.PathLike, image_size: int, *, scenes_count: int | None = None,
                scenes_seed: int | None = None, shard: tuple[int, int] = (0, 1),
                workers: int | None = None, decode: str = "full") -> ImageSource:
    """The image source named by ``spec``: a folder of images, or ``scenes:val[:N]``.

    ``scenes_count`` applies to a bare ``scenes:val`` (default 64); ``scenes:val:N`` wins.
    ``shard=(rank, world)`` keeps images rank, rank + world, ... of the whole source (each
    `SourceImage.position` is its place in the whole source). ``workers`` decode a folder's
    images (or draw the scenes) in that many processes (None: `decode_workers`). ``decode``:
    `Preprocessing.decode` of a folder's images ("reduced": large JPEGs decoded smaller first).
    """
    from tipslab.datamodules.preprocess import Preprocessing

    rank, world = shard
    if not 0 <= rank < world:
        raise TipslabError(f"shard: expected 0 <= rank < world size, got rank {rank} of {world}")
    kind, where, count = check_source(spec)
    workers = decode_workers(world) if workers is None else workers
    preprocessing = Preprocessing(image_size, decode=decode)  # checks ``decode`` before any image is read
    if kind == "scenes":
        source = _scenes_source(str(spec), where, count or scenes_count or DEFAULT_SCENES_COUNT, image_size, scenes_seed,
                                shard, workers)
    else:
        source = _folder_source(Path(where), image_size, shard, workers, decode)
    source.preprocessing = preprocessing.describe()
    return source


def _batches(images: Iterable[SourceImage], batch_size: int) -> Iterator[list[SourceImage]]:
    batch = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def encoder_device(encoder: torch.nn.Module) -> torch.device:
    try:
        return next(encoder.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def embed_images(encoder, pixels: torch.Tensor, feature: str = "dense") -> tuple[torch.Tensor, tuple[int, int]]:
    """L2-normalised patch embeddings ``[B, N, D]`` (float32, on CPU) and the patch grid.

    ``dense`` is the last block's value path (the zero-shot segmentation features: best
    patch-text alignment); ``final`` is the ordinary output patch tokens.
    """
    if feature not in FEATURES:
        raise TipslabError(f"feature: expected one of {FEATURES}, got {feature!r}")
    out = encoder.encode_image(pixels.to(encoder_device(encoder)), dense=feature == "dense")
    patches = torch.nn.functional.normalize(out.patches.float(), dim=-1)
    return patches.cpu(), (int(out.grid[0]), int(out.grid[1]))


def _uniform_batches(images: Iterable[SourceImage], batch_size: int) -> Iterator[list[SourceImage]]:
    for batch in _batches(images, batch_size):
        sizes = {tuple(img.pixels.shape) for img in batch}
        if len(sizes) != 1:
            raise TipslabError(f"source images: expected one preprocessed shape per batch, got {sorted(sizes)}")
        yield batch


def extract_patches(encoder, images: Iterable[SourceImage], *, feature: str = "dense", batch_size: int | None = None,
                    total: int | None = None, progress: bool = True, desc: str = "extract",
                    plan=None, stats=None) -> Iterator[PatchRecord]:
    """Run the encoder over ``images`` in batches; one `PatchRecord` per image, in source order.

    How batches run (bf16, pinned buffers, overlap; batch size when ``batch_size`` is None) is
    `extract_pipeline.plan_for` the encoder's device unless ``plan`` says otherwise. On a GPU the
    vectors come back as float16 (what the index stores); on a CPU as float32. ``stats``, an
    `extract_pipeline.ExtractionStats`, is filled with where the time went.
    """
    from tqdm.auto import tqdm

    from tipslab.retrieval.extract_pipeline import ExtractionStats, plan_for, run_batches

    if feature not in FEATURES:
        raise TipslabError(f"feature: expected one of {FEATURES}, got {feature!r}")
    if batch_size is not None and batch_size <= 0:
        raise TipslabError(f"batch_size: expected a positive integer, got {batch_size}")
    plan = plan or plan_for(encoder_device(encoder), batch_size)
    was_training = encoder.training
    encoder.eval()
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)
    stats = stats if stats is not None else ExtractionStats()
    started = time.perf_counter()
    try:
        for batch, patches, grid in run_batches(encoder, _uniform_batches(images, plan.batch_size), plan,
                                                dense=feature == "dense", stats=stats):
            if patches.shape[1] != grid[0] * grid[1]:
                raise TipslabError(f"encoder: {patches.shape[1]} patch tokens do not fill its grid {grid}")
            vectors = patches.numpy()
            for i, img in enumerate(batch):
                yield PatchRecord(image=img, grid=grid, vectors=np.ascontiguousarray(vectors[i]))
            bar.update(len(batch))
            if progress:  # a large share says decoding is the bottleneck (`tipslab index --decode-workers`)
                share = stats.data_wait_s / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"waiting for images {share:.0%}", refresh=False)
    finally:
        bar.close()
        encoder.train(was_training)
