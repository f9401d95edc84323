"""Reading images the way a viewer shows them, and saying plainly why one cannot be read.

A bad image is never an error for a run: ``load_image`` raises ``ImageFailure`` with a short reason,
and the caller records it as a failure row.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featcache.storage import Remote, StorageError, location

MIN_SIDE = 2  # 1-pixel images are placeholders (failed downloads, tracking pixels), not photos
BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as most viewers do


class ImageFailure(Exception):
    """An image that could not be read; ``str(e)`` is the reason stored in the cache."""


def load_image(path: str | os.PathLike, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB image: EXIF orientation applied, then the crop ``box``
    (x1, y1, x2, y2 in pixels of the upright image, clipped to it)."""
    path = location(path)
    if isinstance(path, Remote):  # an object: its bytes, in one GET
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageFailure("missing file") from None
        except IsADirectoryError:
            raise ImageFailure("not a regular file") from None
        except PermissionError as e:  # the store refused: every row would fail alike, so the run stops
            raise StorageError(f"{path}: access denied ({e}); check the credentials") from None
        return load_image_bytes(data, box)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageFailure("missing file") from None
    except OSError as e:
        raise ImageFailure(f"cannot read file: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageFailure("not a regular file")
    if st.st_size == 0:
        raise ImageFailure("empty file (0 bytes)")
    return _decode(path, box)


def load_image_bytes(data: bytes, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """``load_image`` for an image held in memory (a WebDataset sample read from its shard)."""
    if not data:
        raise ImageFailure("empty image (0 bytes)")
    return _decode(io.BytesIO(data), box)


def _decode(source, box) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice that; treat both as a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = to_rgb(im)
    except ImageFailure:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageFailure(f"decompression bomb: {_first_line(e)}") from None
    except UnidentifiedImageError:
        raise ImageFailure("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, NotImplementedError) as e:  # a DDS of an unknown pixel format
        raise ImageFailure(f"decode error: {_first_line(e)}") from None
    if box is not None:
        rgb = crop(rgb, box)
    w, h = rgb.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ImageFailure(f"image too small ({w}x{h} px, need at least {MIN_SIDE} px per side)")
    return rgb


def crop(im: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    w, h = im.size
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if x2 <= x1 or y2 <= y1:
        raise ImageFailure(f"crop box {tuple(box)} lies outside the {w}x{h} image")
    return im.crop((x1, y1, x2, y2))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: palette, alpha, CMYK, 16/32-bit integer and float grayscale."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if mode == "F" and a.max(initial=0) <= 1.0:
            hi = 1.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, im).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageFailure(f"unsupported image mode {mode}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
