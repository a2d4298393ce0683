"""Aggregation: the DS engine against crowd-kit and known results, the label-set rule,
and fidelity to the published ReaL labels on the real votes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from crowdkit.aggregation import DawidSkene, MajorityVote

from auditing import aggregation, labelsets, sources, votes
from auditing import gold as gold_lib
from auditing.aggregation import PresenceDawidSkene


def _votes(rows):
    frame = pd.DataFrame(rows, columns=["file_name", "label", "rater_id", "answer"])
    return frame.astype({"label": "int64", "answer": votes.ANSWER_DTYPE})


# ------------------------------------------------------------------ label sets


def test_label_sets_rule_unrated_keeps_original_and_empty_sets_are_counted():
    scores = pd.DataFrame({"file_name": ["a", "a", "a", "b", "b", "z"], "label": [1, 2, 3, 4, 5, 6],
                           "score": [0.95, 0.8, 0.81, 0.1, 0.79, 0.9]})
    original = pd.DataFrame({"file_name": ["a", "b", "c"], "label": [1, 4, 7]})
    sets = aggregation.label_sets(scores, original, threshold=0.8)
    assert sets == {"a": {1, 3}, "b": frozenset(), "c": {7}, "z": {6}}  # 0.8 itself is not > 0.8
    assert list(sets) == ["a", "b", "c", "z"]
    assert sets.counts == {"images": 4, "labels": 4, "rated_images": 3, "unrated_kept_original": 1,
                           "rated_without_original": 1, "empty_sets": 1, "threshold": 0.8}
    assert sets.to_frame().values.tolist() == [["a", 1], ["a", 3], ["c", 7], ["z", 6]]


def test_aggregation_result_label_sets_use_its_threshold():
    rows = [("a", 1, f"r{i}", "yes") for i in range(3)] + [("a", 2, f"r{i}", "no") for i in range(3)]
    result = aggregation.aggregate(_votes(rows), threshold=0.5)
    original = pd.DataFrame({"file_name": ["a", "b"], "label": [2, 9]})
    assert result.label_sets(original) == {"a": {1}, "b": {9}}


# ----------------------------------------------------------- the DS engine


def _hand_built_crowd() -> pd.DataFrame:
    """Raters r0..r2 answer truthfully (maybe when present half of the time); r3
    always says yes. Questions 0..5 present, 6..19 absent."""
    rows = []
    for q in range(20):
        present = q < 6
        for r in range(3):
            answer = ("maybe" if (q + r) % 2 else "yes") if present else "no"
            rows.append((f"img{q}", q, f"r{r}", answer))
        rows.append((f"img{q}", q, "r3", "yes"))
    return _votes(rows)


def _hand_built_gold() -> gold_lib.Gold:
    """10 gold questions (gold0..3 present): r0 answers them right with yes / no, r1
    with maybe / no, r3 says yes to all; r2 answered none."""
    truth = pd.DataFrame({"file_name": [f"gold{k}" for k in range(10)], "label": range(10),
                          "truth": [k < 4 for k in range(10)]})
    rows = []
    for k in range(10):
        present = k < 4
        rows += [(f"gold{k}", k, "r0", "yes" if present else "no"), (f"gold{k}", k, "r1", "maybe" if present else "no"),
                 (f"gold{k}", k, "r3", "yes")]
    return gold_lib.Gold.from_frames(truth, _votes(rows))


def test_presence_ds_learns_2x3_matrices_and_ignores_a_rater_who_always_says_yes():
    result = aggregation.aggregate(_hand_built_crowd())
    scores = result.scores_.set_index("label")["score"]
    assert (scores.loc[:5] > 0.99).all() and (scores.loc[6:] < 0.01).all()
    errors = result.errors_
    assert list(errors.columns) == [aggregation.ABSENT, aggregation.PRESENT]  # 2 truths
    assert set(errors.index.get_level_values("answer")) == set(votes.ANSWERS)  # x 3 answers
    np.testing.assert_allclose(errors.groupby("rater_id").sum().to_numpy(), 1.0)
    # Evidence of an answer = log P(answer | present) / P(answer | absent).
    evidence = np.log(errors[aggregation.PRESENT] / errors[aggregation.ABSENT])
    assert abs(evidence.loc[("r3", "yes")]) < 0.2  # the spammer's yes says nothing
    assert evidence.loc[("r0", "yes")] > 1.5 and evidence.loc[("r0", "no")] < -1.5
    assert result.model_.converged_ and result.n_iter_ < 100


def test_presence_ds_without_smoothing_is_crowdkit_ds_run_to_convergence(shared_data):
    """The 1979 anaesthesia data (4 classes, rater 1 rated each patient 3 times): with
    square matrices and no smoothing the subclass is crowd-kit's EM step for step,
    and gives Dawid & Skene's published class proportions (0.40, 0.42, 0.11, 0.07)."""
    data = pd.read_csv(shared_data / "rater_r_pkg" / "anesthesia.csv").rename(
        columns={"item": "task", "rater": "worker", "rating": "label"})
    ours = PresenceDawidSkene(n_iter=50, tol=0.0, smoothing=0.0, initial_truth=None).fit(data)
    stock = DawidSkene(n_iter=50, tol=-np.inf).fit(data)
    np.testing.assert_allclose(ours.probas_.sort_index().to_numpy(), stock.probas_.sort_index().to_numpy(),
                               atol=1e-8)
    np.testing.assert_allclose(ours.priors_.sort_index().to_numpy(), [0.40, 0.42, 0.11, 0.07], atol=0.005)
    early = DawidSkene(n_iter=50).fit(data)  # the stock ELBO stopping rule
    assert len(early.loss_history_) < ours.n_iter_


@pytest.mark.parametrize("dataset", ["d_Duck_Identification", "d_jn-product"])
def test_binary_crowd_truth_accuracy_against_truth_and_crowdkit(shared_data, dataset):
    folder = shared_data / "crowd_truth_infer" / dataset
    answers = pd.read_csv(folder / "answer.csv")
    truth = pd.read_csv(folder / "truth.csv").set_index("question")["truth"]
    # As presence votes: answer 1 = yes, 0 = no.
    crowd = _votes(list(zip(answers["question"].astype(str), np.zeros(len(answers), int),
                            answers["worker"].astype(str), np.where(answers["answer"] == 1, "yes", "no"))))
    result = aggregation.aggregate(crowd)
    ours = pd.Series((result.scores_["score"] > 0.5).astype(int).to_numpy(),
                     index=result.scores_["file_name"].to_numpy()).reindex(truth.index.astype(str)).to_numpy()
    data = answers.rename(columns={"question": "task", "answer": "label"})
    stock = DawidSkene(n_iter=100, tol=-np.inf).fit_predict(data).reindex(truth.index).to_numpy()
    majority = MajorityVote().fit_predict(data).reindex(truth.index).to_numpy()
    accuracy = {name: float((labels == truth.to_numpy()).mean()) for name, labels in
                (("ours", ours), ("stock", stock), ("majority", majority))}
    assert accuracy["ours"] > accuracy["majority"], accuracy
    assert accuracy["ours"] >= accuracy["stock"] - 0.005, accuracy


# ------------------------------------------------------------- method registry


def test_shrinkage_mixes_each_rater_matrix_with_the_pooled_one():
    crowd = _hand_built_crowd()
    own = aggregation.aggregate(crowd, smoothing=0.0).errors_
    pooled = aggregation.aggregate(crowd, smoothing=0.0, shrinkage=1.0).errors_
    # shrinkage=1: every rater gets the same (pooled) matrix, a proper distribution per truth.
    per_rater = pooled.unstack("answer")
    np.testing.assert_allclose(per_rater.to_numpy(), np.broadcast_to(per_rater.iloc[[0]], per_rater.shape))
    np.testing.assert_allclose(pooled.groupby("rater_id").sum().to_numpy(), 1.0)
    half = aggregation.aggregate(crowd, smoothing=0.0, shrinkage=0.5)
    # The spammer r3 (always yes) sits between its own matrix and the pooled one, so its
    # yes becomes evidence of presence (pooled yes is), less than a truthful rater's.
    evidence = np.log(half.errors_[aggregation.PRESENT] / half.errors_[aggregation.ABSENT])
    own_evidence = np.log(own[aggregation.PRESENT] / own[aggregation.ABSENT])
    assert abs(own_evidence.loc[("r3", "yes")]) < 0.2 < evidence.loc[("r3", "yes")] < evidence.loc[("r0", "yes")]
    scores = half.scores_.set_index("label")["score"]
    assert (scores.loc[:5] > 0.9).all() and (scores.loc[6:] < 0.1).all()
    with pytest.raises(aggregation.AggregationParamsError, match="parameter 'shrinkage' of aggregation method 'dawid-skene'"):
        aggregation.aggregate(crowd, shrinkage=1.5)


@pytest.mark.parametrize("method", sorted(aggregation.METHODS))
def test_every_method_scores_every_question(method):
    crowd = _hand_built_crowd()
    params = {"n_restarts": 1} if method == "mace" else {}
    gold = _hand_built_gold() if method in aggregation.methods.NEEDS_GOLD else None
    result = aggregation.aggregate(crowd, method=method, gold=gold, **params)
    scores = result.scores_
    assert len(scores) == 20 and scores["score"].between(0, 1).all()
    assert scores.loc[scores["label"] < 6, "score"].min() > scores.loc[scores["label"] >= 6, "score"].max()


def test_bad_method_and_prior_arguments_are_errors():
    crowd = _hand_built_crowd()
    with pytest.raises(ValueError, match="unknown aggregation method 'ds'"):
        aggregation.aggregate(crowd, method="ds")
    with pytest.raises(ValueError, match="needs original_labels"):
        aggregation.aggregate(crowd, prior="original-label")
    original = pd.DataFrame({"file_name": [f"img{q}" for q in range(20)], "label": range(20)})
    with pytest.raises(aggregation.AggregationParamsError, match="unknown parameter 'prior' for aggregation method "
                                                                 "'glad'; valid: n_iter, tol, m_step_max_iter"):
        aggregation.aggregate(crowd, method="glad", prior="original-label", original_labels=original)
    with pytest.raises(ValueError, match="dawid-skene options, not 'glad'"):
        aggregation.aggregate(crowd, method="glad", prior_groups=original.assign(group="g"))
    with pytest.raises(ValueError, match="gold-confusion needs gold questions"):
        aggregation.aggregate(crowd, method="gold-confusion")


def test_original_label_prior_groups():
    questions = pd.DataFrame({"file_name": ["a", "a", "a", "b"], "label": [1, 2, 500, 500]})
    original = pd.DataFrame({"file_name": ["a", "b"], "label": [1, 500]})
    groups = aggregation.original_label_prior_groups(questions, original, classes=range(398))
    assert groups["group"].tolist() == ["original", "proposed", "shared", "shared"]
    groups = aggregation.original_label_prior_groups(questions, original)
    assert groups["group"].tolist() == ["original", "proposed", "proposed", "original"]


# ------------------------------------------------------------- the ReaL votes


def _agreement(scores: pd.DataFrame, published: dict[str, frozenset[int]], threshold: float = 0.8
               ) -> tuple[float, float]:
    positive = np.array([label in published[f] for f, label in zip(scores["file_name"], scores["label"])])
    ours = scores["score"].to_numpy() > threshold
    per_image = pd.Series(ours == positive).groupby(scores["file_name"].to_numpy()).all()
    return float((ours == positive).mean()), float(per_image.mean())


@pytest.mark.slow
def test_real_votes_agree_with_published_labels(real_raters_path):
    """Regression guard on the fidelity figures (see benchmarks/aggregation_fidelity.py):
    the published labels are read only here, to measure."""
    kept = votes.read_real_votes(real_raters_path).kept
    published = labelsets.read_real_json(sources.fetch("real_labels", download=False))
    original = labelsets.original_val_labels()
    plain = aggregation.aggregate(kept)
    grouped = aggregation.aggregate(kept, prior="original-label", prior_classes=range(398),
                                    original_labels=original)
    per_question, per_image = _agreement(plain.scores_, published)
    assert per_question > 0.982 and per_image > 0.88, (per_question, per_image)
    per_question, per_image = _agreement(grouped.scores_, published)
    assert per_question > 0.988 and per_image > 0.92, (per_question, per_image)
    # Shrinkage toward the pooled matrix (0.3, benchmarks/aggregation_fidelity.py) must
    # keep its measured gain over the unshrunk model: 98.98% / 92.89% vs 98.86% / 92.10%.
    shrunk = aggregation.aggregate(kept, prior="original-label", prior_classes=range(398),
                                   original_labels=original, shrinkage=0.3)
    shrunk_question, shrunk_image = _agreement(shrunk.scores_, published)
    assert shrunk_question > per_question + 0.0005 and shrunk_image > per_image + 0.004, (
        shrunk_question, shrunk_image, per_question, per_image)
    sets = grouped.label_sets(original)
    assert sets.counts["rated_images"] == 24_889 and sets.counts["unrated_kept_original"] == 50_000 - 24_889


def test_no_votes_score_nothing_and_every_image_keeps_its_original_label():
    result = aggregation.aggregate(votes.empty_votes())
    assert result.scores_.empty
    sets = result.label_sets(pd.DataFrame({"file_name": ["a", "b"], "label": [3, 4]}))
    assert sets == {"a": {3}, "b": {4}} and sets.counts["unrated_kept_original"] == 2
