"""Preprocessing, model specs and the JitPredictor (compile once, pad the last batch, dtypes)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models import efficientnet_lite, preprocessing, registry, resnet
from models.predictor import JitPredictor


# --- preprocessing --------------------------------------------------------------------------

def _gradient_rgb(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    pixels = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                             np.full((height, width, 1), 90, np.float32)], axis=2)
    return Image.fromarray(pixels.astype(np.uint8))


def test_grayscale_and_cmyk_become_rgb() -> None:
    rgb = _gradient_rgb(40, 30)
    gray = rgb.convert("L")
    assert np.array_equal(np.asarray(preprocessing.to_rgb(gray)), np.repeat(np.asarray(gray)[..., None], 3, 2))
    assert np.array_equal(np.asarray(preprocessing.to_rgb(rgb.convert("CMYK"))), np.asarray(rgb))


def test_transparent_pixels_become_white() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (10, 20, 30, 255)  # opaque top half, fully transparent bottom half
    out = np.asarray(preprocessing.to_rgb(Image.fromarray(rgba)))
    assert (out[:2] == (10, 20, 30)).all() and (out[2:] == 255).all()
    palette = Image.fromarray(rgba).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 3))
    assert (np.asarray(preprocessing.to_rgb(palette))[2:] == 255).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    pixels = np.array([[0, 32768, 65535]], np.uint16)
    out = np.asarray(preprocessing.to_rgb(Image.fromarray(pixels)))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_resize_and_centre_crop_geometry() -> None:
    resized = preprocessing.resize_shorter_side(_gradient_rgb(600, 400), 256)
    assert resized.size == (384, 256)
    assert preprocessing.resize_shorter_side(_gradient_rgb(400, 601), 256).size == (256, 385)
    # A marker at the exact centre stays at the centre of the crop.
    canvas = np.zeros((100, 160, 3), np.uint8)
    canvas[50, 80] = 255
    crop = np.asarray(preprocessing.center_crop(Image.fromarray(canvas), 20))
    assert crop.shape == (20, 20, 3) and tuple(np.argwhere(crop[..., 0])[0]) == (10, 10)
    with pytest.raises(ValueError, match="20x20"):
        preprocessing.center_crop(Image.fromarray(canvas[:10]), 20)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA"])
def test_spec_preprocess_shape_dtype_and_range(name: str, mode: str) -> None:
    spec = registry.get_model(name)
    image = _gradient_rgb(500, 333).convert(mode)
    out = spec.preprocess(image)
    assert out.shape == (spec.crop_size, spec.crop_size, 3) and out.dtype == np.float32
    assert -127 / 128 - 1e-6 <= out.min() and out.max() <= 1.0  # (x - 127) / 128 on 0..255


def test_lite_sizes_follow_the_reference_resolutions() -> None:
    reference = pytest.importorskip("efficientnet_lite_pytorch.utils")
    for name in ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]:
        spec = registry.get_model(name)
        _width, _depth, resolution, _dropout = reference.efficientnet_params(name)
        assert spec.crop_size == resolution
        assert spec.resize_size == resolution + 32  # TF's CROP_PADDING: 224/256, 240/272, 260/292
    assert [registry.get_model(n).crop_size for n in registry.list_models()[:3]] == [224, 240, 260]


def test_block_configs_match_the_reference_architecture() -> None:
    pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    for name, variant in efficientnet_lite.VARIANTS.items():
        theirs = reference.EfficientNet.from_name(name)._blocks
        ours = efficientnet_lite.block_configs(variant.width, variant.depth)
        assert len(ours) == len(theirs), name
        for mine, block in zip(ours, theirs):
            assert mine.out_features == block._block_args.output_filters
            assert mine.kernel_size == block._block_args.kernel_size


# --- JitPredictor -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0_predictor(tmp_path_factory) -> JitPredictor:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABEL_AUDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return JitPredictor(registry.get_model("efficientnet-lite0"), batch_size=4)


@pytest.fixture(scope="module")
def photo_batch() -> np.ndarray:
    pytest.importorskip("skimage")
    from models import sample_photos

    spec = registry.get_model("efficientnet-lite0")
    return np.stack([spec.preprocess(image) for image in sample_photos.load_photos().values()])


def test_predictor_compiles_once_and_padding_changes_nothing(lite0_predictor, photo_batch) -> None:
    n = len(photo_batch)
    assert n % lite0_predictor.batch_size != 0  # the last batch is padded
    logits, features = lite0_predictor.predict(photo_batch)
    assert logits.shape == (n, 1000) and features.shape == (n, 1280)
    assert logits.dtype == features.dtype == np.float32
    one_by_one = np.concatenate([lite0_predictor.predict(photo_batch[i:i + 1]).logits for i in range(3)])
    np.testing.assert_allclose(one_by_one, logits[:3], atol=1e-4)
    empty = lite0_predictor.predict(photo_batch[:0])
    assert empty.logits.shape == (0, 1000) and empty.features.shape == (0, 1280)
    assert lite0_predictor.trace_count == 1


def test_features_are_what_the_classifier_reads(lite0_predictor, photo_batch) -> None:
    """The features come from the same forward pass: the fc layer applied to them gives
    the logits, and they are pooled ReLU6 activations (in [0, 6])."""
    logits, features = lite0_predictor.predict(photo_batch)
    fc = lite0_predictor._variables["params"]["fc"]
    np.testing.assert_allclose(features @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"]), logits,
                               rtol=1e-4, atol=1e-3)
    assert features.min() >= 0 and features.max() <= 6 and features.std() > 0.1
    assert lite0_predictor.spec.num_features == 1280


def test_resnet_returns_its_pooled_features_with_the_logits() -> None:
    import jax

    module = resnet.build("resnet50", num_classes=10)
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    variables = module.init(jax.random.PRNGKey(0), images)
    logits, features = module.apply(variables, images, return_features=True)
    assert features.shape == (2, resnet.num_features("resnet50")) == (2, 2048)
    np.testing.assert_allclose(module.apply(variables, images), logits, rtol=1e-5, atol=1e-5)
    fc = variables["params"]["fc"]
    np.testing.assert_allclose(features @ fc["kernel"] + fc["bias"], logits, rtol=1e-4, atol=1e-4)


def test_predictor_rejects_wrongly_sized_images(lite0_predictor) -> None:
    with pytest.raises(ValueError, match=r"\(n, 224, 224, 3\).*\(2, 240, 240, 3\)"):
        lite0_predictor.predict(np.zeros((2, 240, 240, 3), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        JitPredictor(registry.get_model("efficientnet-lite0"), dtype="float16")


def test_bfloat16_predictor_agrees_with_float32(lite0_predictor, photo_batch, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path))
    bf16 = JitPredictor(registry.get_model("efficientnet-lite0"), batch_size=len(photo_batch),
                        dtype="bfloat16")
    from auditing.predictions import softmax

    logits16, features16 = bf16.predict(photo_batch)
    logits32, features32 = lite0_predictor.predict(photo_batch)
    probs16, probs32 = softmax(logits16), softmax(logits32)
    assert logits16.dtype == features16.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: the confident top-1s survive, the probabilities move a little.
    confident = probs32.max(axis=1) > 0.5
    assert confident.sum() >= 3
    np.testing.assert_array_equal(logits16[confident].argmax(1), logits32[confident].argmax(1))
    assert np.abs(probs16 - probs32).max() < 0.1


@pytest.mark.parametrize("kernel_size, stride", [(3, 1), (3, 2), (5, 2)])
def test_depthwise_conv_equals_grouped_convolution(kernel_size: int, stride: int) -> None:
    import flax.linen as nn
    import jax

    # Odd, non-square input: the "SAME" padding split must match for any size, not just the nominal one.
    x = np.random.default_rng(0).normal(size=(2, 13, 10, 6)).astype(np.float32)
    depthwise = efficientnet_lite.DepthwiseConv(kernel_size, stride)
    variables = depthwise.init(jax.random.PRNGKey(0), x)
    grouped = nn.Conv(6, (kernel_size, kernel_size), strides=stride, padding="SAME", feature_group_count=6,
                      use_bias=False)
    np.testing.assert_allclose(depthwise.apply(variables, x), grouped.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_thin_banner_preprocesses_in_bounded_memory_and_like_the_full_resize(monkeypatch):
    """A 20000 x 1 image would be resized to 5,120,000 x 256 before the crop; only the
    crop region is resampled instead, with the same pixels as resize-then-crop."""
    from PIL import Image

    from models import preprocessing, sample_photos

    wide = sample_photos.load_photos(["china"])["china"].convert("RGB").resize((3000, 300))
    full = np.asarray(preprocessing.center_crop(preprocessing.resize_shorter_side(wide, 256), 224))
    monkeypatch.setattr(preprocessing, "_MAX_RESIZED_PIXELS", 1)
    np.testing.assert_array_equal(np.asarray(preprocessing.resize_and_center_crop(wide, 256, 224)), full)
    banner = preprocessing.preprocess(Image.new("RGB", (20_000, 1)), 256, 224, (127,) * 3, (128,) * 3)
    assert banner.shape == (224, 224, 3)
