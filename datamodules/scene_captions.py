"""The captions of a built-in scene, or of a crop of one: what the objects are and where.

``alt`` names the objects, ``short`` lists them in a sentence, ``long`` adds size, texture,
position (the 3x3 cell of the picture) and relations. `captions_in_box` captions a crop: only
the objects it shows, positions in its frame, so a caption never names what the crop cut out;
scenes read back from shards caption their crops the same way (`StoredSceneCaptions`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scenes.py imports this module
    from tipslab.datamodules.scenes import SceneObject


def position_name(cx: float, cy: float, size: int, height: int | None = None) -> str:
    """The 3x3 grid cell of a point in a ``size`` wide (and ``height`` tall, default square)
    picture: "top left", "top", ..., "center", ..., "bottom right"."""
    col = min(int(3 * cx / size), 2)
    row = min(int(3 * cy / (height or size)), 2)
    vertical = ("top", "", "bottom")[row]
    horizontal = ("left", "", "right")[col]
    return " ".join(part for part in (vertical, horizontal) if part) or "center"


def _where(position: str) -> str:
    """A position as a phrase: "in the top left", "at the top", "on the left", "in the center"."""
    if position == "center":
        return "in the center"
    if " " in position:
        return f"in the {position}"
    if position in ("top", "bottom"):
        return f"at the {position}"
    return f"on the {position}"


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _relation(a: SceneObject, b: SceneObject, ca: tuple[float, float], cb: tuple[float, float]) -> str:
    """How ``a`` sits relative to ``b``, along the axis where they differ most."""
    dx, dy = ca[0] - cb[0], ca[1] - cb[1]
    if abs(dx) >= abs(dy):
        where = "left of" if dx < 0 else "right of"
    else:
        where = "above" if dy < 0 else "below"
    return f"the {a.class_name} is {where} the {b.class_name}"


def scene_captions(objects: list[SceneObject], centroids: list[tuple[float, float]], rng: np.random.Generator) -> dict:
    """The ``alt`` / ``short`` / ``long`` captions of ``objects`` (centroids in the picture's frame),
    listed in a seeded order."""
    order = [int(i) for i in rng.permutation(len(objects))]
    names = [objects[i].class_name for i in order]
    # alt: terse like web alt-text, the class names only.
    alt = ", ".join(names)
    # short: one sentence naming every object.
    listed = [_article(n) for n in names]
    joined = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
    short = f"{joined[0].upper()}{joined[1:]}."
    # long: every attribute of every object, then relations between neighbours in the listing.
    # Kept compact (no filler words): short context lengths truncate the tail.
    parts = []
    for i in order:
        obj = objects[i]
        parts.append(f"{_article(f'{obj.size} {obj.texture} {obj.class_name}')} {_where(obj.position)}")
    sentence = "; ".join(parts)
    relations = [_relation(objects[a], objects[b], centroids[a], centroids[b]) for a, b in zip(order, order[1:])]
    long = f"{sentence[0].upper()}{sentence[1:]}."
    if relations:
        long += " " + "; ".join(r[0].upper() + r[1:] if k == 0 else r for k, r in enumerate(relations)) + "."
    return {"alt": alt, "short": short, "long": long}


# Share of an object's visible pixels that must lie inside a crop for the crop's captions to name it.
CROP_VISIBLE_SHARE = 0.5
EMPTY_CAPTIONS = {"alt": "background", "short": "An empty background.", "long": "An empty dark background."}


def captions_in_box(objects: list[SceneObject], box: tuple[int, int, int, int], rng: np.random.Generator) -> dict:
    """Captions of the crop ``box = (top, left, height, width)`` of a scene: only the objects
    with at least `CROP_VISIBLE_SHARE` of their visible pixels inside, positions and relations
    measured in the crop's frame (so a caption never names what the crop does not show)."""
    top, left, height, width = box
    inside, centroids = [], []
    for obj in objects:
        window = obj.mask[top:top + height, left:left + width]
        total = int(obj.mask.sum())
        if total == 0 or window.sum() < CROP_VISIBLE_SHARE * total:
            continue
        ys, xs = np.nonzero(window)
        cx, cy = float(xs.mean()), float(ys.mean())
        inside.append(replace(obj, position=position_name(cx, cy, width, height)))
        centroids.append((cx, cy))
    if not inside:
        return dict(EMPTY_CAPTIONS)
    return scene_captions(inside, centroids, rng)


class SceneCropCaptions:
    """A scene's objects, carried by its sample so the data pipeline can caption each crop
    (`captions_in_box`); picklable, for data-loader workers."""

    def __init__(self, objects: list[SceneObject]):
        self.objects = objects

    def __call__(self, box: tuple[int, int, int, int], rng: np.random.Generator) -> dict:
        return captions_in_box(self.objects, box, rng)


class StoredSceneCaptions:
    """`SceneCropCaptions` of a scene read back from a shard (`shard_writer.write_scene_shards`'s
    ``objects`` records with ``mask_rle``); the masks are decoded on first use, in the worker."""

    def __init__(self, records: list[dict], height: int, width: int):
        self.records, self.height, self.width = records, int(height), int(width)
        self._objects: list[SceneObject] | None = None

    @staticmethod
    def usable(records) -> bool:
        return isinstance(records, list) and bool(records) and all(
            isinstance(r, dict) and {"class_name", "mask_rle", "bbox"} <= set(r) for r in records)

    def objects(self) -> list[SceneObject]:
        if self._objects is None:
            from tipslab.datamodules.scenes import SceneObject
            from tipslab.datamodules.scenes_export import rle_decode

            self._objects = []
            for r in self.records:
                *colour, shape = str(r["class_name"]).split(" ")
                self._objects.append(SceneObject(
                    class_name=r["class_name"], shape=shape, colour=" ".join(colour), size=r.get("size", ""),
                    texture=r.get("texture", ""), mask=rle_decode(r["mask_rle"], self.height, self.width),
                    bbox=tuple(r["bbox"]), position=r.get("position", "")))
        return self._objects

    def __call__(self, box: tuple[int, int, int, int], rng: np.random.Generator) -> dict:
        return captions_in_box(self.objects(), box, rng)
