"""ResNet-50 (He et al. 2016, "v1.5": stride on the 3x3 convolution) in Flax linen.

No weights ship with label-audit: pass your own checkpoint
(``get_model("resnet50", checkpoint=...)``), a Flax msgpack / Orbax directory with
these variable names, or a torchvision-layout ``state_dict`` ``.pth``: module names
follow torchvision's (``layer1_0/conv1``, ``layer1_0/downsample_0`` ...) so that
``models.torch_checkpoint.state_dict_to_flax`` maps one onto the other.
Preprocessing is torchvision's ImageNet recipe: resize 256, centre crop 224,
mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) on 0..1 values.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import torch_checkpoint

CONVERTER = "resnet/torch-v1"
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
BATCH_NORM_EPSILON = 1e-5  # torch's default, which torchvision checkpoints were trained with


@dataclasses.dataclass(frozen=True)
class Variant:
    stage_sizes: tuple[int, ...]
    resize_size: int = 256
    resolution: int = 224


VARIANTS: dict[str, Variant] = {"resnet50": Variant(stage_sizes=(3, 4, 6, 3))}


def _batch_norm(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPSILON, name=name)


def _conv(features: int, kernel: int, name: str, stride: int = 1) -> nn.Conv:
    pad = (kernel - 1) // 2  # torch-style symmetric padding
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                   use_bias=False, name=name)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, projection shortcut when the shape changes."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        x = nn.relu(_batch_norm("bn1")(_conv(self.features, 1, "conv1")(inputs)))
        x = nn.relu(_batch_norm("bn2")(_conv(self.features, 3, "conv2", stride=self.stride)(x)))
        x = _batch_norm("bn3")(_conv(self.features * 4, 1, "conv3")(x))
        shortcut = inputs
        if self.stride != 1 or inputs.shape[-1] != self.features * 4:
            shortcut = _batch_norm("downsample_1")(
                _conv(self.features * 4, 1, "downsample_0", stride=self.stride)(inputs))
        return nn.relu(x + shortcut)


class ResNet(nn.Module):
    """Images (n, h, w, 3), normalised, -> logits (n, num_classes). Inference only.

    ``return_features=True`` gives ``(logits, features)``, ``features`` (n, 2048) being the
    global-pooled last-stage activations the classifier reads, from the same forward pass.
    """

    stage_sizes: tuple[int, ...]
    num_classes: int = 1000

    @nn.compact
    def __call__(self, images: jax.Array,
                 return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        x = nn.relu(_batch_norm("bn1")(_conv(64, 7, "conv1", stride=2)(images)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.stage_sizes):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(64 * 2**stage, stride, name=f"layer{stage + 1}_{block}")(x)
        features = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="fc")(features)
        return (logits, features) if return_features else logits


Model = ResNet


def build(name: str, num_classes: int = 1000) -> ResNet:
    return ResNet(VARIANTS[name].stage_sizes, num_classes=num_classes)


def num_features(name: str) -> int:
    """Length of the penultimate feature vector: the last stage's 4x-expanded width."""
    return 64 * 2 ** (len(VARIANTS[name].stage_sizes) - 1) * 4


def bundled_weights(name: str) -> None:
    """No bundled weights: ResNet-50 needs ``checkpoint=``."""
    return None


# Flax variables from a state dict file of the torchvision ResNet layout.
convert_torch = torch_checkpoint.load_as_flax_variables
