"""The one image reader: every path that opens an image file or image bytes goes through `read_image`.

What it does that ``Image.open(...).convert("RGB")`` does not:

- applies the EXIF orientation (a phone photo stored sideways comes out upright);
- converts 16-bit and float greyscale by scaling, not clipping (PIL's ``convert("RGB")`` turns a
  16-bit PNG white), and palette / RGBA / LA images by compositing their alpha over white
  (dropping alpha shows whatever colour transparent pixels happen to hold); CMYK through PIL;
- refuses images with more than ``max_pixels`` pixels from the header alone (a decompression
  bomb) instead of letting PIL's warning or exception escape;
- decodes fully inside the reader, so a truncated file fails here, with a *kind*.

An image that cannot be read raises `UnreadableImage` (a `CorruptSample`) whose ``kind`` is one
of `UNREADABLE_KINDS`; callers skip it and count it by kind (`sample_quality.SkipCounter`). ``conversions``
lists what was converted, for the same counters.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tipslab.datamodules.encoded_jpeg import EncodedJpeg, plain_jpeg
from tipslab.datamodules.sample import CorruptSample

# The one list of image file extensions (embed, image folders, shards, `tipslab shards`).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# PIL's own bomb limit (89.5 Mpx, about 9459 x 9459): larger headers are refused before decoding.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

UNREADABLE_KINDS = ("missing_file", "empty_file", "not_image", "truncated", "too_large", "corrupt")
CONVERSION_KINDS = ("exif_rotated", "high_bit_depth", "palette", "alpha", "cmyk", "greyscale")


class UnreadableImage(CorruptSample):
    """An image that cannot be read; ``kind`` says why (one of `UNREADABLE_KINDS`)."""

    def __init__(self, where: str, kind: str, detail: str):
        super().__init__(f"{where}: cannot read image: {kind.replace('_', ' ')} ({detail})")
        self.kind = kind


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a file name has one of `IMAGE_EXTENSIONS` (any case) and is not hidden (``._x.jpg``)."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _open(data: bytes | None, path: Path | None, where: str, max_pixels: int) -> Image.Image:
    if path is not None and not path.is_file():
        raise UnreadableImage(where, "missing_file", "no such file")
    if (len(data) if data is not None else path.stat().st_size) == 0:
        raise UnreadableImage(where, "empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns between its limit and twice it, raises above: both are "too large" here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if data is not None else path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UnreadableImage(where, "too_large", str(err).split(".")[0]) from None
    except UnidentifiedImageError:
        raise UnreadableImage(where, "not_image", "not a format PIL knows") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _bad_data(where, err) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise UnreadableImage(where, "too_large", f"{width}x{height} is over {max_pixels} pixels")
    return image


def _decode(image: Image.Image, where: str) -> Image.Image:
    try:
        image.load()  # the full decode: a truncated file fails here, not later in a transform
    except Image.DecompressionBombError as err:
        raise UnreadableImage(where, "too_large", str(err).split(".")[0]) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _bad_data(where, err) from None
    return image


def _bad_data(where: str, err: Exception) -> UnreadableImage:
    # PIL's ways of saying "bad data" (OSError, SyntaxError, ValueError, EOFError) are not typed
    # by cause; a file cut short says so in its message.
    text = str(err)
    kind = "truncated" if "truncated" in text.lower() or isinstance(err, EOFError) else "corrupt"
    return UnreadableImage(where, kind, f"{type(err).__name__}: {text}")


def to_rgb(image: Image.Image, conversions: list[str] | None = None) -> Image.Image:
    """A decoded PIL image of any mode as 8-bit RGB (see module docstring); appends what it did."""
    done = conversions if conversions is not None else []
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image)
        if mode == "F":
            values = np.clip(values * (255.0 if values.max(initial=0) <= 1.0 else 1.0), 0, 255)
        else:
            # 16-bit data (PNG, TIFF) in 0..65535: scale to 0..255 (round, as 65535 -> 255).
            values = np.clip(np.rint(values.astype(np.float64) / 257.0), 0, 255)
        done.append("high_bit_depth")
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    if mode == "CMYK":
        done.append("cmyk")
        return image.convert("RGB")
    if mode == "P" or mode == "PA":
        done.append("palette")
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        if not has_alpha:
            return image
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        done.append("alpha")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "1"):
        done.append("greyscale")
    return image.convert("RGB")


def read_image(source: str | os.PathLike | bytes, *, name: str | None = None, max_pixels: int = MAX_PIXELS,
               conversions: list[str] | None = None) -> Image.Image:
    """An upright 8-bit RGB PIL image from a file path or the bytes of a file.

    Raises `UnreadableImage` (with ``kind``) for what cannot be read; ``name`` names bytes in
    messages; ``conversions`` (a list) receives the `CONVERSION_KINDS` applied.
    """
    return read_image_reduced(source, None, name=name, max_pixels=max_pixels, conversions=conversions)[0]


def read_image_reduced(source: str | os.PathLike | bytes, scale_for: Callable[[int, int], float] | None, *,
                       name: str | None = None, max_pixels: int = MAX_PIXELS,
                       conversions: list[str] | None = None,
                       keep_jpeg: bool = False) -> tuple[Image.Image | EncodedJpeg, tuple[int, int]]:
    """`read_image`, but a JPEG may decode smaller: ``(image, (width, height) of the full image)``.

    ``scale_for(width, height)`` (the upright full size) says how far the image may shrink, as a
    factor <= 1; JPEG decodes at 1/2, 1/4 or 1/8 through DCT scaling (PIL ``draft``) when that
    still leaves at least that factor, several times faster than the full decode. Other formats,
    and ``scale_for=None``, decode at full size. The checks and bad-sample kinds are `read_image`'s.
    With ``keep_jpeg``, a plain JPEG that would decode at full size is not decoded: it comes back
    as an `EncodedJpeg`, for the device to decode (`encoded_jpeg.py`).
    """
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else None
    path = None if data is not None else Path(source)
    where = name or (str(path) if path is not None else "image bytes")
    done = conversions if conversions is not None else []
    if keep_jpeg and data is None and path.suffix.lower() in (".jpg", ".jpeg") and path.is_file():
        data = path.read_bytes()  # a file that may travel encoded: its bytes are what travels
    opened = _open(data, path, where, max_pixels)
    stored = opened.size
    factor = 1.0
    if scale_for is not None and opened.format == "JPEG":  # a JPEG's EXIF is in its header: no decode needed
        upright = stored[::-1] if opened.getexif().get(0x0112, 1) in (5, 6, 7, 8) else stored
        factor = min(float(scale_for(*upright)), 1.0)
    # Only a JPEG that DCT scaling would not shrink travels encoded: a larger one decodes smaller
    # here, so what reaches the device stays within 2x of what its views need either way.
    if keep_jpeg and factor > 0.5 and data is not None and plain_jpeg(data, opened):
        opened.close()
        return EncodedJpeg(data, int(stored[0]), int(stored[1]), where), (int(stored[0]), int(stored[1]))
    if factor <= 0.5:  # DCT scaling halves at least; mode None keeps the decoder's colour handling
        opened.draft(None, (math.ceil(stored[0] * factor), math.ceil(stored[1] * factor)))
    try:
        image = _decode(opened, where)
    except UnreadableImage:
        opened.close()  # a failed decode leaves PIL's file handle open
        raise
    orientation = image.getexif().get(0x0112, 1)  # the EXIF Orientation tag
    if orientation in (5, 6, 7, 8):  # the four orientations that swap axes
        stored = stored[::-1]
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
        done.append("exif_rotated")
    return to_rgb(image, done), (int(stored[0]), int(stored[1]))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` as `read_image` returns it (EXIF rotation applied), from the header only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # the four orientations that swap axes
                width, height = height, width
    return int(width), int(height)
