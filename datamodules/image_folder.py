"""A folder of images as a source for indexing and embedding (`tipslab index DIR`).

Images are found recursively (``.png .jpg .jpeg .webp .bmp``, any case; hidden files such as
macOS's ``._x.jpg`` are left out), in sorted path order so an index is built in the same order
every time. Each is yielded as ``(path, float [3, S, S] in [0, 1])``: the whole image resized to
``S x S`` (no crop: every pixel can be searched; callers map boxes back with the original size).

An image that cannot be read is skipped with a warning and recorded in ``skipped`` (paths) and
``errors`` (path -> reason); it never stops indexing a large folder.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from tipslab.datamodules.sample import CorruptSample
from tipslab.datamodules.transforms import Resize
from tipslab.errors import TipslabError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str | os.PathLike, extensions=EXTENSIONS, recursive: bool = True) -> list[Path]:
    """Image files under ``folder``, sorted; a missing or image-less folder raises TipslabError."""
    root = Path(folder)
    looked_for = " ".join(extensions)
    if not root.exists():
        raise TipslabError(f"image folder {root}: does not exist (expected a folder of {looked_for} images)")
    if not root.is_dir():
        raise TipslabError(f"image folder {root}: is not a folder (expected a folder of {looked_for} images)")
    wanted = {e.lower() for e in extensions}
    pattern = "**/*" if recursive else "*"
    paths = sorted(p for p in root.glob(pattern)
                   if p.suffix.lower() in wanted and not p.name.startswith(".") and p.is_file())
    if not paths:
        where = "recursively " if recursive else ""
        raise TipslabError(f"image folder {root}: no images found {where}(looked for {looked_for})")
    return paths


class ImageFolder(torch.utils.data.Dataset):
    """``for path, pixels in ImageFolder(dir, 224)``; ``dataset[i]`` raises `CorruptSample` instead."""

    def __init__(self, path: str | os.PathLike, image_size: int = 224, extensions=EXTENSIONS, recursive: bool = True):
        self.root = Path(path)
        self.paths = list_images(self.root, extensions, recursive)
        self.view = Resize(image_size)
        self.image_size = self.view.image_size
        self.skipped: list[str] = []
        self.errors: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")  # full decode inside the try: truncated files fail here
        except Exception as err:  # PIL raises many types for unreadable data
            raise CorruptSample(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
        pixels, _ = self.view(image)
        return pixels

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        return str(self.paths[index]), self.load(index)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for index, path in enumerate(self.paths):
            try:
                pixels = self.load(index)
            except CorruptSample as err:
                self.skipped.append(str(path))
                self.errors[str(path)] = str(err)
                warnings.warn(f"skipping unreadable image {err}", stacklevel=2)
                continue
            yield str(path), pixels
