"""Zero-shot classification and k-NN on CLS features: class folders (ImageNet's val layout) or
object crops of the built-in scenes.

- A class folder is `<root>/<class>/*.jpg`; the class names are the folder names (underscores as
  spaces) or the lines of `<root>/classes.txt` in sorted folder order (ImageNet's wnid folders).
  k-NN takes a folder holding `train/` and `val/` class folders.
- Scenes: every visible object cropped by its box (12% margin, at least one patch), resized to the
  model's input size, labelled with its class among the 49 `scene_class_names()`; k-NN's
  reference set is the crops of the scenes *train* split.

Zero-shot: each class name through the prompt templates (averaged, as zero-shot segmentation);
top-1 accuracy for CLS1 and CLS2. k-NN: DINO's weighted vote (`eval_metrics.knn_accuracy`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tipslab.errors import TipslabError

CROP_MARGIN = 0.12


def scene_crops(split: str, num_images: int, image_size: int, seed: int) -> tuple[list[torch.Tensor], list[int]]:
    """Object crops of a scenes split resized to image_size, and their class ids."""
    from tipslab.datamodules.scenes import ScenesDataset, scene_class_names

    column = {name: i for i, name in enumerate(scene_class_names())}
    data = ScenesDataset(split, num_images=num_images, image_size=image_size, seed=seed)
    crops, labels = [], []
    for i in range(len(data)):
        scene = data.scene(i)
        image = scene.to_tensor()
        side = image.shape[-1]
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            pad = max(int(CROP_MARGIN * max(x1 - x0, y1 - y0)), 1)
            x0, y0, x1, y1 = max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, side), min(y1 + pad, side)
            crop = image[:, y0:y1, x0:x1][None]
            crops.append(F.interpolate(crop, size=(image_size, image_size), mode="bicubic",
                                       align_corners=False)[0].clamp(0, 1))
            labels.append(column[obj.class_name])
    return crops, labels


def class_folder(root: str | Path, class_file: str | Path | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, labels, class names) of `<root>/<class>/<images>`."""
    from tipslab.datamodules.image_folder import list_images
    from tipslab.datamodules.seg_folder import read_class_names

    root = Path(root).expanduser()
    if not root.is_dir():
        raise TipslabError(f"class folder {root}: does not exist (expected <root>/<class name>/<images>)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise TipslabError(f"class folder {root}: no class sub-folders (expected <root>/<class name>/<images>)")
    names_file = Path(class_file) if class_file else root / "classes.txt"
    if names_file.is_file():
        names = read_class_names(names_file)
        if len(names) != len(folders):
            raise TipslabError(f"class-name file {names_file}: {len(names)} names for {len(folders)} class folders")
    else:
        names = [f.name.replace("_", " ") for f in folders]
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for p in list_images(folder, recursive=False):
            paths.append(p)
            labels.append(label)
    return paths, labels, names


@torch.no_grad()
def zero_shot_classification(loaded, images, labels: list[int], class_names: list[str], templates) -> dict:
    """Top-1 accuracy (percent) of CLS1 and CLS2 against the class-name embeddings, and chance."""
    from tipslab.platform.eval_retrieval import image_features
    from tipslab.platform.zeroshot_seg import class_text_embeddings

    encoder = loaded.encoder
    was_training = encoder.training
    encoder.eval()
    feats = image_features(encoder, images)
    text = class_text_embeddings(encoder, loaded.tokenizer, class_names, templates).cpu()
    encoder.train(was_training)
    target = torch.tensor(labels)
    out = {name: 100.0 * float(((feats[name] @ text.T).argmax(1) == target).float().mean()) for name in ("cls1", "cls2")}
    # Chance: a classifier that always answers the test set's most frequent class (>= 1/C).
    out["chance"] = 100.0 * float(torch.bincount(target).max()) / len(target)
    return out


@torch.no_grad()
def knn_classification(loaded, train_images, train_labels, test_images, test_labels, num_classes: int,
                       k: int = 20) -> dict:
    from tipslab.platform.eval_metrics import knn_accuracy
    from tipslab.platform.eval_retrieval import image_features

    encoder = loaded.encoder
    was_training = encoder.training
    encoder.eval()
    train = image_features(encoder, train_images)
    test = image_features(encoder, test_images)
    encoder.train(was_training)
    ytr, yte = torch.tensor(train_labels), torch.tensor(test_labels)
    out = {name: knn_accuracy(train[name], ytr, test[name], yte, num_classes, k=k) for name in ("cls1", "cls2")}
    out["chance"] = 100.0 * float(torch.bincount(yte).max()) / len(yte)
    return out
