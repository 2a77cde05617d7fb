"""Class names and colours for segmentation outputs: the ADE20K-150 labels of the official
segmentation decoder (output i is ADE20K class i + 1, "other" having been dropped) and a palette
that keeps neighbouring ids apart."""

from __future__ import annotations

import colorsys

import numpy as np

ADE20K_150: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)


def palette(n: int) -> np.ndarray:
    """uint8 [n, 3]: hues stepped by the golden ratio (ids 0, 1, 2 land far apart on the wheel),
    saturation and brightness varied so that even 150 classes stay distinguishable."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (0.07 + i * 0.618033988749895) % 1.0
        saturation = 0.55 + 0.45 * ((i * 5) % 7) / 6
        value = 0.65 + 0.35 * ((i * 3) % 5) / 4
        colours[i] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)]
    return colours


def class_names(num_classes: int, names_file=None) -> list[str]:
    """Names for a segmentation decoder's outputs: a file (one per line), ADE20K for 150, else ids."""
    from pathlib import Path

    from tipslab.errors import TipslabError

    if names_file:
        names = [line.strip() for line in Path(names_file).read_text().splitlines() if line.strip()]
        if len(names) != num_classes:
            raise TipslabError(f"--classes {names_file}: {len(names)} names for a decoder with {num_classes} classes")
        return names
    if num_classes == len(ADE20K_150):
        return list(ADE20K_150)
    return [f"class {i}" for i in range(num_classes)]
