"""Image transforms for the transform-sensitivity audit, in JAX, on decoded + cropped images.

Every op maps one image, float32 ``(H, W, 3)`` RGB on 0..255 (the model's centre crop,
before normalisation, so that brightness and histogram equalisation act on pixel
values), to an image of the same shape. Flips, 90-degree rotations, rotation and the
affine warps come from ``dm-pix``; brightness as a factor, histogram equalisation and
the perspective warp are jnp code (dm-pix has an additive brightness only and neither
of the other two). Pixels that a warp brings in from outside the image are black.

A ``Transform`` is a named sequence of ops with a seed. An op parameter is a number, or
a ``(low, high)`` range sampled uniformly per image; the perspective warp is random by
nature. The randomness of image ``i`` comes from ``fold_in(PRNGKey(seed), image_id[i])``
with ``image_id`` derived from the file name (``image_ids``), so an image is transformed
the same way in every batch, shard and run.

Config form (``parse_transform``), one entry per transform::

    hflip | vflip | equalize | identity
    {rotate: 90}          # degrees, counter-clockwise; [-30, 30] = a random angle per image
    {brightness: 1.5}     # factor: 1 = unchanged, 0 = black
    {translate: {x: 0.1, y: 0.0}}                 # fraction of the width / height; right / down
    {translate: {x: 16, y: 0, units: pixels}}
    {zoom: 1.25}          # > 1 zooms in (centre enlarged), < 1 zooms out (black border)
    {perspective: 0.3}    # torchvision's distortion_scale: corners move up to 0.3 x half the side
    {compose: [equalize, {zoom: 1.2}, {brightness: 1.3}]}   # applied left to right
  plus optional ``name:`` and ``seed:`` keys in any mapping entry.
"""
from __future__ import annotations

from auditing.errors import InputError
import dataclasses
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Union

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

Param = Union[float, tuple[float, float]]
PIXEL_MAX = 255.0


class TransformConfigError(InputError):
    """A transform entry of the config that cannot be parsed; the message names the entry."""


def _sample(param: Param, key: jax.Array) -> jax.Array | float:
    if isinstance(param, tuple):
        return jax.random.uniform(key, (), jnp.float32, param[0], param[1])
    return param


def _describe_param(param: Param) -> float | list[float]:
    return list(param) if isinstance(param, tuple) else param


def _format_param(param: Param) -> str:
    return f"{param[0]:g}..{param[1]:g}" if isinstance(param, tuple) else f"{param:g}"


def _warp(image: jax.Array, matrix: jax.Array, offset: jax.Array) -> jax.Array:
    """Output pixel o takes input ``matrix @ o + offset`` (row, col, channel), bilinear, black outside."""
    return pix.affine_transform(image, matrix, offset=offset, order=1, mode="constant", cval=0.0)


# ----------------------------------------------------------------------------- ops


@dataclasses.dataclass(frozen=True)
class Identity:
    op = "identity"

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        return image

    def label(self) -> str:
        return "identity"


@dataclasses.dataclass(frozen=True)
class HorizontalFlip:
    op = "hflip"

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        return pix.flip_left_right(image)

    def label(self) -> str:
        return "hflip"


@dataclasses.dataclass(frozen=True)
class VerticalFlip:
    op = "vflip"

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        return pix.flip_up_down(image)

    def label(self) -> str:
        return "vflip"


@dataclasses.dataclass(frozen=True)
class Rotate:
    """Counter-clockwise by ``degrees``; multiples of 90 are exact (no resampling)."""

    degrees: Param
    op = "rotate"

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        if not isinstance(self.degrees, tuple) and float(self.degrees) % 90 == 0:
            # rot90 keeps every pixel; on a non-square image k = 1, 3 would change the shape.
            k = int(self.degrees // 90) % 4
            if k % 2 and image.shape[0] != image.shape[1]:
                raise ValueError(f"rotate({self.degrees:g}) needs a square image, got {image.shape}")
            return pix.rot90(image, k)
        return pix.rotate(image, jnp.deg2rad(_sample(self.degrees, key)), order=1, mode="constant",
                          cval=0.0)

    def label(self) -> str:
        return f"rotate({_format_param(self.degrees)})"


@dataclasses.dataclass(frozen=True)
class Brightness:
    """Pixel values times ``factor``, clipped to 0..255 (PIL ``ImageEnhance.Brightness``)."""

    factor: Param
    op = "brightness"

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        return jnp.clip(image * _sample(self.factor, key), 0.0, PIXEL_MAX)

    def label(self) -> str:
        return f"brightness({_format_param(self.factor)})"


@dataclasses.dataclass(frozen=True)
class Equalize:
    """Histogram equalisation per channel, PIL ``ImageOps.equalize``'s algorithm on the
    rounded 0..255 values: a channel with one value (or one dominant bin) is unchanged."""

    op = "equalize"

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        values = jnp.clip(jnp.round(image), 0, PIXEL_MAX).astype(jnp.int32)
        return jnp.stack([_equalize_channel(values[..., c]) for c in range(image.shape[-1])], axis=-1)

    def label(self) -> str:
        return "equalize"


def _equalize_channel(values: jax.Array) -> jax.Array:
    histogram = jnp.bincount(values.ravel(), length=256)
    last = 255 - jnp.argmax(histogram[::-1] > 0)  # the highest value present
    step = (histogram.sum() - histogram[last]) // 255
    before = jnp.cumsum(histogram) - histogram  # pixels strictly below each value
    lut = jnp.minimum((step // 2 + before) // jnp.maximum(step, 1), 255)
    # step == 0 also covers a single value (PIL: "len(histo) <= 1").
    return jnp.where(step > 0, lut[values], values).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Translate:
    """Moves the content ``x`` right and ``y`` down, in pixels or fractions of the side."""

    x: Param
    y: Param
    units: str = "fraction"
    op = "translate"

    def __post_init__(self) -> None:
        if self.units not in ("fraction", "pixels"):
            raise TransformConfigError(f"translate: units must be 'fraction' or 'pixels', got {self.units!r}")

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        key_x, key_y = jax.random.split(key)
        dx, dy = _sample(self.x, key_x), _sample(self.y, key_y)
        if self.units == "fraction":
            dx, dy = dx * image.shape[1], dy * image.shape[0]
        return _warp(image, jnp.eye(3), -jnp.array([dy, dx, 0.0], jnp.float32))

    def label(self) -> str:
        unit = "px" if self.units == "pixels" else ""
        return f"translate({_format_param(self.x)}{unit},{_format_param(self.y)}{unit})"


@dataclasses.dataclass(frozen=True)
class Zoom:
    """Scales about the centre by ``factor`` (> 1: zoom in and crop; < 1: zoom out, black border)."""

    factor: Param
    op = "zoom"

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        inverse = 1.0 / jnp.asarray(_sample(self.factor, key), jnp.float32)
        scale = jnp.array([inverse, inverse, 1.0])
        center = (jnp.asarray(image.shape, jnp.float32) - 1.0) / 2.0
        return _warp(image, jnp.diag(scale), center - scale * center)

    def label(self) -> str:
        return f"zoom({_format_param(self.factor)})"


@dataclasses.dataclass(frozen=True)
class Perspective:
    """torchvision's ``RandomPerspective(distortion_scale=strength)``: each corner moves
    inwards by a random amount up to ``strength`` x half the side, and the image is
    warped so that the corners land there."""

    strength: float
    op = "perspective"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.strength) <= 1.0:
            raise TransformConfigError(f"perspective: strength must be in [0, 1], got {self.strength!r}")

    def __call__(self, image: jax.Array, key: jax.Array) -> jax.Array:
        height, width = image.shape[0], image.shape[1]
        corners = jnp.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]],
                            jnp.float32)  # (x, y): top-left, top-right, bottom-right, bottom-left
        inward = jnp.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], jnp.float32)
        limit = self.strength * jnp.array([width / 2.0, height / 2.0], jnp.float32)
        moved = corners + inward * jax.random.uniform(key, (4, 2)) * limit
        # Sampling maps each output pixel back into the input: moved corners -> corners.
        return _sample_homography(image, homography(moved, corners))

    def label(self) -> str:
        return f"perspective({self.strength:g})"


def homography(source: jax.Array, target: jax.Array) -> jax.Array:
    """The 3x3 projective matrix H (H[2, 2] = 1) with H @ (x, y, 1) ~ target for the four
    (x, y) points of ``source`` (4, 2) -> ``target`` (4, 2)."""
    x, y = source[:, 0], source[:, 1]
    u, v = target[:, 0], target[:, 1]
    zeros, ones = jnp.zeros(4), jnp.ones(4)
    rows_u = jnp.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], axis=1)
    rows_v = jnp.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], axis=1)
    coefficients = jnp.linalg.solve(jnp.concatenate([rows_u, rows_v]), jnp.concatenate([u, v]))
    return jnp.append(coefficients, 1.0).reshape(3, 3)


def _sample_homography(image: jax.Array, matrix: jax.Array) -> jax.Array:
    rows, cols = jnp.meshgrid(jnp.arange(image.shape[0], dtype=jnp.float32),
                              jnp.arange(image.shape[1], dtype=jnp.float32), indexing="ij")
    mapped = jnp.einsum("ij,jhw->ihw", matrix, jnp.stack([cols, rows, jnp.ones_like(rows)]))
    source_cols, source_rows = mapped[0] / mapped[2], mapped[1] / mapped[2]

    def channel(values: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(values, [source_rows, source_cols], order=1,
                                                 mode="constant", cval=0.0)

    return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)


Op = Union[Identity, HorizontalFlip, VerticalFlip, Rotate, Brightness, Equalize, Translate, Zoom,
           Perspective]


# ----------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named composition of ops (applied left to right) with the seed of its randomness."""

    name: str
    ops: tuple[Op, ...]
    seed: int = 0

    def apply(self, image: jax.Array, key: jax.Array) -> jax.Array:
        """One image (H, W, 3), 0..255 -> the transformed image; ``key`` is the image's key."""
        for index, op in enumerate(self.ops):
            image = op(image, jax.random.fold_in(key, index))
        return image

    def apply_batch(self, images: jax.Array, image_ids: jax.Array) -> jax.Array:
        """Images (n, H, W, 3) with their ``image_ids`` (n,) uint32 -> transformed images."""
        base = jax.random.PRNGKey(self.seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(image_ids)
        return jax.vmap(self.apply)(images, keys)

    @property
    def is_identity(self) -> bool:
        return all(isinstance(op, Identity) for op in self.ops)

    def describe(self) -> dict[str, Any]:
        """JSON-able spec (ops with their parameters, and the seed): what the outputs record."""
        ops = []
        for op in self.ops:
            fields = {f.name: _describe_param(getattr(op, f.name)) for f in dataclasses.fields(op)}
            ops.append({"op": op.op, **fields})
        return {"name": self.name, "ops": ops, "seed": self.seed}

    def content_key(self) -> str:
        """Canonical JSON of what changes the output (ops and seed, not the display name)."""
        spec = self.describe()
        return json.dumps({"ops": spec["ops"], "seed": spec["seed"]}, sort_keys=True,
                          separators=(",", ":"))


IDENTITY = Transform("identity", (Identity(),))


def image_ids(file_names: Sequence[str]) -> np.ndarray:
    """Per image a uint32 from its file name (CRC-32): its randomness, whatever the batch."""
    return np.array([zlib.crc32(name.encode("utf-8")) for name in file_names], dtype=np.uint32)


# ----------------------------------------------------------------------------- config


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TransformConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _param(value: Any, where: str) -> Param:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise TransformConfigError(f"{where}: a range is [low, high], got {value!r}")
        low, high = _number(value[0], where), _number(value[1], where)
        if low > high:
            raise TransformConfigError(f"{where}: range low {low:g} > high {high:g}")
        return (low, high)
    return _number(value, where)


def _positive(param: Param, where: str) -> Param:
    if min(param if isinstance(param, tuple) else (param,)) <= 0:
        raise TransformConfigError(f"{where}: must be > 0, got {_describe_param(param)!r}")
    return param


def _translate(value: Any, where: str) -> Translate:
    if not isinstance(value, Mapping) or not set(value) <= {"x", "y", "units"}:
        raise TransformConfigError(f"{where}: expected {{x: .., y: .., units: fraction|pixels}}, "
                                   f"got {value!r}")
    return Translate(_param(value.get("x", 0.0), f"{where}.x"), _param(value.get("y", 0.0), f"{where}.y"),
                     str(value.get("units", "fraction")))


# op name -> (takes a parameter, builder(value, where) -> op)
_OPS: dict[str, tuple[bool, Callable[[Any, str], Op]]] = {
    "identity": (False, lambda value, where: Identity()),
    "hflip": (False, lambda value, where: HorizontalFlip()),
    "vflip": (False, lambda value, where: VerticalFlip()),
    "equalize": (False, lambda value, where: Equalize()),
    "rotate": (True, lambda value, where: Rotate(_param(value, where))),
    "brightness": (True, lambda value, where: Brightness(_positive(_param(value, where), where))),
    "zoom": (True, lambda value, where: Zoom(_positive(_param(value, where), where))),
    "translate": (True, _translate),
    "perspective": (True, lambda value, where: Perspective(_number(value, where))),
}
KNOWN_OPS = tuple(sorted(_OPS)) + ("compose",)


def _parse_ops(entry: Any, where: str) -> list[Op]:
    if isinstance(entry, str):
        if entry not in _OPS:
            raise TransformConfigError(f"{where}: unknown transform {entry!r}; known: {', '.join(KNOWN_OPS)}")
        if _OPS[entry][0]:
            raise TransformConfigError(f"{where}: {entry} needs a parameter, e.g. {{{entry}: ...}}")
        return [_OPS[entry][1](None, where)]
    if not isinstance(entry, Mapping):
        raise TransformConfigError(f"{where}: expected a transform name or mapping, got {entry!r}")
    ops = [key for key in entry if key not in ("name", "seed")]
    if len(ops) != 1:
        raise TransformConfigError(f"{where}: expected exactly one transform key (and optional name, "
                                   f"seed), got {sorted(entry)}")
    op, value = ops[0], entry[ops[0]]
    if op == "compose":
        if not isinstance(value, list) or not value:
            raise TransformConfigError(f"{where}.compose: expected a non-empty list of transforms")
        return [parsed for i, part in enumerate(value) for parsed in _parse_ops(part, f"{where}.compose[{i}]")]
    if op not in _OPS:
        raise TransformConfigError(f"{where}: unknown transform {op!r}; known: {', '.join(KNOWN_OPS)}")
    takes_param, build = _OPS[op]
    if not takes_param and value is not None:
        raise TransformConfigError(f"{where}: {op} takes no parameter, got {value!r}")
    return [build(value, f"{where}.{op}")]


def parse_transform(entry: Any, default_seed: int = 0, where: str = "transform") -> Transform:
    """One config entry (see the module docstring) -> ``Transform``; the name defaults to
    the ops' labels joined by '+' (e.g. ``equalize+zoom(1.2)+brightness(1.3)``)."""
    ops = tuple(_parse_ops(entry, where))
    name = "+".join(op.label() for op in ops)
    seed = default_seed
    if isinstance(entry, Mapping):
        name = str(entry.get("name", name))
        seed = entry.get("seed", default_seed)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise TransformConfigError(f"{where}.seed: expected an integer in [0, 2**32), got {seed!r}")
    return Transform(name=name, ops=ops, seed=seed)


def parse_transforms(entries: Sequence[Any], seed: int = 0, where: str = "transforms") -> list[Transform]:
    """Config entries -> transforms, the identity (the baseline) first, names unique."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise TransformConfigError(f"{where}: expected a non-empty list of transforms")
    transforms = [IDENTITY]
    for index, entry in enumerate(entries):
        transform = parse_transform(entry, seed, f"{where}[{index}]")
        if transform.is_identity:
            continue  # the baseline is always there
        if any(t.name == transform.name for t in transforms):
            raise TransformConfigError(f"{where}[{index}]: a second transform named {transform.name!r}")
        transforms.append(transform)
    return transforms
