"""Image preprocessing shared by the models: decode-side fixes, resize, centre crop, normalise.

The ops follow the usual ImageNet evaluation recipe (big_vision's
``resize_small(256)|central_crop(224)``): bilinear resize of the shorter side, then
a centre crop, then ``(x - mean) / std`` per RGB channel on 0..255 values.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

# Transparent pixels become white, the usual background of product photos and icons.
_ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of any PIL image: grayscale, palette, CMYK, 16-bit, with or without alpha."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L conversion clips at 255 instead of scaling.
        pixels = np.asarray(image, dtype=np.uint16) >> 8
        return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so that the shorter side is ``size`` pixels, keeping the aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central ``size`` x ``size`` square (the image must be at least that large)."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {width}x{height} image")
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(pixels - mean) / std`` per channel, as float32."""
    mean_arr = np.asarray(mean, dtype=np.float32)
    std_arr = np.asarray(std, dtype=np.float32)
    return (pixels.astype(np.float32) - mean_arr) / std_arr


# Above this many pixels after the resize (a thin banner: 20000 x 1 becomes 5,120,000 x
# 256), only the centre-crop region is resampled, straight from the original.
_MAX_RESIZED_PIXELS = 16 * 1024 * 1024


def resize_and_center_crop(image: Image.Image, resize_size: int, crop_size: int) -> Image.Image:
    """``center_crop(resize_shorter_side(image, resize_size), crop_size)`` in bounded memory."""
    width, height = image.size
    scale = resize_size / min(width, height)
    new_width, new_height = max(resize_size, round(width * scale)), max(resize_size, round(height * scale))
    if new_width * new_height <= _MAX_RESIZED_PIXELS:
        return center_crop(resize_shorter_side(image, resize_size), crop_size)
    left = int(round((new_width - crop_size) / 2.0))
    top = int(round((new_height - crop_size) / 2.0))
    sx, sy = width / new_width, height / new_height
    box = (left * sx, top * sy, (left + crop_size) * sx, (top + crop_size) * sy)
    return image.resize((crop_size, crop_size), Image.Resampling.BILINEAR, box=box)


def preprocess(image: Image.Image, resize_size: int, crop_size: int,
               mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A PIL image as a float32 (crop_size, crop_size, 3) RGB array, normalised."""
    image = resize_and_center_crop(to_rgb(image), resize_size, crop_size)
    return normalize(np.asarray(image, dtype=np.uint8), mean, std)
