"""Image files -> uint8 RGB arrays, with errors that name the file (the project's one image decoder)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def decode_image(path, image_id=None) -> np.ndarray:
    """Decodes an image file to uint8 [H, W, 3] RGB with PIL (no EXIF rotation).

    Grayscale, CMYK and palette files are converted to RGB. EXIF orientation is not
    applied: COCO annotations refer to the stored pixels.

    Raises:
      FileNotFoundError: "image file <path> (image id <id>) does not exist".
      ValueError: "cannot decode image file <path> (image id <id>): <PIL's reason>".
    """
    path = os.fspath(path)
    where = f"image file {path}" + (f" (image id {image_id})" if image_id is not None else "")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot decode {where}: {e}") from None
