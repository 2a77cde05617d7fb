"""Datasets for dense probes: an image and its per-pixel target (class ids or depth in metres).

Every item is `{"image": float [3, S, S] in [0, 1], "target": [S, S], "id": str}`, with
`target` a long tensor of class ids (255 = ignore) for segmentation or a float tensor of
metres (0 = no measurement) for depth. Images are resized bicubically to S x S (the encoder's
preprocessing), targets by nearest neighbour (a resized label must stay a label, a resized
depth must not blend an object into the wall behind it); metrics are computed at S x S.

Layouts read:

- VOC (`JPEGImages/*.jpg`, `SegmentationClass/*.png` palette/index PNGs with 255 on object
  borders, `ImageSets/Segmentation/<split>.txt`): labels as stored (0 = background, 1-20).
- ADE20K (`images/<training|validation>/*.jpg`, `annotations/<...>/*.png`): 0 is "other" and
  is ignored, classes 1-150 become 0-149 (the usual "reduce zero label").
- NYU-style depth: `<split>/rgb/<name>.{jpg,png}` with `<split>/depth/<name>.png` (uint16,
  millimetres, 0 = missing), or the BTS/DINOv2 export's `rgb_<n>.jpg` beside `sync_depth_<n>.png`.
- The built-in scenes (`ScenesDense`): seg labels from `scenes.segmentation_labels`, depth from
  `Scene.depth`, normals (`[3, S, S]` unit vectors) from `scenes.depth_normals` of that depth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tipslab.errors import TipslabError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IGNORE = 255


def _rgb(path: Path, size: int) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    except OSError as err:
        raise TipslabError(f"image {path}: not readable ({err})") from None
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def _index_png(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise TipslabError(f"label {path}: mode {image.mode}; expected an index PNG (palette or grey)")
            image = image.resize((size, size), Image.Resampling.NEAREST)
            return np.asarray(image)
    except OSError as err:
        raise TipslabError(f"label {path}: not readable ({err})") from None


def _resize_nearest(array: np.ndarray, size: int) -> np.ndarray:
    rows = (np.arange(size) * array.shape[0] / size).astype(int)
    cols = (np.arange(size) * array.shape[1] / size).astype(int)
    return array[rows][:, cols]


class SegFolder(torch.utils.data.Dataset):
    """A VOC or ADE20K folder (found from its sub-folders), one split."""

    def __init__(self, root, split: str = "train", image_size: int = 448):
        self.root, self.size = Path(root), int(image_size)
        if (self.root / "JPEGImages").is_dir():
            self.layout = "voc"
            names_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
            if not names_file.is_file():
                raise TipslabError(f"VOC folder {self.root}: no {names_file} (split {split!r})")
            names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
            self.pairs = [(self.root / "JPEGImages" / f"{n}.jpg", self.root / "SegmentationClass" / f"{n}.png")
                          for n in names]
        elif (self.root / "images").is_dir() and (self.root / "annotations").is_dir():
            self.layout = "ade"
            folder = {"train": "training", "val": "validation"}.get(split, split)
            images = sorted((self.root / "images" / folder).glob("*.jpg"))
            self.pairs = [(p, self.root / "annotations" / folder / f"{p.stem}.png") for p in images]
        else:
            raise TipslabError(f"{self.root}: not a segmentation folder; expected VOC (JPEGImages/, SegmentationClass/) "
                               "or ADE20K (images/, annotations/)")
        if not self.pairs:
            raise TipslabError(f"{self.root}: no images in split {split!r}")
        missing = [str(label) for _, label in self.pairs if not label.is_file()]
        if missing:
            raise TipslabError(f"{self.root}: {len(missing)} images have no label PNG, e.g. {missing[0]}")
        self.num_classes = 21 if self.layout == "voc" else 150

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.pairs[index]
        labels = _index_png(label_path, self.size).astype(np.int64)
        if self.layout == "ade":
            labels = np.where(labels == 0, IGNORE, labels - 1)
        return {"image": _rgb(image_path, self.size), "target": torch.from_numpy(labels), "id": image_path.stem}


class DepthFolder(torch.utils.data.Dataset):
    """NYU-style RGB + depth PNGs in millimetres, one split (a sub-folder, or the root itself)."""

    def __init__(self, root, split: str = "train", image_size: int = 448):
        self.root, self.size = Path(root), int(image_size)
        base = self.root / split if (self.root / split).is_dir() else self.root
        self.pairs: list[tuple[Path, Path]] = []
        if (base / "rgb").is_dir() and (base / "depth").is_dir():
            for image in sorted(p for p in (base / "rgb").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                depth = base / "depth" / image.relative_to(base / "rgb").with_suffix(".png")
                self.pairs.append((image, depth))
        else:  # the BTS export: rgb_00000.jpg beside sync_depth_00000.png
            for image in sorted(base.rglob("rgb_*")):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    self.pairs.append((image, image.with_name("sync_depth_" + image.stem[4:] + ".png")))
        if not self.pairs:
            raise TipslabError(f"{base}: no depth pairs; expected rgb/ + depth/ folders or rgb_*.jpg + sync_depth_*.png")
        missing = [str(d) for _, d in self.pairs if not d.is_file()]
        if missing:
            raise TipslabError(f"{base}: {len(missing)} images have no depth PNG, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, depth_path = self.pairs[index]
        try:
            with Image.open(depth_path) as depth_image:
                millimetres = np.asarray(depth_image).astype(np.float32)
        except OSError as err:
            raise TipslabError(f"depth {depth_path}: not readable ({err})") from None
        if millimetres.ndim != 2:
            raise TipslabError(f"depth {depth_path}: shape {millimetres.shape}; expected a single-channel PNG in mm")
        depth = _resize_nearest(millimetres, self.size) / 1000.0
        return {"image": _rgb(image_path, self.size), "target": torch.from_numpy(depth), "id": image_path.stem}


class ScenesDense(torch.utils.data.Dataset):
    """The built-in scenes with dense targets: `task` "seg" (labels of kind `labels`), "depth" or "normals"."""

    def __init__(self, task: str, split: str = "train", num_images: int = 512, image_size: int = 112,
                 seed: int = 0, labels: str = "class"):
        from tipslab.datamodules.scenes import ScenesDataset, segmentation_classes

        if task not in ("seg", "depth", "normals"):
            raise TipslabError(f"scenes: dense task {task!r}; expected seg, depth or normals")
        self.task, self.labels = task, labels
        self.scenes = ScenesDataset(split, num_images, image_size, seed)
        self.class_names = segmentation_classes(labels)
        self.num_classes = len(self.class_names)
        # Drawing a scene costs milliseconds; probes read each one once per epoch, so keep them
        # (uint8 image + target: ~40 KB per 112-px scene).
        self._kept: dict[int, tuple[np.ndarray, torch.Tensor, str]] = {}

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        from tipslab.datamodules.scenes import depth_normals, segmentation_labels

        index = int(index)
        if index not in self._kept:
            scene = self.scenes.scene(index)
            if self.task == "seg":
                target = torch.from_numpy(segmentation_labels(scene, self.labels).astype(np.int64))
            elif self.task == "depth":
                target = torch.from_numpy(scene.depth.copy())
            else:  # [3, H, W] unit normals of the depth map
                target = torch.from_numpy(depth_normals(scene.depth)).permute(2, 0, 1).contiguous()
            self._kept[index] = (scene.image, target, scene.id)
        image, target, scene_id = self._kept[index]
        return {"image": torch.from_numpy(image).permute(2, 0, 1).float().div(255.0), "target": target.clone(),
                "id": scene_id}
