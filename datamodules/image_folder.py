"""A folder of images as a source for indexing and embedding (`tipslab index DIR`).

Images are found recursively (`image_io.IMAGE_EXTENSIONS`, any case; hidden files such as
macOS's ``._x.jpg`` are left out), in sorted path order so an index is built in the same order
every time. Each is read by the one image reader (`image_io.read_image`: EXIF rotation, 16-bit,
palette, alpha, bomb guard) and yielded as ``(path, float [3, S, S] in [0, 1])`` made by the one
preprocessing (`preprocess.Preprocessing`: the whole image, no crop, so every pixel can be
searched; callers map boxes back with the original size).

An image that cannot be read is skipped with a warning and recorded in ``skipped`` (paths),
``errors`` (path -> reason) and ``counts`` (by kind); it never stops indexing a large folder.

`ImageFolder.read(workers=N)` decodes in N worker processes (`ordered_chunks`), in path order,
as uint8: one thread decodes a few hundred images/s, a GPU embeds thousands (`tipslab index`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tipslab.datamodules.image_io import IMAGE_EXTENSIONS, UnreadableImage, is_image_file
from tipslab.datamodules.ordered_chunks import ordered_chunks
from tipslab.datamodules.preprocess import Preprocessing
from tipslab.datamodules.sample_quality import SkipCounter
from tipslab.datamodules.transforms import check_image_size
from tipslab.errors import TipslabError

EXTENSIONS = IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder``, sorted; a missing or image-less folder raises TipslabError."""
    root = Path(folder)
    looked_for = " ".join(IMAGE_EXTENSIONS)
    if not root.exists():
        raise TipslabError(f"image folder {root}: does not exist (expected a folder of {looked_for} images)")
    if not root.is_dir():
        raise TipslabError(f"image folder {root}: is not a folder (expected a folder of {looked_for} images)")
    pattern = "**/*" if recursive else "*"
    paths = sorted(p for p in root.glob(pattern) if is_image_file(p) and p.is_file())
    if not paths:
        where = "recursively " if recursive else ""
        raise TipslabError(f"image folder {root}: no images found {where}(looked for {looked_for})")
    return paths


@dataclass
class FolderImage:
    """One decoded image of the folder: its path, preprocessed pixels and upright original size."""

    path: str
    pixels: torch.Tensor  # uint8 [3, S, S]: `Preprocessing.uint8`; / 255 gives the float image
    size: tuple[int, int]  # (width, height), EXIF rotation applied


class ImageFolder(torch.utils.data.Dataset):
    """``for path, pixels in ImageFolder(dir, 224)``; ``dataset[i]`` raises `CorruptSample` instead."""

    def __init__(self, path: str | os.PathLike, image_size: int = 224, recursive: bool = True, decode: str = "full"):
        self.root = Path(path)
        self.paths = list_images(self.root, recursive)
        self.image_size = check_image_size(image_size)
        self.preprocessing = Preprocessing(self.image_size, decode=decode)
        self.skipped: list[str] = []
        self.errors: dict[str, str] = {}
        self.counts = SkipCounter()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, conversions: list[str] | None = None) -> torch.Tensor:
        return self.preprocessing(self.preprocessing.read(self.paths[index], conversions)[0])

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        return str(self.paths[index]), self.load(index)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for image in self.read():
            yield image.path, image.pixels.float().div_(255.0)

    def read(self, workers: int = 0) -> Iterator[FolderImage]:
        """Every readable image in path order as uint8 pixels, decoded here (``workers=0``) or in
        that many worker processes; the unreadable ones are skipped, warned about and counted."""
        for outcomes, stacked in ordered_chunks(self._decode_range, len(self.paths), workers):
            readable = 0
            for index, outcome in outcomes:
                path = str(self.paths[index])
                if outcome[0] == "unreadable":
                    _, kind, reason = outcome
                    self.skipped.append(path)
                    self.errors[path] = reason
                    self.counts.skip(kind)
                    warnings.warn(f"skipping unreadable image {reason}", stacklevel=2)
                    continue
                _, size, conversions = outcome
                self.counts.ok(conversions)
                yield FolderImage(path, stacked[readable], tuple(size))
                readable += 1

    def _decode_range(self, start: int, stop: int):
        """Images start..stop-1: ``([(index, outcome)], uint8 [readable, 3, S, S] or None)``; an
        unreadable image's reason travels as text (a pickled exception would lose its ``kind``)."""
        outcomes, pixels = [], []
        for index in range(start, stop):
            conversions: list[str] = []
            try:
                image, full_size = self.preprocessing.read(self.paths[index], conversions)
            except UnreadableImage as err:
                outcomes.append((index, ("unreadable", err.kind, str(err))))
                continue
            pixels.append(self.preprocessing.uint8(image))
            outcomes.append((index, ("ok", full_size, conversions)))
        return outcomes, torch.stack(pixels) if pixels else None
