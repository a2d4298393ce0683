"""TransformedPredictor: one decoded batch -> every model's logits under every transform.

An image is decoded once; per input resolution (``Resolution``: the models' resize and
crop sizes, which differ between EfficientNet-Lite0/1/2) it is resized and centre-cropped
once on the host, as uint8 (``crop_for``). Everything else happens in one jitted call
per batch, on the accelerator: for each resolution, ``lax.map`` over the transforms
applies one transform to the crops (``lax.switch``: only that branch runs), normalises
them per model and runs each model of that resolution. Each model is traced once
whatever the number of transforms, so compile time does not grow with T, and memory
holds one transformed batch at a time.

Like ``models.predictor.JitPredictor``, the call has a fixed batch (the last one is
padded with zeros) and the variables are put on the device once. Randomness is per
transform (its seed) and per image (``transforms.image_ids`` of the file names), so the
result does not depend on the batching.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from models import preprocessing
from models.predictor import _DTYPES, default_dtype
from models.registry import ModelSpec
from models.transforms import Transform

log = logging.getLogger(__name__)


class Resolution(NamedTuple):
    """A model's host-side preprocessing: shorter side resized to ``resize``, centre ``crop``."""

    resize: int
    crop: int


def resolution_of(spec: ModelSpec) -> Resolution:
    return Resolution(spec.resize_size, spec.crop_size)


def crop_for(image: Image.Image, resolution: Resolution) -> np.ndarray:
    """A decoded PIL image -> uint8 (crop, crop, 3) RGB: the model's preprocessing before
    normalisation (``models.preprocessing``), which the transforms see."""
    cropped = preprocessing.resize_and_center_crop(preprocessing.to_rgb(image), resolution.resize,
                                                   resolution.crop)
    return np.asarray(cropped, dtype=np.uint8)


def crops_for(image: Image.Image, resolutions: Sequence[Resolution]) -> dict[Resolution, np.ndarray]:
    return {resolution: crop_for(image, resolution) for resolution in resolutions}


class TransformedPredictor:
    """Runs every model in ``specs`` under every transform in ``transforms``.

    ``predict(crops, image_ids)`` takes ``{Resolution: uint8 (n, crop, crop, 3)}`` (every
    resolution of ``self.resolutions``) and ``image_ids`` (n,) uint32, and returns logits
    float32 (M, T, n, C), in the order of ``specs`` and ``transforms``.
    """

    def __init__(self, specs: Sequence[ModelSpec], transforms: Sequence[Transform], batch_size: int = 32,
                 dtype: str = "float32", device: jax.Device | None = None):
        if not specs or not transforms:
            raise ValueError("TransformedPredictor needs at least one model and one transform")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len({s.num_classes for s in specs}) != 1:
            raise ValueError(f"the models disagree on the number of classes: "
                             f"{ {s.name: s.num_classes for s in specs} }")
        dtype = default_dtype() if dtype == "auto" else dtype
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        self.specs = tuple(specs)
        self.transforms = tuple(transforms)
        self.batch_size = batch_size
        self.dtype = dtype
        self.num_classes = specs[0].num_classes
        self.device = device or jax.devices()[0]
        self.resolutions = tuple(dict.fromkeys(resolution_of(s) for s in self.specs))
        self.trace_count = 0
        compute_dtype = _DTYPES[dtype]
        modules, variables = [], []
        for spec in self.specs:
            module, spec_variables = spec.load()
            modules.append(module)
            variables.append(jax.tree_util.tree_map(lambda v: np.asarray(v, dtype=compute_dtype),
                                                    spec_variables))
        self._modules = tuple(modules)
        self._variables = jax.device_put(tuple(variables), self.device)
        self._forward = jax.jit(self._forward_impl)

    def describe(self) -> dict[str, Any]:
        """What the outputs depend on, JSON-able: the models, the transforms with their seeds."""
        return {"models": [s.name for s in self.specs], "dtype": self.dtype,
                "transforms": [t.describe() for t in self.transforms]}

    def _forward_impl(self, variables: tuple[Any, ...], crops: tuple[jax.Array, ...],
                      image_ids: jax.Array) -> jax.Array:
        self.trace_count += 1  # a Python side effect: runs only while tracing
        compute_dtype = _DTYPES[self.dtype]
        per_model: dict[int, jax.Array] = {}
        for resolution, images in zip(self.resolutions, crops):
            members = [i for i, s in enumerate(self.specs) if resolution_of(s) == resolution]
            images = images.astype(jnp.float32)
            branches = [lambda x, t=t: t.apply_batch(x, image_ids) for t in self.transforms]

            def one_transform(index: jax.Array, images=images, members=members, branches=branches
                              ) -> jax.Array:
                transformed = jax.lax.switch(index, branches, images)
                outputs = []
                for i in members:
                    spec = self.specs[i]
                    normalised = ((transformed - jnp.asarray(spec.mean, jnp.float32))
                                  / jnp.asarray(spec.std, jnp.float32))
                    logits = self._modules[i].apply(variables[i], normalised.astype(compute_dtype))
                    outputs.append(logits.astype(jnp.float32))
                return jnp.stack(outputs)  # (members, n, C)

            logits = jax.lax.map(one_transform, jnp.arange(len(self.transforms)))  # (T, members, n, C)
            for position, i in enumerate(members):
                per_model[i] = logits[:, position]
        return jnp.stack([per_model[i] for i in range(len(self.specs))])  # (M, T, n, C)

    def _check(self, crops: Mapping[Resolution, np.ndarray], image_ids: np.ndarray) -> int:
        n = len(image_ids)
        for resolution in self.resolutions:
            if resolution not in crops:
                raise ValueError(f"no crops for resolution {resolution} (models "
                                 f"{[s.name for s in self.specs if resolution_of(s) == resolution]})")
            shape = crops[resolution].shape
            if shape != (n, resolution.crop, resolution.crop, 3):
                raise ValueError(f"crops for {resolution}: expected shape ({n}, {resolution.crop}, "
                                 f"{resolution.crop}, 3), got {shape}")
        return n

    def predict(self, crops: Mapping[Resolution, np.ndarray], image_ids: np.ndarray) -> np.ndarray:
        """Logits float32 (M, T, n, C) for n images given as crops per resolution."""
        image_ids = np.asarray(image_ids, dtype=np.uint32)
        n = self._check(crops, image_ids)
        pending = []
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            pad = self.batch_size - (stop - start)
            batch = tuple(np.pad(crops[r][start:stop], ((0, pad), (0, 0), (0, 0), (0, 0)))
                          for r in self.resolutions)
            ids = np.pad(image_ids[start:stop], (0, pad))
            # Dispatch is asynchronous: the next batch is copied while this one computes.
            pending.append((stop - start, self._forward(self._variables, jax.device_put(batch, self.device),
                                                        jax.device_put(ids, self.device))))
        logits = np.zeros((len(self.specs), len(self.transforms), n, self.num_classes), np.float32)
        start = 0
        for count, batch_logits in pending:
            logits[:, :, start:start + count] = np.asarray(batch_logits)[:, :, :count]
            start += count
        return logits
