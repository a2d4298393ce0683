"""Each transform against a hand-checked case; config parsing and its errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from models import transforms as tr

KEY = jax.random.PRNGKey(0)


def ramp(height: int = 6, width: int = 6) -> np.ndarray:
    """A (h, w, 3) image whose every pixel differs: value = 10 * row + col (+ 100 per channel)."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([10 * rows + cols + 100 * c for c in range(3)], axis=-1).astype(np.float32)


def apply(entry, image, key=KEY) -> np.ndarray:
    # Jitted as in the predictor (and one compile is faster than dispatching op by op).
    return np.asarray(jax.jit(tr.parse_transform(entry).apply)(jnp.asarray(image), key))


def test_hflip_twice_is_identity_and_mirrors_columns():
    image = ramp()
    once = apply("hflip", image)
    np.testing.assert_array_equal(once[:, 0], image[:, -1])
    np.testing.assert_array_equal(apply("hflip", once), image)


def test_vflip_mirrors_rows():
    image = ramp()
    np.testing.assert_array_equal(apply("vflip", image), image[::-1])


def test_rotate_90_of_a_known_array_is_counter_clockwise():
    image = np.zeros((3, 3, 3), np.float32)
    image[0, 1] = 7  # top middle
    rotated = apply({"rotate": 90}, image)
    expected = np.zeros_like(image)
    expected[1, 0] = 7  # counter-clockwise: top middle -> left middle
    np.testing.assert_array_equal(rotated, expected)
    np.testing.assert_array_equal(apply({"rotate": 180}, ramp()), ramp()[::-1, ::-1])
    np.testing.assert_array_equal(apply({"rotate": -90}, image), np.rot90(image, -1))


def test_rotate_by_an_angle_agrees_with_rot90_at_90_and_blackens_corners():
    image = ramp(7, 7)
    # A range whose only value is 90 takes the interpolating path.
    interpolated = apply({"rotate": [90, 90]}, image)
    # The border may fall a rounding error outside the image (-> black): compare the inside.
    np.testing.assert_allclose(interpolated[1:-1, 1:-1], np.rot90(image)[1:-1, 1:-1], atol=1e-3)
    tilted = apply({"rotate": 45}, image)
    np.testing.assert_array_equal(tilted[0, 0], 0.0)  # a corner comes from outside the image
    np.testing.assert_allclose(tilted[3, 3], image[3, 3], atol=1e-3)  # the centre stays


def test_brightness_factor_one_is_identity_and_factor_clips():
    image = ramp()
    np.testing.assert_array_equal(apply({"brightness": 1}, image), image)
    np.testing.assert_allclose(apply({"brightness": 0.5}, image), image / 2)
    assert apply({"brightness": 10}, image).max() == 255.0
    np.testing.assert_array_equal(apply({"brightness": 10}, image)[0, 0, 0], 0.0)  # 0 stays 0


def test_equalize_of_a_constant_image_is_unchanged():
    constant = np.full((8, 8, 3), 77.0, np.float32)
    np.testing.assert_array_equal(apply("equalize", constant), constant)


def test_equalize_matches_pil_on_a_real_photo(shared_data):
    path = sorted((shared_data / "imagenet_val_sample" / "images").glob("*.JPEG"))[0]
    photo = Image.open(path).convert("RGB")
    expected = np.asarray(ImageOps.equalize(photo), np.float32)
    np.testing.assert_array_equal(apply("equalize", np.asarray(photo, np.float32)), expected)


def test_translate_by_k_pixels_moves_a_known_pixel():
    image = np.zeros((8, 8, 3), np.float32)
    image[2, 3] = 9
    moved = apply({"translate": {"x": 2, "y": 1, "units": "pixels"}}, image)
    expected = np.zeros_like(image)
    expected[3, 5] = 9
    np.testing.assert_allclose(moved, expected, atol=1e-5)
    # A fraction of the side: 0.25 of 8 pixels = 2 pixels left.
    np.testing.assert_allclose(apply({"translate": {"x": -0.25}}, image)[2, 1], 9, atol=1e-5)


def test_zoom_one_is_identity_and_zoom_two_enlarges_the_centre():
    image = ramp(5, 5)
    np.testing.assert_allclose(apply({"zoom": 1.0}, image), image, atol=1e-4)
    zoomed = apply({"zoom": 2.0}, image)
    np.testing.assert_allclose(zoomed[2, 2], image[2, 2], atol=1e-4)  # the centre stays
    # Output row 0 samples input row 1 (centre 2 + (0 - 2) / 2); column 4 samples column 3.
    np.testing.assert_allclose(zoomed[0, 4], image[1, 3], atol=1e-4)
    assert (apply({"zoom": 0.5}, image)[0, 0] == 0).all()  # zoomed out: a black border


def test_homography_maps_the_four_points():
    source = jnp.array([[0, 0], [10, 0], [10, 10], [0, 10]], jnp.float32)
    target = jnp.array([[1, 2], [9, 1], [8, 9], [2, 8]], jnp.float32)
    matrix = np.asarray(tr.homography(source, target))
    mapped = np.c_[np.asarray(source), np.ones(4)] @ matrix.T
    np.testing.assert_allclose(mapped[:, :2] / mapped[:, 2:], np.asarray(target), atol=1e-4)


def test_perspective_zero_is_identity_and_a_strong_one_blackens_a_corner():
    image = ramp(16, 16)
    np.testing.assert_allclose(apply({"perspective": 0.0}, image), image, atol=1e-3)
    warp = jax.jit(tr.parse_transform({"perspective": 0.8}).apply)
    warped = np.stack([np.asarray(warp(jnp.asarray(image), jax.random.PRNGKey(i))) for i in range(4)])
    # Some corner moved inwards in each warp: its output pixels come from outside -> black.
    assert all((w[[0, 0, -1, -1], [0, -1, 0, -1]] == 0).any() for w in warped)


def test_a_seed_per_transform_and_image_makes_it_deterministic():
    images = jnp.asarray(np.stack([ramp(16, 16)] * 2))
    ids = jnp.asarray(tr.image_ids(["a.jpg", "b.jpg"]))
    transform = tr.parse_transform({"rotate": [-30, 30], "seed": 3})
    rotate = jax.jit(transform.apply_batch)
    first = np.asarray(rotate(images, ids))
    np.testing.assert_array_equal(first, np.asarray(rotate(images, ids)))
    assert not np.array_equal(first[0], first[1])  # two images, two angles
    # The same image gets the same angle in any batch position.
    np.testing.assert_array_equal(np.asarray(rotate(images[::-1], ids[::-1]))[1], first[0])
    other_seed = tr.parse_transform({"rotate": [-30, 30], "seed": 4})
    assert not np.array_equal(np.asarray(jax.jit(other_seed.apply_batch)(images, ids)), first)
    assert transform.describe()["seed"] == 3


def test_composition_applies_left_to_right_and_is_named_after_its_parts():
    transform = tr.parse_transform({"compose": ["equalize", {"zoom": 1.2}, {"brightness": 1.3}]})
    assert transform.name == "equalize+zoom(1.2)+brightness(1.3)"
    image = ramp(9, 9)
    step = jnp.asarray(image)
    for index, op in enumerate(transform.ops):  # each op with its own key, as Transform.apply does
        step = jax.jit(op)(step, jax.random.fold_in(KEY, index))
    np.testing.assert_allclose(apply({"compose": ["equalize", {"zoom": 1.2}, {"brightness": 1.3}]}, image),
                               np.asarray(step), atol=1e-4)
    np.testing.assert_array_equal(apply({"compose": ["hflip", "vflip"]}, image), image[::-1, ::-1])


def test_parse_transforms_puts_the_identity_first_and_refuses_bad_entries():
    transforms = tr.parse_transforms(["vflip", {"rotate": 90}, {"translate": {"x": 4, "units": "pixels"}}])
    assert [t.name for t in transforms] == ["identity", "vflip", "rotate(90)", "translate(4px,0px)"]
    assert transforms[1].content_key() != transforms[2].content_key()
    bad = [("spin", "unknown transform 'spin'"), ({"rotate": "x"}, r"transforms\[0\].rotate: expected a number"),
           ("rotate", "needs a parameter"), ({"zoom": 0}, "must be > 0"), ({"vflip": 3}, "takes no parameter"),
           ({"translate": {"x": 1, "units": "cm"}}, "units"), ({"perspective": 2}, r"\[0, 1\]"),
           ({"rotate": 9, "seed": -1}, "seed"), ({"rotate": [5, 1]}, "low 5 > high 1")]
    for entry, message in bad:
        with pytest.raises(tr.TransformConfigError, match=message):
            tr.parse_transforms([entry])
    with pytest.raises(tr.TransformConfigError, match="a second transform named 'vflip'"):
        tr.parse_transforms(["vflip", "vflip"])
