"""auditing.metrics: every metric on a small case worked out by hand in the comments."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from auditing import metrics
from auditing.metrics import LabelSetArray


def sets(*rows, num_classes=5):
    return LabelSetArray.from_sets(rows, num_classes)


def test_label_sets_sort_dedupe_and_slice():
    s = sets([3, 1, 3], [], [0], num_classes=4)
    assert s.indptr.tolist() == [0, 2, 2, 3]
    assert s.indices.tolist() == [1, 3, 0]
    assert s.sizes.tolist() == [2, 0, 1]
    assert s.rows.tolist() == [0, 0, 2]
    assert s.contains(np.array([3, 0, 1])).tolist() == [True, False, False]
    taken = s.take(np.array([2, 0]))
    assert taken.to_sets() == [frozenset({0}), frozenset({1, 3})]
    assert s.take(np.array([False, True, True])).to_sets() == [frozenset(), frozenset({0})]


def test_label_sets_reject_out_of_range_labels_naming_the_image():
    with pytest.raises(ValueError, match=r"image 1: label 7 is outside \[0, 5\)"):
        sets([0], [7])
    with pytest.raises(ValueError, match="expected 2 labels"):
        sets([0], [1]).contains(np.array([0, 1, 2]))


def test_original_accuracy():
    # 2 of 4 top-1s equal the original label.
    assert metrics.original_accuracy(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 0])) == 0.5


def test_real_accuracy_excludes_empty_sets():
    label_sets = sets([0, 1], [2], [], [3])
    top1 = np.array([1, 0, 0, 3])
    # image 0: 1 in {0,1} yes; image 1: 0 in {2} no; image 2 excluded; image 3 yes -> 2/3.
    assert metrics.real_correct(top1, label_sets).tolist() == [True, False, False, True]
    assert metrics.real_accuracy(top1, label_sets) == pytest.approx(2 / 3)
    assert np.isnan(metrics.real_accuracy(np.array([0]), sets([])))


def test_original_labels_as_a_model_score_their_share_in_the_sets():
    # The original label is in 2 of the 3 non-empty sets.
    original = np.array([0, 2, 4, 1])
    assert metrics.real_accuracy(original, sets([0, 1], [1], [], [1, 3])) == pytest.approx(2 / 3)


def logits_ranking(*rankings, num_classes=5):
    """Logits whose descending order over the first classes is the given ranking."""
    out = np.zeros((len(rankings), num_classes), dtype=np.float32)
    for row, ranking in enumerate(rankings):
        for position, label in enumerate(ranking):
            out[row, label] = 10.0 - position
    return out


def test_strict_topk_with_k_the_set_size():
    label_sets = sets([0, 1], [2], [0, 3], [], [4, 2, 1])
    logits = logits_ranking([1, 0, 4], [2, 1], [0, 1, 3], [0], [2, 4, 1, 0])
    # image 0: top-2 {1,0} == {0,1} yes; image 1: top-1 {2} yes; image 2: top-2 {0,1} != {0,3};
    # image 3 excluded (empty); image 4: top-3 {2,4,1} yes -> 3/4.
    assert metrics.strict_topk_correct(logits, label_sets).tolist() == [True, True, False, False, True]
    assert metrics.strict_topk_accuracy(logits, label_sets) == pytest.approx(3 / 4)
    # Fixed k: only the images whose set has exactly k labels.
    assert metrics.strict_topk_accuracy(logits, label_sets, k=2) == pytest.approx(1 / 2)
    assert metrics.strict_topk_accuracy(logits, label_sets, k=1) == 1.0
    assert np.isnan(metrics.strict_topk_accuracy(logits, label_sets, k=4))
    assert metrics.strict_topk_by_size(logits, label_sets) == {1: 1.0, 2: 0.5, 3: 1.0}


def test_strict_top1_differs_from_real_on_multi_label_images():
    # ReaL counts top-1 0 right on a {0,1} image; strict top-k needs 0 and 1 as the top-2.
    label_sets = sets([0, 1])
    logits = logits_ranking([0, 3, 1])
    assert metrics.real_accuracy(np.array([0]), label_sets) == 1.0
    assert metrics.strict_topk_accuracy(logits, label_sets) == 0.0


def test_per_class_accuracy_nan_for_classes_without_images():
    accuracy = metrics.per_class_accuracy(np.array([1, 0, 1, 1]), np.array([0, 0, 1, 1]), 3)
    assert accuracy[:2].tolist() == [0.5, 1.0]
    assert np.isnan(accuracy[2])


def test_multilabel_accuracy_tfds_semantics():
    original = np.array([0, 0, 1, 1, 1])
    correct = sets([0], [0, 2], [1], [1], [1])
    unclear = sets([], [], [], [2], [])
    problematic = np.array([False, False, False, False, True])
    top1 = np.array([0, 2, 3, 2, 1])
    # class 0: image 0 (0 correct), image 1 (2 correct) -> 1.0
    # class 1: image 2 (3 wrong), image 3 (2 unclear -> counted right), image 4 skipped -> 0.5
    result = metrics.multilabel_accuracy(top1, original, correct, unclear, problematic)
    assert result.mean == pytest.approx(0.75)
    assert result.per_class[:2].tolist() == [1.0, 0.5]
    assert np.isnan(result.per_class[2:]).all()
    assert result.n_images == 4


def test_multilabel_accuracy_with_real_sets_skips_empty_sets_and_averages_classes():
    original = np.array([0, 0, 0, 1])
    label_sets = sets([0], [0, 1], [], [2])
    top1 = np.array([0, 2, 4, 2])
    # class 0: images 0 (right), 1 (wrong), 2 skipped (empty) -> 0.5; class 1: 1.0 -> mean 0.75,
    # while the image-level ReaL accuracy is 2/3.
    result = metrics.multilabel_accuracy(top1, original, label_sets)
    assert result.mean == pytest.approx(0.75)
    assert result.n_images == 3
    assert metrics.real_accuracy(top1, label_sets) == pytest.approx(2 / 3)


def _tfds_readme_multilabel(top1, original, correct, unclear, problematic):
    """The loop in TFDS imagenet2012_multilabel's README, transcribed."""
    right, seen = {}, {}
    for i in range(len(top1)):
        if problematic[i]:
            continue
        c = original[i]
        seen[c] = seen.get(c, 0) + 1
        right[c] = right.get(c, 0) + (top1[i] in correct[i] or top1[i] in unclear[i])
    return sum(right[c] / seen[c] for c in seen) / len(seen)


def test_multilabel_accuracy_matches_the_tfds_readme_loop_on_random_data():
    rng = np.random.default_rng(0)
    n, num_classes = 400, 12
    correct = [set(rng.choice(num_classes, rng.integers(0, 4), replace=False)) for _ in range(n)]
    unclear = [set(rng.choice(num_classes, rng.integers(0, 2), replace=False)) for _ in range(n)]
    original = rng.integers(0, num_classes, n)
    top1 = rng.integers(0, num_classes, n)
    problematic = rng.random(n) < 0.2
    got = metrics.multilabel_accuracy(top1, original, LabelSetArray.from_sets(correct, num_classes),
                                      LabelSetArray.from_sets(unclear, num_classes), problematic)
    assert got.mean == pytest.approx(_tfds_readme_multilabel(top1, original, correct, unclear,
                                                             problematic))


def test_subset_mask():
    assert metrics.subset_mask(np.array([3, 1, 4, 1]), np.array([1, 2])).tolist() == [
        False, True, False, True]


def test_align_pairs_names_and_refuses_duplicates():
    found, positions = metrics.align(["a", "b", "c"], ["c", "a"])
    assert found.tolist() == [0, 2] and positions.tolist() == [1, 0]
    with pytest.raises(ValueError, match="'a' appears more than once"):
        metrics.align(["a"], ["a", "a"])


def test_sets_from_mapping_in_the_given_order():
    label_sets = metrics.sets_from_mapping(["y", "x"], {"x": [1], "y": {2, 0}}, 3)
    assert label_sets.to_sets() == [frozenset({0, 2}), frozenset({1})]
    with pytest.raises(ValueError, match=r"^y: label 9 is outside \[0, 3\)"):
        metrics.sets_from_mapping(["x", "y"], {"x": [1], "y": [9]}, 3)
    with pytest.raises(KeyError, match="'z'"):
        metrics.sets_from_mapping(["z"], {"x": [1]}, 3)


def test_linear_fit_and_halves():
    fit = metrics.linear_fit(np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0, 5.0]))
    assert (fit.slope, fit.intercept, fit.r, fit.n) == pytest.approx((2.0, 1.0, 1.0, 3))
    # Lower half (x 1, 2): slope 1; upper half (x 3, 4): y 5 -> 7, slope 2.
    fits = metrics.accuracy_regression(np.array([4.0, 1.0, 3.0, 2.0]), np.array([7.0, 1.0, 5.0, 2.0]))
    assert fits["lower_half"].slope == pytest.approx(1.0)
    assert fits["upper_half"].slope == pytest.approx(2.0)
    assert fits["all"].n == 4 and fits["all"].x_range == (1.0, 4.0)
    with pytest.raises(ValueError, match="at least 2 points"):
        metrics.linear_fit(np.array([1.0]), np.array([1.0]))


def test_agreement_with_published_by_hand():
    from auditing.metrics import agreement_with_published

    scores = pd.DataFrame({"file_name": ["a", "a", "b"], "label": [1, 2, 3], "score": [0.9, 0.1, 0.95]})
    ours = {"a": frozenset({1}), "b": frozenset({3}), "c": frozenset({4})}
    published = {"a": frozenset({1, 2}), "b": frozenset({3}), "c": frozenset()}
    got = agreement_with_published(scores, ours, published, {"a": 2, "b": 3, "c": 4})
    assert got["question_agreement"] == pytest.approx(2 / 3)
    assert got["image_exact_match"] == pytest.approx(1 / 2)  # rated images a, b
    assert got["all_images_exact_match"] == pytest.approx(1 / 3)
    assert got["original_labels_real_accuracy_ours"] == pytest.approx(2 / 3)  # a misses, b and c hit
    assert got["original_labels_real_accuracy_published"] == pytest.approx(1.0)  # c excluded (empty)
    # An image without an original label (allowed by the report's align_inputs) is left
    # out of the original labels' accuracy; the agreement figures still count it.
    without_c = agreement_with_published(scores, ours, published, {"a": 2, "b": 3})
    assert without_c["original_labels_real_accuracy_ours"] == pytest.approx(1 / 2)  # a misses, b hits
    assert without_c["all_images_exact_match"] == pytest.approx(1 / 3)


def test_proposal_quality_leaves_out_empty_reference_sets():
    from auditing.metrics import LabelSetArray, proposal_quality

    proposed = LabelSetArray.from_sets([[1, 2, 3], [4], [5, 6]], 10)
    reference = LabelSetArray.from_sets([[1, 9], [4], []], 10)
    quality = proposal_quality(proposed, reference)
    assert (quality.n_images, quality.n_reference_labels, quality.n_proposed, quality.n_hits) == (2, 3, 4, 2)
    assert (quality.recall, quality.precision) == (2 / 3, 2 / 4)
    with pytest.raises(ValueError, match="3 proposed sets"):
        proposal_quality(proposed, reference.take([0, 1]))
