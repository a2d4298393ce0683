"""JitPredictor: preprocessed images -> (logits, penultimate features), one compiled function per model.

The forward pass is ``jax.jit``-compiled once for a fixed ``(batch_size, crop, crop, 3)``
input and dtype; every call is cut into batches of that size and the last one padded
with zeros, so a run over 50,000 images compiles exactly once whatever the count.
The variables are put on the device once, at construction.

Probabilities are not computed here: every consumer derives them from the logits
(``auditing.predictions.softmax``), once, the way every reader of a stored file does.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.registry import ModelSpec

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
log = logging.getLogger(__name__)


class PredictorOutput(NamedTuple):
    """What a predictor gives for n images; ``features`` is None for a predictor without them."""

    logits: np.ndarray  # (n, num_classes) float32
    features: np.ndarray | None  # (n, num_features) float32: global-pooled, before the classifier


def default_dtype() -> str:
    """bfloat16 where the default backend has fast bfloat16 (GPU, TPU), float32 on CPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


class JitPredictor:
    """Runs ``spec``'s model over preprocessed images.

    ``dtype="bfloat16"`` casts the variables and activations (logits and features still
    come back float32); ``"auto"`` picks it on GPU/TPU and float32 on CPU.
    """

    def __init__(self, spec: ModelSpec, batch_size: int = 32, dtype: str = "float32",
                 device: jax.Device | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dtype = default_dtype() if dtype == "auto" else dtype
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        self.spec = spec
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device or jax.devices()[0]
        if dtype == "bfloat16" and self.device.platform == "cpu":
            log.warning("bfloat16 on CPU is emulated and slower than float32")
        self.trace_count = 0  # how many times the forward pass was traced (= compiled)
        module, variables = spec.load()
        compute_dtype = _DTYPES[dtype]
        variables = jax.tree_util.tree_map(lambda v: np.asarray(v, dtype=compute_dtype), variables)
        self._variables = jax.device_put(variables, self.device)
        self._module = module
        self._forward = jax.jit(self._forward_impl)

    def _forward_impl(self, variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        self.trace_count += 1  # a Python side effect: runs only while tracing
        logits, features = self._module.apply(variables, images.astype(_DTYPES[self.dtype]),
                                              return_features=True)
        return logits.astype(jnp.float32), features.astype(jnp.float32)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return self.spec.input_shape(self.batch_size)

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"{self.spec.name}: expected images of shape (n, {self.spec.crop_size}, "
                             f"{self.spec.crop_size}, 3), got {images.shape}")
        return images.astype(np.float32, copy=False)

    def predict(self, images: np.ndarray) -> PredictorOutput:
        """``images`` float32 (n, crop, crop, 3), preprocessed -> logits (n, classes) and
        features (n, num_features), both float32."""
        images = self._check(images)
        n = len(images)
        pending = []
        for start in range(0, n, self.batch_size):
            chunk = images[start:start + self.batch_size]
            if len(chunk) < self.batch_size:
                pad = np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:], np.float32)
                chunk = np.concatenate([chunk, pad])
            # Dispatch is asynchronous: the next batch is copied while this one computes.
            pending.append(self._forward(self._variables, jax.device_put(chunk, self.device)))
        logits = np.zeros((n, self.spec.num_classes), np.float32)
        features = np.zeros((n, self.spec.num_features), np.float32)
        for i, (batch_logits, batch_features) in enumerate(pending):
            start = i * self.batch_size
            stop = min(start + self.batch_size, n)
            logits[start:stop] = np.asarray(batch_logits)[:stop - start]
            features[start:stop] = np.asarray(batch_features)[:stop - start]
        return PredictorOutput(logits, features)
