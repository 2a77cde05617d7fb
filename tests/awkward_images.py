"""Awkward image files for tests: each as bytes, with the 8-bit RGB image a correct reader returns.

Shared by the image-reader tests and the bad-sample fuzz test of shards.
"""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def base_pixels(height=20, width=30, seed=0) -> np.ndarray:
    """A smooth uint8 [H, W, 3] picture (smooth: JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    out = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1),
                    np.full_like(xs, int(rng.integers(0, 256)))], -1)
    return out.astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def png16_grey() -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale PNG (PIL's convert("RGB") makes it white) and its 8-bit RGB image."""
    grey16 = (np.arange(20 * 30, dtype=np.uint32).reshape(20, 30) * 109).astype(np.uint16)
    data = encode(Image.fromarray(grey16), "PNG")
    grey8 = np.clip(np.rint(grey16 / 257.0), 0, 255).astype(np.uint8)
    return data, np.repeat(grey8[..., None], 3, -1)


def exif_rotated_png() -> tuple[bytes, np.ndarray]:
    """A PNG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    upright = base_pixels(20, 30)
    stored = np.rot90(upright, k=1)  # 90 counter-clockwise: what a camera held sideways stores
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(np.ascontiguousarray(stored)), "PNG", exif=exif), upright


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    upright = base_pixels(24, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.ascontiguousarray(np.rot90(upright, k=1))
    return encode(Image.fromarray(stored), "JPEG", quality=98, exif=exif), upright


def palette_png() -> tuple[bytes, np.ndarray]:
    rgb = Image.fromarray(base_pixels()).quantize(16)
    return encode(rgb, "PNG"), np.asarray(rgb.convert("RGB"))


def rgba_png() -> tuple[bytes, np.ndarray]:
    """Half the picture transparent: a correct reader shows white there (alpha over white)."""
    pixels = base_pixels()
    alpha = np.full(pixels.shape[:2], 255, np.uint8)
    alpha[:, :15] = 0
    data = encode(Image.fromarray(np.dstack([pixels, alpha]), "RGBA"), "PNG")
    expected = pixels.copy()
    expected[:, :15] = 255
    return data, expected


def la_png() -> tuple[bytes, np.ndarray]:
    grey = base_pixels()[..., 0]
    alpha = np.full(grey.shape, 255, np.uint8)
    alpha[:5] = 0
    data = encode(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG")
    expected = np.repeat(grey[..., None], 3, -1).copy()
    expected[:5] = 255
    return data, expected


def cmyk_jpeg() -> tuple[bytes, Image.Image]:
    """A CMYK JPEG and the RGB image PIL's own CMYK conversion gives (JPEG: compare loosely)."""
    cmyk = Image.fromarray(base_pixels()).convert("CMYK")
    return encode(cmyk, "JPEG", quality=98), np.asarray(cmyk.convert("RGB"))


def truncated_jpeg() -> bytes:
    whole = encode(Image.fromarray(base_pixels(64, 64)), "JPEG", quality=90)
    return whole[: len(whole) // 2]


def bomb_png(side=20_000) -> bytes:
    """A tiny PNG whose header claims ``side x side`` pixels (PIL refuses it from the header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
