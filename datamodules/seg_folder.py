"""Segmentation datasets for zero-shot evaluation: any folder in the ADE20K or Pascal VOC layout
(or a plain images/ + masks/ pair), and the built-in scenes with their object masks.

Items are `(image float [3, H, W] in [0, 1], label long [H, W])` at the image's own size (the
evaluation resizes images, never labels); the dataset has `.class_names` (index = label id after
`reduce_zero_label`) and `.ignore_index`.

Layouts `open_seg_folder` recognises (first match wins):

- ADE20K: `images/<split>/*.jpg` + `annotations/<split>/*.png` (split `validation`); label 0 is
  "other" and ignored, the rest shift down by one (`reduce_zero_label`), as the official notebook;
- VOC: `JPEGImages/` + `SegmentationClass/` + `ImageSets/Segmentation/<split>.txt` (split `val`);
  label 255 (object borders) ignored, 0 is background and a class;
- plain: `images/` + `masks/` (or `annotations/`), masks matched to images by file stem.

Class names come from `classes.txt` in the folder (one per line, in label order), or are given;
without either, ADE20K and VOC folders use the benchmarks' names (`seg_class_names.py`).
Bad folders fail with one line naming the file: a mask missing or of another size than its image,
a class-name file whose length does not cover the mask values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tipslab.datamodules.image_io import IMAGE_EXTENSIONS
from tipslab.errors import TipslabError

CLASS_FILE = "classes.txt"


def read_class_names(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise TipslabError(f"class-name file {path}: does not exist (expected one class name per line, in label order)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise TipslabError(f"class-name file {path}: is empty (expected one class name per line, in label order)")
    return names


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


class SegFolder(torch.utils.data.Dataset):
    """Pairs of image and index-mask files with class names and an ignore index."""

    def __init__(self, pairs: list[tuple[Path, Path]], class_names: list[str], *, ignore_index: int = 255,
                 reduce_zero_label: bool = False, name: str = "folder", check_sizes: bool = True):
        if not pairs:
            raise TipslabError(f"segmentation dataset {name}: no image/mask pairs found")
        self.pairs = pairs
        self.class_names = list(class_names)
        self.ignore_index = int(ignore_index)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.name = name
        if check_sizes:  # PIL reads only the headers here: cheap even for 2000 ADE images
            for image_path, mask_path in pairs:
                with Image.open(image_path) as image, Image.open(mask_path) as mask:
                    if image.size != mask.size:
                        raise TipslabError(f"mask {mask_path}: size {mask.size[0]}x{mask.size[1]} differs from its "
                                           f"image {image_path.name} ({image.size[0]}x{image.size[1]})")

    def __len__(self) -> int:
        return len(self.pairs)

    def label(self, index: int) -> torch.Tensor:
        mask_path = self.pairs[index][1]
        with Image.open(mask_path) as mask:
            if mask.mode not in ("L", "P", "I", "I;16"):
                raise TipslabError(f"mask {mask_path}: mode {mask.mode}; expected a single-channel index mask")
            values = torch.from_numpy(np.asarray(mask).astype(np.int64))
        if self.reduce_zero_label:
            values = torch.where((values == 0) | (values == self.ignore_index), self.ignore_index, values - 1)
        bad = (values != self.ignore_index) & (values >= len(self.class_names))
        if bool(bad.any()):
            raise TipslabError(f"mask {mask_path}: label value {int(values[bad].max())} has no class name "
                               f"({len(self.class_names)} names; ignore index {self.ignore_index})")
        return values

    def __getitem__(self, index: int):
        image_path = self.pairs[index][0]
        with Image.open(image_path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
        return image, self.label(index)


def _pair_by_stem(images: list[Path], mask_dir: Path) -> list[tuple[Path, Path]]:
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    pairs = []
    for image in images:
        if image.stem not in masks:
            raise TipslabError(f"image {image}: no mask {image.stem}.png in {mask_dir}")
        pairs.append((image, masks[image.stem]))
    return pairs


def open_seg_folder(root: str | Path, *, class_names: list[str] | str | Path | None = None,
                    ignore_index: int | None = None, reduce_zero_label: bool | None = None,
                    split: str | None = None, limit: int | None = None) -> SegFolder:
    """A `SegFolder` for a folder in the ADE20K, VOC or plain layout (see the module doc)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise TipslabError(f"segmentation folder {root}: does not exist or is not a folder")
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        split_name = split or ("validation" if (root / "images" / "validation").is_dir() else None)
        image_dir = root / "images" / split_name if split_name else root / "images"
        mask_dir = root / "annotations" / split_name if split_name else root / "annotations"
        layout, reduce = "ade20k", bool(split_name == "validation")
        pairs = _pair_by_stem(_images_in(image_dir), mask_dir)
    elif (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        split_name = split or "val"
        listing = root / "ImageSets" / "Segmentation" / f"{split_name}.txt"
        if not listing.is_file():
            raise TipslabError(f"VOC folder {root}: no split file {listing}")
        stems = [s.strip() for s in listing.read_text().splitlines() if s.strip()]
        pairs = [(root / "JPEGImages" / f"{s}.jpg", root / "SegmentationClass" / f"{s}.png") for s in stems]
        for image, mask in pairs:
            if not image.is_file() or not mask.is_file():
                raise TipslabError(f"VOC folder {root}: {listing.name} lists {image.stem} but "
                                   f"{image if not image.is_file() else mask} does not exist")
        layout, reduce = "voc", False
    elif (root / "images").is_dir() and ((root / "masks").is_dir() or (root / "annotations").is_dir()):
        mask_dir = root / "masks" if (root / "masks").is_dir() else root / "annotations"
        pairs = _pair_by_stem(_images_in(root / "images"), mask_dir)
        layout, reduce = "plain", False
    else:
        raise TipslabError(f"segmentation folder {root}: not a known layout (expected images/ + annotations/ "
                           "(ADE20K), JPEGImages/ + SegmentationClass/ (VOC), or images/ + masks/)")
    if class_names is None:
        from tipslab.datamodules.seg_class_names import ADE20K_150, VOC_21

        builtin = {"ade20k": ADE20K_150, "voc": VOC_21}.get(layout)
        class_names = list(builtin) if builtin and not (root / CLASS_FILE).is_file() else root / CLASS_FILE
    if isinstance(class_names, (str, Path)):
        class_names = read_class_names(class_names)
    if limit:
        pairs = pairs[: int(limit)]
    return SegFolder(pairs, class_names, ignore_index=255 if ignore_index is None else int(ignore_index),
                     reduce_zero_label=reduce if reduce_zero_label is None else bool(reduce_zero_label),
                     name=f"{root} ({layout})")


class ScenesSegmentation(torch.utils.data.Dataset):
    """The scenes split as a segmentation set: every visible object pixel labelled with its class
    among `scene_class_names()` (49 classes); the background is ignored (it is no class a text
    names, as ADE20K's "other")."""

    ignore_index = 255

    def __init__(self, split: str = "val", num_images: int = 64, image_size: int = 112, seed: int = 0):
        from tipslab.datamodules.scenes import ScenesDataset, scene_class_names

        self.scenes = ScenesDataset(split, num_images=num_images, image_size=image_size, seed=seed)
        self.class_names = scene_class_names()
        self._column = {name: i for i, name in enumerate(self.class_names)}

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int):
        scene = self.scenes.scene(index)
        label = torch.full(scene.image.shape[:2], self.ignore_index, dtype=torch.long)
        for obj in scene.objects:  # masks are the visible pixels: later objects already cut out
            label[torch.from_numpy(obj.mask)] = self._column[obj.class_name]
        return scene.to_tensor(), label
