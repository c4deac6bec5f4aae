"""Reading image files: fully, as 8-bit RGB, with errors that name the file (records, evaluation, chat, serving,
the lmms-eval model and video frames all read images here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import PModInputError


def load_image(path: str | Path) -> Image.Image:
    """Read an image fully as RGB (a truncated file fails here, not inside the processor, unless PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is on: importing lmms-eval turns it on); a missing or unreadable file, or one
    over PIL's decompression-bomb limit, is a `PModInputError` naming it. 16-bit and float images are scaled to 8 bits
    (a plain conversion clips them: a 16-bit PNG became a white image)."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return _to_rgb(img)
    except FileNotFoundError as exc:
        raise PModInputError(f"Image not found: {path}") from exc
    except UnidentifiedImageError as exc:
        raise PModInputError(f"Not a readable image file: {path}") from exc
    except Image.DecompressionBombError as exc:
        raise PModInputError(f"Image {path} is larger than PIL's decompression-bomb limit ({exc}); shrink it, or raise "
                             "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from exc
    except OSError as exc:  # e.g. "image file is truncated", raised while decoding
        raise PModInputError(f"Cannot read image {path}: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB: modes of more than 8 bits per sample (I;16*, I, F) are scaled from their range."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        full = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if img.mode == "F" and values.max(initial=0) <= 1.0:
            full = 1.0
        img = Image.fromarray(np.clip(values / full * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")
