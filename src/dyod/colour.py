"""Colour management: the pixels of an image in sRGB, whatever profile it is tagged with, and deep grayscale in 8 bits."""

from __future__ import annotations

import functools
import io
import logging
import os

import numpy as np
from PIL import Image

from .errors import first_line

logger = logging.getLogger(__name__)


def to_srgb(im: Image.Image, path: str | os.PathLike) -> Image.Image:
    """The pixels in sRGB, the colours the model was trained on and what viewers assume of an untagged image. A photo
    tagged with another colour profile (Display P3 from phones, Adobe RGB from cameras, a print profile on a CMYK
    file, a gray gamma on a scan) means other colours by the same numbers: read as they are, they came out washed out
    or shifted. Converted with the embedded profile (LittleCMS through Pillow, its default perceptual intent); an image
    tagged sRGB and an untagged one are left as they are. A profile that cannot be used is warned of and ignored."""
    icc = im.info.get("icc_profile")
    if not icc:
        return im
    from PIL import ImageCms

    original, alpha = im, None
    if im.mode in ("P", "PA"):  # a palette's colours are numbers in the profile's space as well
        im = im.convert("RGBA")
    elif im.mode == "LA":  # LittleCMS converts gray without alpha: the alpha is set back after
        im, alpha = im.getchannel("L"), im.getchannel("A")
    if im.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return original
    try:
        transform = srgb_transform(icc, im.mode)
        if transform is None:
            return original
        converted = ImageCms.applyTransform(im, transform)
    except Exception as e:  # noqa: BLE001 - a profile that cannot be used never costs the image
        logger.warning("%s: its colour profile cannot be used (%s); its pixels are read as sRGB", path,
                       first_line(e) or type(e).__name__)
        return original
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


@functools.lru_cache(maxsize=8)  # a dataset's photos mostly share one or two profiles
def srgb_transform(icc: bytes, mode: str):
    """The LittleCMS transform from the profile ``icc`` to sRGB, or None when the profile is sRGB already."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if "srgb" in (ImageCms.getProfileDescription(profile) or "").lower():
        return None
    out_mode = "RGBA" if mode == "RGBA" else "RGB"
    return ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), mode, out_mode)


def deep_gray_to_8_bits(arr: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit and float grayscale to 8 bits by the format's own range, as PNG viewers show them, not by each
    image's own minimum and maximum (which would stretch every image of a dataset to full contrast, and made a
    uniform one black): 16-bit data / 65535 (PIL opens 16-bit PNGs as I;16 or as 32-bit I), floats in [0, 1] × 1.
    Values outside those ranges (true 32-bit or unscaled float data) have no standard range: each image's own."""
    lo, hi = float(arr.min()), float(arr.max())
    if mode.startswith("I") and 0 <= lo and hi <= 65535:
        unit = arr / 65535.0
    elif mode == "F" and 0 <= lo and hi <= 1:
        unit = arr
    else:
        unit = (arr - lo) / (hi - lo) if hi > lo else np.full_like(arr, 0.5)
    return (unit * 255.0).round().astype(np.uint8)
