"""The one inference preprocessing: image -> float ``[3, S, S]`` in [0, 1], for every command.

Training's eval view, ``tipslab embed``, ``tipslab index``, the Python API and search's region
crops all call `Preprocessing`, so the same model and image give the same vectors everywhere.
The rule: the whole image (or a box of it) squashed to ``S x S`` (aspect not kept, no crop, so
every pixel can be searched and patch boxes map back by scaling), PIL's bicubic on 8-bit pixels (the
official TIPS demo's resize; torchvision's tensor bicubic differs from it by up to 4 levels), no
mean/std (the TIPS models take raw pixels). `describe()` is what an index manifest records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from tipslab.datamodules.image_io import to_rgb
from tipslab.errors import TipslabError

RESIZE_RULE = "whole image squashed to image_size x image_size, aspect not kept, no crop"
DECODES = ("full", "reduced")


def as_uint8_tensor(image) -> torch.Tensor:
    """uint8 ``[3, H, W]`` of a PIL image (any mode), a uint8 array ``[H, W(, 1|3|4)]`` or a
    float ``[3, H, W]`` tensor in [0, 1] (rounded to 8 bits: the scenes' floats are k/255)."""
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise TipslabError(f"preprocess expects a PIL image or a uint8 array [H, W] / [H, W, 1|3|4]; "
                               f"got {image.dtype} {image.shape}")
        pil = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        return F.pil_to_tensor(to_rgb(pil))
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        if image.dtype == torch.uint8:
            return image
        return image.detach().float().clamp(0, 1).mul(255).round_().to(torch.uint8)
    raise TipslabError(f"preprocess expects a PIL image, a uint8 array or a [3, H, W] tensor; "
                       f"got {type(image).__name__}")


@dataclass(frozen=True)
class Preprocessing:
    """``preprocessing(image) -> float [3, S, S]``; ``preprocessing.region(image, box)`` for a box."""

    image_size: int
    interpolation: str = "bicubic"
    resize: str = RESIZE_RULE
    # "full": every file decoded at full size. "reduced": a JPEG at least twice the input size on both
    # sides decodes at 1/2, 1/4 or 1/8 by DCT scaling first (PIL draft), still >= image_size: several
    # times faster for photos, vectors a little different, so an index records which one it used.
    decode: str = "full"

    def __post_init__(self):
        if int(self.image_size) <= 0:
            raise TipslabError(f"preprocessing image_size={self.image_size}; expected a positive number")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise TipslabError(f"preprocessing interpolation={self.interpolation!r}; expected bicubic or bilinear")
        if self.decode not in DECODES:
            raise TipslabError(f"preprocessing decode={self.decode!r}; expected one of {', '.join(DECODES)}")

    def read(self, source, conversions: list[str] | None = None):
        """``(upright 8-bit RGB PIL image, (width, height) of the full image)`` of a file or its bytes,
        decoded as ``decode`` says; raises `image_io.UnreadableImage` as `read_image` does."""
        from tipslab.datamodules.image_io import read_image_reduced

        size = int(self.image_size)
        # The whole image is squashed to S x S, so each side may shrink until it reaches S.
        scale_for = (lambda width, height: max(size / width, size / height)) if self.decode == "reduced" else None
        return read_image_reduced(source, scale_for, conversions=conversions)

    @property
    def img_size(self) -> int:  # the name the Python API has always used
        return int(self.image_size)

    def __call__(self, image) -> torch.Tensor:
        return self.uint8(image).float().div_(255.0)

    def uint8(self, image) -> torch.Tensor:
        """The same pixels as uint8 ``[3, S, S]`` (0-255): a quarter of the bytes to move between
        processes and to the GPU; ``pixels.float() / 255`` there is `__call__`'s result."""
        size = int(self.image_size)
        resample = Image.Resampling.BICUBIC if self.interpolation == "bicubic" else Image.Resampling.BILINEAR
        if isinstance(image, Image.Image):  # resized as it is: a tensor round trip first cost more than the decode
            rgb = to_rgb(image)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), resample)
            return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        pixels = as_uint8_tensor(image)
        if tuple(pixels.shape[-2:]) != (size, size):
            pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
            pixels = torch.from_numpy(np.array(pil.resize((size, size), resample))).permute(2, 0, 1)
        return pixels

    def region(self, image, box: tuple[float, float, float, float]) -> torch.Tensor:
        """The box ``(x0, y0, x1, y1)`` (pixels of ``image``, x1/y1 exclusive) preprocessed as an image."""
        pixels = as_uint8_tensor(image)
        height, width = pixels.shape[-2:]
        x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
        x1, y1 = min(int(np.ceil(box[2])), width), min(int(np.ceil(box[3])), height)
        if x1 <= x0 or y1 <= y0:
            raise TipslabError(f"region box {tuple(box)} is empty inside a {width}x{height} image")
        return self(pixels[:, y0:y1, x0:x1])

    def describe(self) -> dict:
        """What an index manifest stores to say how its images were preprocessed."""
        return {**asdict(self), "image_size": int(self.image_size), "range": "[0, 1]", "mean_std": None}

    def __repr__(self) -> str:
        return f"Preprocessing(image_size={self.image_size}, resize=PIL {self.interpolation}, range=[0, 1], mean/std=none)"
