"""auditing.cooccurrence: co-occurrence shares and the unbiased oracle."""
from __future__ import annotations

import numpy as np
import pytest

from auditing import cooccurrence, imagenet, labelsets, metrics, sources
from auditing.metrics import LabelSetArray

# Hand case over 4 classes:
#   image  original  set
#   0      0         {0, 1}      oracle image of class 0 (0 in set)
#   1      0         {0, 1, 2}   oracle image of class 0
#   2      0         {1}         not an oracle image (0 missing)
#   3      1         {1, 3}      oracle image of class 1
#   4      2         {}          nothing
ORIGINAL = np.array([0, 0, 0, 1, 2])
SETS = LabelSetArray.from_sets([[0, 1], [0, 1, 2], [1], [1, 3], []], 4)


def test_cooccurrence_counts_shares_and_top():
    co = cooccurrence.Cooccurrence().fit(ORIGINAL, SETS)
    assert co.support_.tolist() == [2, 1, 0, 0]
    assert co.counts_[0].tolist() == [2, 2, 1, 0]
    assert co.counts_[1].tolist() == [0, 1, 0, 1]
    assert co.shares_[0].tolist() == [1.0, 1.0, 0.5, 0.0]
    assert np.isnan(co.shares_[2]).all()
    # Itself excluded; zero shares are not "co-occurring".
    assert co.top(0) == [(1, 1.0), (2, 0.5)]
    assert co.top(0, k=1) == [(1, 1.0)]
    assert co.top(0, min_share=0.6) == [(1, 1.0)]
    assert co.top(1) == [(3, 1.0)]
    assert co.top(2) == []


def test_top_breaks_ties_by_lower_class_index():
    co = cooccurrence.Cooccurrence().fit(np.array([0]), LabelSetArray.from_sets([[0, 3, 2]], 4))
    assert co.top(0) == [(2, 1.0), (3, 1.0)]


def test_oracle_accuracy_is_mean_inverse_set_size_over_oracle_images():
    oracle = cooccurrence.oracle_accuracy(ORIGINAL, SETS)
    # class 0: images 0 and 1 -> (1/2 + 1/3) / 2 = 5/12; class 1: image 3 -> 1/2.
    assert oracle[:2] == pytest.approx([5 / 12, 1 / 2])
    assert np.isnan(oracle[2:]).all()
    assert cooccurrence.Cooccurrence().fit(ORIGINAL, SETS).oracle_accuracy_[:2] == pytest.approx(
        [5 / 12, 1 / 2])


def test_oracle_accuracy_equals_the_expectation_of_a_uniform_picker():
    rng = np.random.default_rng(1)
    n, num_classes = 300, 6
    original = rng.integers(0, num_classes, n)
    rows = [set(rng.choice(num_classes, rng.integers(0, 4), replace=False)) | (
        {int(original[i])} if rng.random() < 0.7 else set()) for i in range(n)]
    oracle = cooccurrence.oracle_accuracy(original, LabelSetArray.from_sets(rows, num_classes))
    for c in range(num_classes):
        # Expected hits of a picker choosing uniformly in the set, per image of class c
        # whose set holds c.
        chances = [1 / len(r) for r, o in zip(rows, original) if o == c and c in r]
        assert oracle[c] == pytest.approx(np.mean(chances))


def test_model_accuracy_on_oracle_images_and_classes_beating_the_oracle():
    top1 = np.array([0, 1, 0, 1, 2])
    # class 0: image 0 right, image 1 wrong (image 2 is not an oracle image) -> 0.5;
    # class 1: image 3 right -> 1.0.
    accuracy = cooccurrence.accuracy_on_oracle_images(top1, ORIGINAL, SETS)
    assert accuracy[:2].tolist() == [0.5, 1.0]
    co = cooccurrence.Cooccurrence().fit(ORIGINAL, SETS)
    table = cooccurrence.classes_beating_oracle(accuracy, co.oracle_accuracy_, co.support_)
    # margins: class 1: 1 - 1/2 = 0.5, class 0: 0.5 - 5/12 = 1/12.
    assert table["label"].tolist() == [1, 0]
    assert table["margin"].tolist() == pytest.approx([0.5, 1 / 12])
    assert table["n_images"].tolist() == [1, 2]


def test_fit_checks_the_number_of_original_labels():
    with pytest.raises(ValueError, match="expected 5 original labels"):
        cooccurrence.Cooccurrence().fit(np.array([0, 1]), SETS)


def test_desktop_computer_cooccurs_with_monitor_and_keyboard(shared_data):
    label_sets = labelsets.read_real_json(sources.fetch("real_labels", download=False))
    original = labelsets.read_label_tsv(shared_data / "derived" / "imagenet_val_labels_by_filename.tsv")
    sets = metrics.sets_from_mapping(original["file_name"].tolist(), label_sets, imagenet.NUM_CLASSES)
    co = cooccurrence.Cooccurrence().fit(original["label"].to_numpy(), sets)
    classes = imagenet.load_classes()
    desktop = classes.names.index("desktop computer")
    top_two = [classes.names[j] for j, _ in co.top(desktop, k=2)]
    assert top_two == ["monitor", "computer keyboard"]
    # A class with many co-occurring objects has a weak oracle; the average class does not.
    assert co.oracle_accuracy_[desktop] < 0.5 < np.nanmean(co.oracle_accuracy_)
