"""The built-in scenes dataset: seeded synthetic images with captions at three granularities.

Each image holds 1-4 coloured shapes (circle, square, ...) of a size, a texture and a position
over a dark, noisy gradient. It comes with

- captions: ``alt`` (terse, alt-text-like: the class names), ``short`` (one sentence naming
  every object) and ``long`` (every object with size, texture, colour and position, plus
  spatial relations), the three granularities TIPSv2 trains on;
- ground truth per object: class name (colour + shape, e.g. "red circle"; the vocabulary is
  `scene_class_names()`), visible binary mask and box;
- a depth map in metres (`Scene.depth`): the background is a receding wall (far at the top,
  nearer at the bottom) and each object is a flat card in front of it, nearer the later it was
  drawn, so depth agrees with occlusion; `segmentation_labels` gives the index mask.

Everything follows from ``(seed, index)``: nothing is stored and nothing is downloaded, so the
tiny experiment, the tests and zero-shot segmentation all run offline on the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from tipslab.datamodules.scene_captions import SceneCropCaptions, position_name, scene_captions
from tipslab.errors import TipslabError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond")
# Saturated or bright colours: the background is kept dark and desaturated (below), so an
# object's pixels are never mistaken for background and masks are "where the colour is".
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 200, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
SPLITS: tuple[str, ...] = ("train", "val")

# Radius of an object's circumscribed circle, as a fraction of the image side.
_RADIUS = {"small": (0.085, 0.115), "large": (0.16, 0.21)}
# Pattern pixels of striped/dotted objects are the colour darkened by this factor: still the
# object's hue, and still far from the background.
TEXTURE_SHADE = 0.55
_BACKGROUND_MAX = 95  # every background channel stays at or below this (before noise, ~+3 sigma)


def scene_class_names() -> list[str]:
    """Every class an object can have, "colour shape", in a fixed order (colour-major)."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


@dataclass
class SceneObject:
    class_name: str  # "red circle": the segmentation / classification label
    shape: str
    colour: str
    size: str  # small | large
    texture: str  # solid | striped | dotted
    mask: np.ndarray  # bool [H, W]: the visible pixels (later objects occlude earlier ones)
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the visible mask, x1/y1 exclusive
    position: str  # "top left", "center", ... (3x3 grid cell of the mask's centroid)


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    objects: list[SceneObject]
    captions: dict[str, str]  # {"alt", "short", "long"}
    id: str
    class_names: list[str] = field(default_factory=list)  # of the objects, in drawing order
    depth: np.ndarray | None = None  # float32 [H, W] metres (see `scene_depth`)

    def to_tensor(self) -> torch.Tensor:
        """The image as float [3, H, W] in [0, 1] (the contract's pixel format, no mean/std)."""
        return torch.from_numpy(self.image).permute(2, 0, 1).float().div_(255.0)


# -- geometry ---------------------------------------------------------------------------------


def _shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """Bool [size, size] of one shape drawn with PIL (polygons rotated by ``angle`` radians)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)

    def polygon(points: list[tuple[float, float]]) -> None:
        cos, sin = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points], fill=1)

    r = radius
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "ring":
        inner = 0.55 * r
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "square":
        h = r / math.sqrt(2)
        polygon([(-h, -h), (h, -h), (h, h), (-h, h)])
    elif shape == "diamond":
        polygon([(0, -r), (0.7 * r, 0), (0, r), (-0.7 * r, 0)])
    elif shape == "triangle":
        polygon([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))])
    elif shape == "star":
        points = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            points.append((rr * math.cos(a), rr * math.sin(a)))
        polygon(points)
    elif shape == "cross":
        w = 0.33 * r
        polygon([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
                 (-w, -w)])
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    return np.asarray(canvas, dtype=bool)


def _texture_pattern(texture: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Bool [size, size]: the pixels an object's texture darkens (all False for solid)."""
    if texture == "solid":
        return np.zeros((size, size), dtype=bool)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(4.0, size / rng.uniform(14.0, 20.0))
    if texture == "striped":
        angle = rng.uniform(0, math.pi)
        proj = xs * math.cos(angle) + ys * math.sin(angle)
        return (np.floor(proj / (period / 2)) % 2).astype(bool)
    # dotted: a grid of round dots
    dx = (xs % period) - period / 2
    dy = (ys % period) - period / 2
    return dx * dx + dy * dy <= (period * 0.28) ** 2


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float [size, size, 3]: a dark gradient between two desaturated colours, plus noise."""
    start = rng.uniform(10, _BACKGROUND_MAX - 20, size=3)
    end = rng.uniform(10, _BACKGROUND_MAX - 20, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = start[None, None, :] * (1 - t[..., None]) + end[None, None, :] * t[..., None]
    image += rng.normal(0.0, 5.0, size=image.shape)
    return np.clip(image, 0, _BACKGROUND_MAX)


# -- one scene --------------------------------------------------------------------------------


def generate_scene(seed: int, index: int, image_size: int = 112, id: str | None = None) -> Scene:
    """Scene number ``index`` of the stream ``seed``: the same arguments give the same scene."""
    if image_size < 32:
        raise TipslabError(f"scenes: image_size={image_size} is too small; expected at least 32 pixels")
    if index < 0 or seed < 0:
        raise TipslabError(f"scenes: seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng([int(seed), int(index)])
    size = int(image_size)
    image = _background(rng, size)
    count = int(rng.integers(1, 5))
    # Distinct classes within a scene, so every caption phrase names exactly one object.
    picks = rng.choice(len(COLOURS) * len(SHAPES), size=count, replace=False)
    colour_names = list(COLOURS)

    full_masks: list[np.ndarray] = []
    specs: list[dict] = []
    occupied = np.zeros((size, size), dtype=bool)
    for pick in picks:
        colour, shape = colour_names[int(pick) // len(SHAPES)], SHAPES[int(pick) % len(SHAPES)]
        obj_size = SIZES[int(rng.integers(len(SIZES)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        radius = rng.uniform(*_RADIUS[obj_size]) * size
        # Rejection-sample a centre with little overlap, so every object stays clearly visible.
        best = None
        for _ in range(30):
            cx, cy = rng.uniform(radius, size - radius, size=2)
            mask = _shape_mask(shape, cx, cy, radius, rng.uniform(0, 2 * math.pi), size)
            overlap = (mask & occupied).sum() / max(mask.sum(), 1)
            if best is None or overlap < best[0]:
                best = (overlap, mask)
            if overlap <= 0.05:
                break
        mask = best[1]
        occupied |= mask
        full_masks.append(mask)
        specs.append(dict(shape=shape, colour=colour, size=obj_size, texture=texture,
                          pattern=_texture_pattern(texture, rng, size)))

    for mask, spec in zip(full_masks, specs):
        rgb = np.asarray(COLOURS[spec["colour"]], dtype=np.float64)
        image[mask] = rgb
        image[mask & spec["pattern"]] = rgb * TEXTURE_SHADE

    objects: list[SceneObject] = []
    centroids: list[tuple[float, float]] = []
    for k, (mask, spec) in enumerate(zip(full_masks, specs)):
        visible = mask.copy()
        for later in full_masks[k + 1:]:
            visible &= ~later
        if not visible.any():  # fully hidden (rare with the rejection above): keep its full mask
            visible = mask
        ys, xs = np.nonzero(visible)
        cx, cy = float(xs.mean()), float(ys.mean())
        centroids.append((cx, cy))
        objects.append(SceneObject(
            class_name=f"{spec['colour']} {spec['shape']}", shape=spec["shape"], colour=spec["colour"],
            size=spec["size"], texture=spec["texture"], mask=visible,
            bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
            position=position_name(cx, cy, size),
        ))

    captions = scene_captions(objects, centroids, rng)
    return Scene(
        image=np.round(image).astype(np.uint8),
        objects=objects,
        captions=captions,
        id=id if id is not None else f"{seed}/{index:06d}",
        class_names=[o.class_name for o in objects],
        depth=scene_depth(full_masks, size),
    )


# -- dense ground truth ----------------------------------------------------------------------

# Background wall from BACKGROUND_DEPTH[0] m (top row) to [1] m (bottom row); object k (0-based
# drawing order) at OBJECT_DEPTHS[k] m. Inside the official depth decoders' range [0.001, 10].
BACKGROUND_DEPTH = (9.0, 6.0)
OBJECT_DEPTHS = (4.5, 3.5, 2.5, 1.5)


def scene_depth(full_masks: list[np.ndarray], size: int) -> np.ndarray:
    """Depth in metres: painted back to front like the image, so a later object covers (and is
    nearer than) an earlier one. Uses no random numbers: the images stay those of before."""
    rows = np.linspace(BACKGROUND_DEPTH[0], BACKGROUND_DEPTH[1], size, dtype=np.float32)
    depth = np.repeat(rows[:, None], size, axis=1)
    for k, mask in enumerate(full_masks):
        depth[mask] = OBJECT_DEPTHS[min(k, len(OBJECT_DEPTHS) - 1)]
    return depth


def depth_normals(depth: np.ndarray, focal: float | None = None) -> np.ndarray:
    """float32 [H, W, 3] unit surface normals of a depth map (x right, y up, z towards the camera).

    A pinhole camera of focal length `focal` pixels (default: the image side, a ~53 degree view)
    sees pixel (u, v) at depth z as the point (u z / f, v z / f, z); the normal is the cross
    product of that surface's image-space tangents, from central differences. Depth steps at
    object edges give sideways normals along a one-pixel rim, as a real sensor's would."""
    h, w = depth.shape
    f = float(focal or max(h, w))
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (u - (w - 1) / 2) / f, (v - (h - 1) / 2) / f
    points = np.stack([u * depth, v * depth, depth], -1)
    du = np.gradient(points, axis=1)
    dv = np.gradient(points, axis=0)
    normals = np.cross(dv, du)  # image y grows downwards: this order points the normal at the camera
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True).clip(1e-8)
    normals[..., 1] *= -1  # report y up, as normal maps are drawn
    normals[..., 2] *= -1  # and z towards the camera
    return normals.astype(np.float32)


def segmentation_labels(scene: Scene, labels: str = "class") -> np.ndarray:
    """uint8 [H, W] index mask: 0 is background, objects are 1 + their index in the vocabulary.

    `labels`: "class" (the 49 "colour shape" classes, `scene_class_names()`), "shape" (7) or
    "colour" (7). `segmentation_classes(labels)` lists the names, background first."""
    vocab = segmentation_classes(labels)
    out = np.zeros(scene.image.shape[:2], dtype=np.uint8)
    for obj in scene.objects:
        name = {"class": obj.class_name, "shape": obj.shape, "colour": obj.colour}[labels]
        out[obj.mask] = vocab.index(name)
    return out


def segmentation_classes(labels: str = "class") -> list[str]:
    """Names of the label ids of `segmentation_labels`, id 0 = "background"."""
    if labels == "class":
        return ["background", *scene_class_names()]
    if labels == "shape":
        return ["background", *SHAPES]
    if labels == "colour":
        return ["background", *COLOURS]
    raise TipslabError(f"scenes: unknown label kind {labels!r}; expected class, shape or colour")


# -- the dataset ------------------------------------------------------------------------------


def split_seed(seed: int, split: str) -> int:
    """The scene stream of a split: train and val use disjoint streams (even / odd) for any seed."""
    if split not in SPLITS:
        raise TipslabError(f"scenes: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return 2 * int(seed) + SPLITS.index(split)


class ScenesDataset(torch.utils.data.Dataset):
    """A map-style dataset of ``num_images`` scenes of one split.

    ``dataset[i]`` is the sample dict every source yields: ``{"image": float [3,H,W] in [0,1],
    "captions": {"alt","short","long"}, "id": "val/000003"}``. ``dataset.scene(i)`` gives the
    full `Scene` with object masks and boxes (for evaluation).
    """

    def __init__(self, split: str = "train", num_images: int = 2048, image_size: int = 112, seed: int = 0):
        if int(num_images) < 1:
            raise TipslabError(f"scenes: num_images={num_images}; expected a positive number of images")
        self.split = split
        self.stream = split_seed(seed, split)
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.class_names = scene_class_names()

    def __len__(self) -> int:
        return self.num_images

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.num_images:
            raise IndexError(f"scenes {self.split}: index {index} out of range [0, {self.num_images})")
        return generate_scene(self.stream, index, self.image_size, id=f"{self.split}/{index:06d}")

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(int(index))
        return {"image": scene.to_tensor(), "captions": scene.captions, "id": scene.id,
                "crop_captions": SceneCropCaptions(scene.objects)}
