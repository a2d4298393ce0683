"""auditing.centroids: nearest class centroid of real EfficientNet-Lite0 features."""
from __future__ import annotations

import numpy as np
import pytest

from auditing import centroids, imagenet, labelsets, sources
from auditing.centroids import NearestCentroid
from auditing.metrics import LabelSetArray
from auditing.proposals import pool_proposals, select_model_proposals

N_CLASSES_TESTED = 16  # classes with two sample images each: 32 audited images, 16 examples


# ----------------------------------------------------------------------------- hand-built cases


def test_leave_one_out_on_a_hand_case():
    # Class 0: two images at 0 and `angle` degrees; class 1: one image at 90 degrees.
    angle = np.arctan2(0.8, 1.0)
    features = np.array([[1.0, 0.0], [1.0, 0.8], [0.0, 1.0]])
    fitted = NearestCentroid(reference="audited", num_classes=3).fit(features, np.array([0, 0, 1]))
    # Left out of class 0, each of its images has the other one as its centroid. Image 2 is
    # class 1's only image, so it has no own centroid and goes to class 0's (the bisector).
    np.testing.assert_allclose(fitted.own_similarity_[:2], [np.cos(angle)] * 2, rtol=1e-6)
    assert np.isnan(fitted.own_similarity_[2])
    assert fitted.labels_.tolist() == [0, 0, 0]
    np.testing.assert_allclose(fitted.similarity_, [np.cos(angle), np.cos(angle),
                                                    np.cos(np.pi / 2 - angle / 2)], rtol=1e-6)
    assert fitted.counts_.tolist() == [2, 1, 0]


def test_examples_only_and_both_on_a_hand_case():
    features = np.array([[1.0, 0.1], [0.1, 1.0]])
    examples, example_labels = np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0, 1])
    # The examples say class 0 points up: both audited images swap classes.
    swapped = NearestCentroid(reference="examples", num_classes=2).fit(
        features, np.array([0, 1]), examples, example_labels)
    assert swapped.labels_.tolist() == [1, 0]
    # With the audited images as references too, each image's own class has the example and
    # nothing else (leave one out), so the result is the same here.
    both = NearestCentroid(reference="both", num_classes=2).fit(features, np.array([0, 1]), examples,
                                                                example_labels)
    assert both.labels_.tolist() == [1, 0]
    with pytest.raises(ValueError, match="needs example_features"):
        NearestCentroid(reference="both", num_classes=2).fit(features, np.array([0, 1]))
    with pytest.raises(ValueError, match="labels must lie in"):
        NearestCentroid(reference="audited", num_classes=2).fit(features, np.array([0, 2]))


def test_disagreement_checks_and_added_labels_on_a_hand_case():
    original = np.array([0, 1, 2, 3])
    sets = LabelSetArray.from_sets([[0, 5], [1], [], [4]], 6)
    proposed = np.array([5, 1, 3, 2])  # 0: 5 in set; 1: agrees; 2: empty set; 3: 2 not in {4}
    check = centroids.check_disagreements(original, proposed, sets)
    assert (check.n_images, check.n_disagreeing, check.n_in_set) == (3, 2, 1)
    assert check.share_in_set == 0.5
    pool = LabelSetArray.from_sets([[0], [1], [2], [3, 4]], 6)
    assert centroids.labels_added(proposed, sets, pool).tolist() == [True, False, False, False]
    top1 = {"m": np.array([0, 2, 2, 4])}
    assert centroids.suspected_label_errors(original, proposed, top1).tolist() == [False, False, False, True]
    summary = centroids.centroid_summary(original, proposed, top1, sets, pool)
    assert summary["centroid"] == {"n_images": 3, "n_disagreeing": 2, "n_in_set": 1, "share_in_set": 0.5}
    # m disagrees on images 1 (2 not in {1}) and 3 (4 in {4}); image 2 has an empty set.
    assert summary["top1"]["m"] == {"n_images": 3, "n_disagreeing": 2, "n_in_set": 1, "share_in_set": 0.5}
    assert (summary["set_labels_only_the_centroid_finds"], summary["suspected_label_errors"],
            summary["suspected_with_a_set"], summary["suspected_with_original_not_in_set"]) == (1, 1, 1, 1)


# ----------------------------------------------------------------------------- real features


@pytest.fixture(scope="module")
def real_features(shared_data, spec):
    """Lite0 features and logits of 32 real validation images (16 classes x 2) and of the
    16 classes' example images (imagenet_class_examples/)."""
    from PIL import Image

    from models.predictor import JitPredictor

    original = labelsets.read_label_tsv(shared_data / "derived" / "imagenet_val_labels_by_filename.tsv")
    images = shared_data / "imagenet_val_sample" / "images"
    sample = original[original["file_name"].isin([p.name for p in images.iterdir()])]
    pairs = sample.groupby("label").filter(lambda g: len(g) >= 2).groupby("label").head(2)
    chosen = pairs[pairs["label"].isin(sorted(pairs["label"].unique())[:N_CLASSES_TESTED])]
    chosen = chosen.sort_values(["label", "file_name"])
    wnids = imagenet.imagenet_wnids()
    examples = {p.name.split("_", 1)[0]: p for p in (shared_data / "imagenet_class_examples").iterdir()}
    example_paths = [examples[wnids[label]] for label in sorted(chosen["label"].unique())]
    predictor = JitPredictor(spec, batch_size=16)
    audited = predictor.predict(np.stack([spec.preprocess(Image.open(images / n)) for n in chosen["file_name"]]))
    reference = predictor.predict(np.stack([spec.preprocess(Image.open(p)) for p in example_paths]))
    return {"file_names": chosen["file_name"].to_numpy(), "labels": chosen["label"].to_numpy(),
            "features": audited.features, "logits": audited.logits,
            "example_features": reference.features,
            "example_labels": np.array(sorted(chosen["label"].unique()))}


def test_leave_one_out_on_real_features_is_the_other_image_of_the_class(real_features):
    f = real_features
    fitted = NearestCentroid(reference="audited").fit(f["features"], f["labels"])
    unit = f["features"] / np.linalg.norm(f["features"], axis=1, keepdims=True)
    # Two images per class: leaving one out, its class centroid is the other image.
    partner = np.arange(len(unit)) ^ 1
    np.testing.assert_allclose(fitted.own_similarity_, np.einsum("ij,ij->i", unit, unit[partner]),
                               rtol=1e-4, atol=1e-5)
    assert (fitted.similarity_ >= fitted.own_similarity_ - 1e-6).all()
    assert set(fitted.labels_) <= set(f["labels"])  # only these 16 classes have centroids


def test_real_example_centroids_find_most_original_labels(real_features):
    f = real_features
    fitted = NearestCentroid(reference="examples").fit(f["features"], f["labels"], f["example_features"],
                                                       f["example_labels"])
    # One example image per class, 16 classes: the original label is the nearest for most images
    # (28 of 32 measured with the pinned Lite0 weights), and far above chance (1/16).
    assert (fitted.labels_ == f["labels"]).sum() >= 26
    both = NearestCentroid(reference="both").fit(f["features"], f["labels"], f["example_features"],
                                                 f["example_labels"])
    assert (both.labels_ == f["labels"]).sum() >= 27  # 29 measured: the other sample image helps
    assert both.counts_[f["example_labels"]].tolist() == [3] * N_CLASSES_TESTED


def test_real_centroids_join_the_pool_with_their_provenance(real_features):
    f = real_features
    fitted = NearestCentroid(reference="both").fit(f["features"], f["labels"], f["example_features"],
                                                   f["example_labels"])
    model = select_model_proposals("efficientnet-lite0", f["logits"], n=3 * len(f["labels"]))
    pool = pool_proposals([model, fitted.as_selections("centroid-efficientnet-lite0")], f["labels"],
                          f["file_names"]).to_frame()
    sources_of = {(r.file_name, r.label): list(r.sources) for r in pool.itertuples()}
    for name, label in zip(f["file_names"], fitted.labels_):
        assert "centroid-efficientnet-lite0:top1" in sources_of[(name, int(label))]
    # Suspected label errors: neither the model's top-1 nor the centroid says the original label.
    suspects = centroids.suspected_label_errors(f["labels"], fitted.labels_,
                                                {"efficientnet-lite0": f["logits"].argmax(1)})
    assert suspects.sum() < len(suspects) / 2
    real = labelsets.read_real_json(sources.fetch("real_labels", download=False))
    sets = LabelSetArray.from_sets([real[n] for n in f["file_names"]], 1000)
    check = centroids.check_disagreements(f["labels"], fitted.labels_, sets)
    assert check.n_images == int((sets.sizes > 0).sum()) and check.n_in_set <= check.n_disagreeing
