"""Expert evaluation on gold questions: by hand, and in-sample vs k-fold on the real files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from auditing import expert_evaluation, labelsets
from auditing import gold as gold_lib
from auditing.aggregation.methods import FoldGold, aggregate, gold_answers, validate_params
from tests.test_aggregation import _hand_built_crowd, _hand_built_gold, _votes
from tests.test_gold import real_gold, real_gold_paths, real_kept  # noqa: F401  (fixtures)
from tests.test_gold_aggregation import REAL_PARAMS


def test_precision_recall_f1_by_hand():
    truth = pd.DataFrame({"file_name": ["a", "a", "a", "b", "b"], "label": [1, 2, 3, 4, 5],
                          "truth": [True, True, False, True, False]})
    gold = gold_lib.Gold.from_frames(truth, _votes([("a", 1, "r", "yes")]))
    scores = expert_evaluation.evaluate_in_sample({"a": {1, 3}, "b": {4, 9}}, gold)
    # predicted present: a/1 (tp), a/3 (fp), b/4 (tp); a/2 missed (fn); b/5 (tn).
    assert (scores.true_positives, scores.false_positives, scores.false_negatives, scores.true_negatives) == (2, 1, 1, 1)
    assert scores.precision == pytest.approx(2 / 3) and scores.recall == pytest.approx(2 / 3)
    assert scores.f1 == pytest.approx(2 / 3) and scores.kind == "in-sample" and "optimistic" in scores.description
    with pytest.raises(ValueError, match="1 gold image\\(s\\) have no label set, e.g. \\['b'\\]"):
        expert_evaluation.evaluate_in_sample({"a": {1}}, gold)


def test_k_fold_folds_partition_the_gold_images_and_refit_without_them():
    gold = _hand_built_gold()
    folds = expert_evaluation.fold_images(gold, k=3, seed=1)
    assert sorted(np.concatenate(folds)) == sorted(gold.images) and [len(f) for f in folds] == [4, 3, 3]
    # Votes on the gold questions too, so that the held-out fold's questions are scored.
    crowd = pd.concat([_hand_built_crowd(), gold.rater_votes], ignore_index=True)
    original = pd.DataFrame({"file_name": pd.unique(crowd["file_name"]), "label": 0})
    scores = expert_evaluation.evaluate_k_fold(crowd, gold, method="gold-confusion", original_labels=original, k=3,
                                               seed=1)
    assert scores.kind == "k-fold" and scores.folds == 3 and "3-fold by image" in scores.description
    assert [f["images"] for f in scores.per_fold] == [4, 3, 3]
    assert scores.questions == 10 == sum(f["questions"] for f in scores.per_fold)
    assert scores.true_positives == sum(f["true_positives"] for f in scores.per_fold)
    with pytest.raises(ValueError, match="k must be in \\[2, 10\\]"):
        expert_evaluation.fold_images(gold, k=11)


@pytest.mark.parametrize("pseudo_rater", [None, {}])
def test_fold_gold_cuts_the_same_gold_tasks_as_each_folds_gold(pseudo_rater):
    """k-fold fits on tasks made once and cut per fold (FoldGold): the same scores, matrices
    and raters as fitting on each fold's gold subset (aggregate(gold=...))."""
    gold = _hand_built_gold()
    crowd = pd.concat([_hand_built_crowd(), gold.rater_votes], ignore_index=True)
    original = pd.DataFrame({"file_name": pd.unique(crowd["file_name"]), "label": 1})
    params = {"original_label_rater": pseudo_rater} if pseudo_rater is not None else {}
    spec = validate_params("gold-confusion", params)
    prepared = FoldGold.prepare(gold, original, spec.original_label_rater)
    folds = expert_evaluation.fold_images(gold, k=3, seed=1)
    for images in [*folds, np.array([], dtype=object), gold.images[:1]]:
        by_subset = aggregate(crowd, "gold-confusion", original_labels=original,
                              gold=gold.subset(images, keep=False), **params)
        by_cut = aggregate(crowd, "gold-confusion", original_labels=original,
                           gold_answers=prepared.without(set(images)), **params)
        pd.testing.assert_frame_equal(by_cut.scores_, by_subset.scores_, check_exact=True)
        pd.testing.assert_frame_equal(by_cut.model_.errors_, by_subset.model_.errors_, check_exact=True)
        assert list(by_cut.rater_ids_) == list(by_subset.rater_ids_)
        cut = prepared.without(set(images))
        made = gold_answers(gold.subset(images, keep=False), original, spec.original_label_rater)
        pd.testing.assert_frame_equal(cut.answers, made.answers)
        pd.testing.assert_series_equal(cut.true_labels, made.true_labels)
        assert cut.present_share == made.present_share and cut.pseudo_rater == made.pseudo_rater
    with pytest.raises(ValueError, match="no questions"):
        aggregate(crowd, "gold-confusion", original_labels=original, gold_answers=prepared.without(set(gold.images)),
                  **params)
    with pytest.raises(ValueError, match="not both"):
        aggregate(crowd, "gold-confusion", original_labels=original, gold=gold,
                  gold_answers=prepared.without(set()), **params)


def test_real_in_sample_and_k_fold(shared_data, real_kept, real_gold):
    """The published label sets on the 1,135 golden questions: P 0.898, R 0.778 in
    sample; 5-fold refits of gold-confusion: P 0.894, R 0.778 (measured)."""
    published = labelsets.read_real_json(shared_data / "reassessed_imagenet" / "real.json")
    in_sample = expert_evaluation.evaluate_in_sample(published, real_gold)
    assert in_sample.questions == 1135 and in_sample.true_positives + in_sample.false_negatives == 248
    assert (in_sample.true_positives, in_sample.false_positives) == (193, 22)
    original = labelsets.original_val_labels()
    k_fold = expert_evaluation.evaluate_k_fold(real_kept, real_gold, method="gold-confusion", params=REAL_PARAMS,
                                               original_labels=original, k=5)
    assert k_fold.questions == 1135 and len(k_fold.per_fold) == 5
    # Held out, the matrices lose the questions they are judged on: a little worse here.
    assert k_fold.f1 <= in_sample.f1 and abs(k_fold.f1 - in_sample.f1) < 0.02, (k_fold.f1, in_sample.f1)
    assert k_fold.as_dict()["kind"] == "k-fold" and in_sample.as_dict()["kind"] == "in-sample"


def test_fold_gold_cuts_the_real_gold_as_each_folds_gold(shared_data, real_gold):
    """On the 1,135 ReaL golden questions with the shipped original-label rater: each
    of the 5 folds' cut tasks are the tasks made from that fold's gold subset."""
    original = labelsets.original_val_labels()
    spec = validate_params("gold-confusion", REAL_PARAMS)
    prepared = FoldGold.prepare(real_gold, original, spec.original_label_rater)
    for images in expert_evaluation.fold_images(real_gold, k=5, seed=0):
        cut = prepared.without(set(images))
        made = gold_answers(real_gold.subset(images, keep=False), original, spec.original_label_rater)
        pd.testing.assert_frame_equal(cut.answers, made.answers)
        pd.testing.assert_series_equal(cut.true_labels, made.true_labels)
        assert cut.present_share == made.present_share and len(cut.true_labels) < len(prepared.answers.true_labels)
