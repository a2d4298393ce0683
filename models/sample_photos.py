"""A few real, public-domain/permissively licensed photos that ship inside installed wheels.

Used to check the models on real images (tests, benchmarks, smoke runs) without
downloading anything: scikit-image's ``skimage/data`` and scikit-learn's
``sklearn/datasets/images``. scikit-image is a test dependency only.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

from PIL import Image

# name -> (package, path inside it). Modes differ on purpose: camera is grayscale, horse RGBA.
PHOTOS: dict[str, tuple[str, str]] = {
    "chelsea": ("skimage", "data/chelsea.png"),  # a tabby cat
    "coffee": ("skimage", "data/coffee.png"),  # a cup of espresso
    "astronaut": ("skimage", "data/astronaut.png"),  # Eileen Collins (no ImageNet class)
    "rocket": ("skimage", "data/rocket.jpg"),  # a rocket on its launch pad
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "camera": ("skimage", "data/camera.png"),  # grayscale: a cameraman with his tripod
    "horse": ("skimage", "data/horse.png"),  # RGBA silhouette
    "china": ("sklearn", "datasets/images/china.jpg"),  # a Chinese temple
    "flower": ("sklearn", "datasets/images/flower.jpg"),  # a daisy-like flower
}


def photo_path(name: str) -> Path:
    try:
        package, relative = PHOTOS[name]
    except KeyError:
        raise KeyError(f"unknown sample photo {name!r}; known: {', '.join(PHOTOS)}") from None
    return Path(str(importlib.resources.files(package) / relative))


def load_photos(names: list[str] | None = None) -> dict[str, Image.Image]:
    """``{name: PIL image}``, fully decoded, in ``PHOTOS`` order (or ``names`` order)."""
    photos = {}
    for name in names or list(PHOTOS):
        with Image.open(photo_path(name)) as image:
            image.load()
            photos[name] = image.copy()
    return photos
