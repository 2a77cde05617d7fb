"""JPEGs decoded on the device: a worker checks a JPEG's header and ships its bytes; the device
decodes a batch of them in one call (`decode_jpegs`: nvJPEG on CUDA, libjpeg-turbo on a CPU).

Why: once the views are cut on the device (`device_crops.py`), decoding is most of what a worker
does (docs/SCALE.md, "Data loading"), and a GPU decodes a batch of JPEGs for a fraction of a CPU
core's time. ``data.decode_on_device`` (auto: on a CUDA trainer whose views are cut there) turns
it on.

Only a plain JPEG travels encoded (`plain_jpeg`): baseline, colour (PIL mode RGB), no EXIF
rotation, ending in its end-of-image marker. Anything else (PNG, CMYK, greyscale, progressive,
rotated, cut short) is decoded in the worker as before, by the one image reader, which also
counts the bad ones by kind. On a CPU the decoder is libjpeg-turbo, as PIL's, and the pixels are
PIL's exactly (a test checks it); nvJPEG may differ by a few levels of its IDCT.

The header checks cannot see corrupt entropy-coded data. A picture that still fails on the device
(one fails the whole batched call) is decoded again on its own, and if it fails again it trains
as a black picture of its size, with a warning naming the sample: the batch keeps its size on
every rank, which collectives need.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from PIL import Image

log = logging.getLogger(__name__)

# The end-of-image marker; a file cut short lacks it (the usual truncation), and trailing zero
# padding after it is common in the wild.
_EOI = b"\xff\xd9"


@dataclass(frozen=True)
class EncodedJpeg:
    """The bytes of a plain JPEG (`plain_jpeg`) with its size from the header; decoded on the device."""

    data: bytes
    width: int
    height: int
    name: str = "image bytes"

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``, as a PIL image's."""
        return self.width, self.height


def plain_jpeg(data: bytes, opened: Image.Image) -> bool:
    """Whether the opened (header only) image ``data`` can travel encoded: see the module docstring."""
    if opened.format != "JPEG" or opened.mode != "RGB":
        return False
    if opened.info.get("progressive") or opened.info.get("progression"):
        return False  # nvJPEG's batched decode takes baseline JPEGs; the worker decodes the others
    if opened.getexif().get(0x0112, 1) not in (1, None):
        return False  # the reader applies the EXIF rotation (and counts it)
    return data.rstrip(b"\x00").endswith(_EOI)


def decode_jpegs(images: list[EncodedJpeg], device: torch.device | str) -> list[torch.Tensor]:
    """uint8 ``[3, h, w]`` pictures of ``images`` on ``device``, in one batched call."""
    data = [torch.frombuffer(bytearray(image.data), dtype=torch.uint8) for image in images]
    try:
        pictures = _decode(data, device)
    except RuntimeError:
        pictures = [_decode_one(image, blob, device) for image, blob in zip(images, data)]
    for image, picture in zip(images, pictures):
        if tuple(picture.shape) != (3, image.height, image.width):
            raise RuntimeError(f"{image.name}: decoded to {tuple(picture.shape)}, its header says "
                               f"{image.width}x{image.height}")
    return pictures


def _decode(data, device):
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 deprecates its image decoders for TorchCodec's, which needs FFmpeg's
    # libraries at import; the pinned torchvision keeps them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(image: EncodedJpeg, blob: torch.Tensor, device) -> torch.Tensor:
    try:
        return _decode([blob], device)[0]
    except RuntimeError as err:
        log.warning("data: %s failed to decode on the device (%s); it trains as a black picture", image.name,
                    str(err).splitlines()[-1])
        return torch.zeros(3, image.height, image.width, dtype=torch.uint8, device=device)
