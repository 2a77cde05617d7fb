"""Image views for pretraining: DINOv2-style global and local crops, driven by a per-sample generator.

The crop follows torchvision's ``RandomResizedCrop`` (same parameter algorithm, scale
(0.32, 1.0) as DINOv2's global crops) but draws from the ``numpy.random.Generator`` it is given,
not from torch's global RNG: the crop of a sample is then a function of the seed, the epoch and
the sample, whichever worker process makes it.

Horizontal flip is **off** by default: captions here say "on the left", "left of" and flipping
the image would make them false. When it is on, the sample's captions are mirrored too (left and
right swapped), see `mirror_text`.

Output is float ``[3, S, S]`` in ``[0, 1]``: no mean/std normalisation, the TIPS models take raw
pixels. ``S`` must be a multiple of the patch size (14).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from tipslab.datamodules.preprocess import Preprocessing
from tipslab.errors import TipslabError

PATCH_SIZE = 14


def check_image_size(image_size: int, what: str = "data.image_size") -> int:
    size = int(image_size)
    if size <= 0 or size % PATCH_SIZE != 0:
        raise TipslabError(f"{what}={image_size} is not a positive multiple of the patch size {PATCH_SIZE} "
                           f"(e.g. 112, 224)")
    return size


def crop_params(height: int, width: int, rng: np.random.Generator, scale=(0.32, 1.0),
                ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop: torchvision's RandomResizedCrop.get_params, seeded."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback (as torchvision): the largest centred crop within the ratio bounds.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_tensor(image) -> torch.Tensor:
    """PIL / uint8 / float image as a tensor torchvision can crop (uint8 stays uint8 until resized)."""
    if isinstance(image, Image.Image):
        # convert() copies even when the mode is already RGB: skip it then.
        return F.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        return image
    raise TipslabError(f"image of type {type(image).__name__}; expected PIL, uint8 [H,W,3] or float [3,H,W]")


def as_float(image: torch.Tensor) -> torch.Tensor:
    """Pixels as float in [0, 1]: uint8 scaled by 1/255 (a batch at once in `collate`), float clamped."""
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    return image.float().clamp_(0.0, 1.0)  # antialiased resizing can overshoot a little


_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}


def mirror_text(text: str) -> str:
    """A caption of the horizontally flipped image: "left" and "right" swapped."""
    return re.sub(r"\b(left|right|Left|Right)\b", lambda m: _SWAP[m.group(1)], text)


def check_scale(scale, what: str = "crop scale") -> tuple[float, float]:
    """A crop area range ``(min, max)`` with 0 < min <= max <= 1, or a TipslabError naming ``what``."""
    try:
        low, high = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise TipslabError(f"{what}={scale!r}; expected [min, max] with 0 < min <= max <= 1") from None
    if not 0 < low <= high <= 1:
        raise TipslabError(f"{what}={tuple(scale)}; expected 0 < min <= max <= 1")
    return low, high


def smallest_crop_side(height: int, width: int, scale, ratio) -> float:
    """A lower bound on the shorter side of any `crop_params` box of an ``height x width`` image."""
    area_bound = math.sqrt(height * width * scale[0] * min(ratio[0], 1 / ratio[1])) - 1  # -1: rounding
    return max(min(area_bound, height, width), 1.0)  # the fallback crop is at least the short side


def box_in(pixels_hw, box: tuple[int, int, int, int], source_size) -> tuple[int, int, int, int]:
    """``box`` (pixels of the full image, ``source_size = (width, height)``) in the pixels of an
    image of ``pixels_hw = (height, width)``, which may be the image decoded smaller
    (`image_io.read_image_reduced`)."""
    height, width = int(pixels_hw[0]), int(pixels_hw[1])
    if source_size is None or tuple(source_size) == (width, height):
        return box
    fy, fx = height / source_size[1], width / source_size[0]
    top, left = min(int(round(box[0] * fy)), height - 1), min(int(round(box[1] * fx)), width - 1)
    return (top, left, max(min(int(round(box[2] * fy)), height - top), 1),
            max(min(int(round(box[3] * fx)), width - left), 1))


class CropPlan(NamedTuple):
    """One view of a sample before it is cut: a box in the decoded pixels, the output side, a flip."""

    top: int
    left: int
    height: int
    width: int
    size: int
    flipped: bool


class GlobalCrop:
    """``crop(image, rng) -> (float [3, S, S], flipped, box)``: random resized crop, optional flip.

    ``to_float=False`` keeps a uint8 source's crop in uint8 (the loader's path: resizing uint8 is
    faster and `collate` converts the whole batch to float at once, bit-identical to per crop).
    """

    def __init__(self, image_size: int, scale=(0.32, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = False):
        self.image_size = check_image_size(image_size)
        self.scale, self.ratio, self.flip = check_scale(scale), tuple(ratio), bool(flip)

    def __call__(self, image, rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
        view, flipped, _ = self.crop(image, rng)
        return view, flipped

    def crop(self, image, rng: np.random.Generator, scale=None, to_float: bool = True,
             source_size=None) -> tuple[torch.Tensor, bool, tuple[int, int, int, int]]:
        """``(view, flipped, box)``, ``box = (top, left, height, width)`` in source pixels; ``scale``
        overrides the crop's area range for this one draw. ``source_size = (width, height)`` of the
        full image when ``image`` was decoded smaller: the box is drawn on the full image (same
        draws, same captions) and cut from the smaller one."""
        pixels = to_tensor(image)
        plan, box = self.draw(pixels.shape[-2:], rng, scale, source_size)
        return self.render(pixels, plan, to_float), plan.flipped, box

    def draw(self, pixels_hw, rng: np.random.Generator, scale=None,
             source_size=None) -> tuple[CropPlan, tuple[int, int, int, int]]:
        """The random part of `crop` alone: ``(plan, box)``, the plan in the pixels of an image of
        ``pixels_hw = (height, width)`` (the box in the full image's). Same draws in the same order,
        so a sample whose crops are made later, elsewhere (`device_crops.render_views`), gets the
        same boxes, flips and captions."""
        height, width = int(pixels_hw[0]), int(pixels_hw[1])
        full_h, full_w = (source_size[1], source_size[0]) if source_size is not None else (height, width)
        box = crop_params(full_h, full_w, rng, scale or self.scale, self.ratio)
        top, left, h, w = box_in((height, width), box, source_size)
        flipped = self.flip and bool(rng.random() < 0.5)
        return CropPlan(top, left, h, w, self.image_size, flipped), box

    @staticmethod
    def render(pixels: torch.Tensor, plan: CropPlan, to_float: bool = True) -> torch.Tensor:
        """The view a plan describes, cut from ``pixels`` ``[3, H, W]`` on this CPU."""
        # torchvision's resize kernel on the box's view: `resized_crop` without its per-call dispatch
        # (ten crops a sample make that overhead show; same pixels).
        out = F.resize_image(pixels[..., plan.top:plan.top + plan.height, plan.left:plan.left + plan.width],
                             [plan.size, plan.size], antialias=True)
        if plan.flipped:
            out = F.horizontal_flip(out)
        return as_float(out) if to_float else out

    def min_decode_scale(self, height: int, width: int, first_scales=()) -> float:
        """The factor an ``height x width`` image may shrink by before decoding with every crop
        this draws still at least ``image_size`` pixels on each side (no upsampling); ``first_scales``:
        other area ranges a crop may be drawn with (``data.caption_crop_scale``)."""
        return max(self.image_size / smallest_crop_side(height, width, s or self.scale, self.ratio)
                   for s in (None, *first_scales))


class Resize:
    """The evaluation view: the whole image resized to ``S x S`` by the one inference
    preprocessing (`preprocess.Preprocessing`, as embed / index / search use; no randomness)."""

    def __init__(self, image_size: int):
        self.image_size = check_image_size(image_size)
        self.preprocessing = Preprocessing(self.image_size)

    def __call__(self, image, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, bool]:
        return self.preprocessing(image), False


class MultiCropViews:
    """DINOv2's multi-crop: ``count`` global crops and ``local_count`` local crops of one image.

    ``crop(image, rng) -> (first, flipped, box)``: the first global crop (the contrastive view,
    whose captions follow it: mirrored when it is flipped, and describing its ``box`` when the
    source knows its objects), then `rest` for the other global crops and the local crops. The
    first global crop is drawn first, so a one-crop config makes the same first view as
    `GlobalCrop` for the same generator.
    """

    def __init__(self, image_size: int, count: int = 1, scale=(0.32, 1.0), local_count: int = 0,
                 local_size: int = 98, local_scale=(0.05, 0.32), flip: bool = False):
        if int(count) < 1:
            raise TipslabError(f"data.global_crops.count={count}; expected at least 1")
        if int(local_count) < 0:
            raise TipslabError(f"data.local_crops.count={local_count}; expected 0 or more")
        self.first = GlobalCrop(image_size, scale=scale, flip=flip)
        self.count, self.local_count = int(count), int(local_count)
        self.local = (GlobalCrop(check_image_size(local_size, "data.local_crops.size"), scale=local_scale, flip=flip)
                      if self.local_count else None)

    def crop(self, image, rng: np.random.Generator, scale=None, to_float: bool = True, source_size=None):
        return self.first.crop(image, rng, scale, to_float, source_size)

    __call__ = crop

    def rest(self, image, rng: np.random.Generator, to_float: bool = True,
             source_size=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The other global crops and the local crops (drawn after the captions, see streams.py)."""
        pixels = to_tensor(image)
        more, local = self.draw_rest(pixels.shape[-2:], rng, source_size)
        return ([self.first.render(pixels, p, to_float) for p in more],
                [self.local.render(pixels, p, to_float) for p in local])

    def draw_rest(self, pixels_hw, rng: np.random.Generator,
                  source_size=None) -> tuple[list[CropPlan], list[CropPlan]]:
        """`rest`'s draws alone (see `GlobalCrop.draw`): the plans of the other global and the local crops."""
        more = [self.first.draw(pixels_hw, rng, source_size=source_size)[0] for _ in range(self.count - 1)]
        local = [self.local.draw(pixels_hw, rng, source_size=source_size)[0] for _ in range(self.local_count)]
        return more, local

    def min_decode_scale(self, height: int, width: int, first_scales=()) -> float:
        """`GlobalCrop.min_decode_scale` over every crop; ``first_scales``: other area ranges the
        first global crop may be drawn with (``data.caption_crop_scale``)."""
        needs = [self.first.min_decode_scale(height, width, first_scales)]
        if self.local is not None:
            needs.append(self.local.min_decode_scale(height, width))
        return max(needs)
