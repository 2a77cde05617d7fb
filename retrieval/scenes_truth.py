"""Ground truth for hits in the built-in scenes: is a hit's box on an object of the queried class?

Scenes are regenerated from their key (``scenes:val/000003``) and size, so an index of scenes
needs nothing stored to be checked. Collections without ground truth get None.
"""

from __future__ import annotations

import re

from tipslab.retrieval.regions import box_iou

HIT_IOU = 0.5  # as the regions evaluation counts a hit
_KEY = re.compile(r"^scenes:(?P<split>[a-z]+)/(?P<index>\d+)$")


def scene_and_class(image_key: str, image_size: tuple[int, int], query: str, seed: int = 0):
    """(the regenerated Scene, the queried class name) or None when there is no ground truth (not
    a scene, or the query is not a scenes class name such as "red circle")."""
    from tipslab.datamodules.scenes import generate_scene, scene_class_names, split_seed

    match = _KEY.match(str(image_key))
    noun = re.sub(r"^(a|an|the)\s+", "", " ".join(str(query).lower().split()))
    if match is None or noun not in scene_class_names() or image_size[0] != image_size[1]:
        return None
    scene = generate_scene(split_seed(seed, match["split"]), int(match["index"]), int(image_size[0]))
    return scene, noun


def hit_or_miss(hit, seed: int = 0) -> tuple[bool, float] | None:
    """(hit?, best IoU with an object of the query's class) for a search Hit, or None if unknown."""
    found = scene_and_class(hit.image_key, hit.image_size, hit.query, seed)
    if found is None:
        return None
    scene, noun = found
    ious = [box_iou(hit.box, obj.bbox) for obj in scene.objects if obj.class_name == noun]
    best = max(ious, default=0.0)
    return best >= HIT_IOU, best
