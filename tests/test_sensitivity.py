"""The sensitivity t-tests on a tiny hand-built case, and one real run on real images."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from auditing.metrics import LabelSetArray
from auditing.sensitivity import SensitivityAudit, accidental_transform_candidates

MODELS = ["a", "b", "c"]
TRANSFORMS = ["identity", "vflip"]
# Three classes with 2, 2 and 1 images: class 0 = images 0, 1; class 1 = images 2, 3; class 2 = image 4.
LABELS = np.array([0, 0, 1, 1, 2])


def hand_built_top1() -> np.ndarray:
    """top1 (models, transforms, images). Without the transform every model is right on
    classes 0 and 1; with it, models a, b miss both class-0 images and c misses one,
    class 1 is untouched, and class 2 (one image) flips from right to wrong for a only."""
    right = LABELS.copy()
    top1 = np.stack([np.stack([right, right]) for _ in MODELS])
    top1[0, 1, [0, 1]] = 9
    top1[1, 1, [0, 1]] = 9
    top1[2, 1, 0] = 9
    top1[:, 0, 4] = [2, 7, 7]  # class 2 without the transform: a right, b and c wrong
    top1[:, 1, 4] = [7, 7, 7]  # with it: all wrong
    return top1


def test_class_and_model_tests_match_scipy_on_a_hand_built_case():
    audit = SensitivityAudit(alpha=0.05, min_models=3, min_images_per_class=2).fit(
        hand_built_top1(), LABELS, MODELS, TRANSFORMS, num_classes=10)
    # Class accuracies by hand: (models) per class, without -> with.
    without = {0: [1, 1, 1], 1: [1, 1, 1], 2: [1, 0, 0]}
    with_ = {0: [0, 0, 0.5], 1: [1, 1, 1], 2: [0, 0, 0]}
    tests = audit.class_tests_.set_index("class")
    for c in (0, 2):
        expected = stats.ttest_ind(without[c], with_[c])
        assert tests.loc[c, "t"] == pytest.approx(expected.statistic)
        assert tests.loc[c, "p"] == pytest.approx(expected.pvalue)
        assert tests.loc[c, "df"] == 4
    assert tests.loc[0, "sensitive"] and not tests.loc[2, "sensitive"]
    assert tests.loc[1, "unchanged"] and np.isnan(tests.loc[1, "p"]) and not tests.loc[1, "sensitive"]
    assert list(tests["n_images"]) == [2, 2, 1] and set(tests["n_models"]) == {3}
    assert list(tests["low_power"]) == [False, False, True]  # class 2 has 1 image (< 2)
    counts = audit.class_counts_.iloc[0]
    assert (counts["sensitive"], counts["insensitive"], counts["unchanged"], counts["untestable"],
            counts["n_classes"]) == (1, 2, 1, 0, 3)
    # Per model: paired t-test across the 3 classes.
    models = audit.model_tests_.set_index("model")
    for m, model in enumerate(MODELS):
        expected = stats.ttest_rel([without[c][m] for c in range(3)], [with_[c][m] for c in range(3)])
        assert models.loc[model, "p"] == pytest.approx(expected.pvalue)
        assert models.loc[model, "n_classes"] == 3
    # Paired per-class test on request.
    paired = SensitivityAudit(class_test="paired").fit(hand_built_top1(), LABELS, MODELS, TRANSFORMS, num_classes=10)
    class0 = paired.class_tests_.set_index("class").loc[0]
    assert class0["p"] == pytest.approx(stats.ttest_rel(without[0], with_[0]).pvalue)
    assert class0["power_note"] == "3 models (< 10); 2 images in the class (< 10)"
    # One model: a changed class has no p-value (no degrees of freedom) and is untestable.
    single = SensitivityAudit().fit(hand_built_top1()[:1], LABELS, MODELS[:1], TRANSFORMS, num_classes=10)
    assert single.class_counts_.iloc[0][["sensitive", "insensitive", "untestable"]].tolist() == [0, 1, 2]


def test_accuracy_and_real_accuracy_changes():
    top1 = hand_built_top1()
    # ReaL sets: image 4 also accepts class 7, image 3 has an empty set (not rated).
    sets = LabelSetArray.from_sets([{0}, {0}, {1}, set(), {2, 7}], num_classes=10)
    audit = SensitivityAudit().fit(top1, LABELS, MODELS, TRANSFORMS, label_sets=sets, num_classes=10)
    acc = audit.accuracy_.set_index(["model", "transform", "labels"])
    assert acc.loc[("a", "identity", "original"), "accuracy"] == pytest.approx(5 / 5)
    assert acc.loc[("a", "vflip", "original"), "change"] == pytest.approx(2 / 5 - 1)  # misses 0, 1, 4
    assert acc.loc[("c", "vflip", "real"), "n_images"] == 4
    assert acc.loc[("b", "identity", "real"), "accuracy"] == pytest.approx(4 / 4)  # 7 is in image 4's set
    assert acc.loc[("c", "vflip", "real"), "change"] == pytest.approx(3 / 4 - 1)


def test_fit_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="top1: expected shape"):
        SensitivityAudit().fit(hand_built_top1(), LABELS, MODELS[:2], TRANSFORMS, num_classes=10)
    with pytest.raises(ValueError, match="image 4: original label 12"):
        SensitivityAudit().fit(hand_built_top1(), np.array([0, 0, 1, 1, 12]), MODELS, TRANSFORMS, num_classes=10)
    with pytest.raises(ValueError, match="alpha"):
        SensitivityAudit(alpha=1.5)


def test_accidental_candidates_are_images_the_transform_makes_confident():
    # (models, transforms, images): image 1 looks upside down (vflip makes it right).
    probability = np.array([[[0.9, 0.1, 0.5], [0.8, 0.95, 0.5]],
                            [[0.8, 0.2, 0.4], [0.7, 0.85, 0.3]]])
    found = accidental_transform_candidates(probability, ["x", "y", "z"], np.array([1, 2, 3]), TRANSFORMS,
                                            ["vflip"], min_gain=0.5)
    assert list(found["file_name"]) == ["y"]
    assert found.loc[0, "gain"] == pytest.approx(0.75) and found.loc[0, "models_gaining"] == 2
    with pytest.raises(ValueError, match="rotate"):
        accidental_transform_candidates(probability, ["x", "y", "z"], np.array([1, 2, 3]), TRANSFORMS, ["rotate"])


# ----------------------------------------------------------------------------- real run

N_REAL_IMAGES = 32


@pytest.fixture(scope="module")
def real_sample(shared_data):
    from pipelines.images import ImageFiles

    full = ImageFiles.from_folder(shared_data / "imagenet_val_sample" / "images",
                                  labels_path=shared_data / "derived" / "imagenet_val_labels_by_filename.tsv")
    return ImageFiles(paths=full.paths[:N_REAL_IMAGES], file_names=full.file_names[:N_REAL_IMAGES],
                      labels=full.labels[:N_REAL_IMAGES], dataset_id=f"{full.dataset_id}-first{N_REAL_IMAGES}",
                      split=full.split)


def test_real_run_on_real_images_with_a_real_model_and_reuse(real_sample, tmp_path, spec, shared_data):
    from auditing import labelsets, sources
    from pipelines.sensitivity import run_sensitivity

    real_sets = labelsets.read_real_json(sources.fetch("real_labels", download=False))
    section = {"models": ["efficientnet-lite0"], "transforms": ["hflip", "vflip"], "batch_size": 16,
               "shard_size": 16, "min_gain": 0.3}
    result = run_sensitivity(section, real_sample, str(tmp_path), specs={spec.name: spec}, label_sets=real_sets)
    assert result.counts["images_read"] == result.counts["images_audited"] == N_REAL_IMAGES
    assert (result.counts["pairs"], result.counts["pairs_computed"]) == (3, 3)
    report = json.loads((tmp_path / "sensitivity" / "sensitivity.json").read_text())
    acc = pd.DataFrame(report["accuracy"]).set_index(["transform", "labels"])
    # EfficientNet-Lite0 is ~75% top-1 on ImageNet; 32 images give a wide but bounded range.
    assert 0.5 <= acc.loc[("identity", "original"), "accuracy"] <= 1.0
    rated = sum(bool(real_sets[name]) for name in real_sample.file_names)  # images with a non-empty set
    assert acc.loc[("identity", "real"), "n_images"] == rated
    assert acc.loc[("vflip", "original"), "change"] < 0  # upside-down photos are harder
    assert [c["n_classes"] for c in report["class_counts"]] == [len(set(real_sample.labels))] * 2
    assert report["power"]["low_power"]  # one model: every test says so
    assert report["transforms"][2] == {"name": "vflip", "ops": [{"op": "vflip"}], "seed": 0}
    html = (tmp_path / "sensitivity" / "index.html").read_text()
    assert "Low power" in html and "data:image/png;base64," in html and "vflip" in html
    stored = json.loads(next((tmp_path / "store" / "sensitivity").glob("*/*/transform.json")).read_text())
    assert {"name", "ops", "seed"} <= set(stored)

    # The identity logits are the plain predictor's: decode + crop + normalise as in stage 1.
    from models.predictor import JitPredictor
    from pipelines.images import decode_image
    from pipelines.sensitivity import read_predictions

    identity = read_predictions(result.predictions[(spec.name, "identity")])
    first = [decode_image(open(p, "rb").read()) for p in real_sample.paths[:4]]
    plain, _ = JitPredictor(spec, batch_size=4).predict(np.stack([spec.preprocess(i) for i in first]))
    np.testing.assert_allclose(identity.logits[:4], plain, rtol=1e-4, atol=1e-4)

    # Adding a transform computes only that transform.
    section["transforms"] = ["hflip", "vflip", {"rotate": 180}]
    again = run_sensitivity(section, real_sample, str(tmp_path), specs={spec.name: spec}, label_sets=real_sets)
    assert (again.counts["pairs"], again.counts["pairs_computed"]) == (4, 1)
    assert again.predictions[(spec.name, "vflip")] == result.predictions[(spec.name, "vflip")]


def test_undecodable_images_are_quarantined_and_counted(photo_source, tmp_path, spec):
    from pipelines.sensitivity import predict_under_transforms, read_predictions
    from models.transforms import parse_transforms

    source, bad = photo_source
    # The transforms and batch of the real run above: the compiled predictor is reused.
    transforms = parse_transforms(["hflip", "vflip"])
    result = predict_under_transforms([spec], transforms, source, str(tmp_path), batch_size=16, shard_size=4)
    for transform in transforms:
        stored = read_predictions(result.uris[(spec.name, transform.name)])
        assert stored.num_read == len(source)  # read = predicted + quarantined
        assert dict(zip(stored.quarantined_file_names, stored.quarantine_reasons)).keys() == bad.keys()
        assert len(stored.file_names) == len(source) - len(bad)
    assert not list(tmp_path.rglob("*.shards"))  # merged, shard files removed


def test_config_section_is_parsed_and_bad_keys_are_named():
    from pipelines.sensitivity import SensitivityConfig, SensitivityConfigError

    config = SensitivityConfig.from_mapping({"models": ["efficientnet-lite0",
                                                        {"name": "resnet50", "checkpoint": "r50.msgpack"}],
                                             "transforms": ["vflip", {"rotate": 180}, {"rotate": [-30, 30]}],
                                             "seed": 7})
    assert config.models == ("efficientnet-lite0", "resnet50")
    assert config.checkpoints == {"resnet50": "r50.msgpack"}
    assert [t.name for t in config.transforms] == ["identity", "vflip", "rotate(180)", "rotate(-30..30)"]
    assert [t.seed for t in config.transforms[1:]] == [7, 7, 7] and config.alpha == 0.05
    assert config.accidental == ("vflip", "rotate(180)")
    bad = [({"transforms": ["vflip"]}, r"stages.sensitivity.models: required"),
           ({"models": [{"name": "m", "weights": "w"}], "transforms": ["vflip"]}, r"models\[0\]: expected"),
           ({"models": ["m"], "transforms": ["vflip"], "alpah": 0.1}, r"stages.sensitivity.alpah: unknown key"),
           ({"models": ["m"], "transforms": ["vflip"], "alpha": 2}, r"alpha: expected a number in \(0, 1\)"),
           ({"models": ["m"], "transforms": ["vflip"], "accidental": ["hflip"]}, r"accidental: expected names"),
           ({"models": ["m"], "transforms": ["flop"]}, r"stages.sensitivity.transforms\[0\]: unknown transform")]
    for section, message in bad:
        with pytest.raises(ValueError, match=message):
            SensitivityConfig.from_mapping(section)
    assert issubclass(SensitivityConfigError, ValueError)
