"""``aggregate``: votes -> one score P(label present) per (image, label) question.

Methods by name (crowd-kit does the maths in each):

- ``dawid-skene`` (default): ``PresenceDawidSkene``, one 2 x 3 confusion matrix
  P(no/maybe/yes | absent/present) per rater, EM to convergence (see dawid_skene.py).
- ``majority-vote``: share of a question's votes that are yes or maybe.
- ``one-coin-dawid-skene``, ``glad``, ``mace``: crowd-kit's models on binary votes
  (yes, maybe -> present; no -> absent). They have one truth class per answer, so
  cannot keep the 3 answers apart under 2 truths; "maybe" goes with "yes" because in
  the ReaL votes it is evidence for presence (a question answered "maybe" by all 5
  raters is in the published labels 121 times out of 121).

Votes are passed to crowd-kit with integer task/worker codes (faster joins); results
are mapped back to (file_name, label) and rater ids.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd
from crowdkit.aggregation import GLAD, MACE, MajorityVote, OneCoinDawidSkene

from auditing.aggregation.dawid_skene import ABSENT, PRESENCE_OF_ANSWER, PRESENT, PresenceDawidSkene
from auditing.aggregation.label_sets import LabelSets, label_sets
from auditing.aggregation.priors import original_label_prior_groups, resolve_prior_classes
from auditing.votes import ANSWERS, REQUIRED_COLUMNS

DEFAULT_METHOD = "dawid-skene"
DEFAULT_THRESHOLD = 0.8
PRIORS = ("global", "original-label")


@dataclasses.dataclass
class CrowdData:
    """Votes in crowd-kit's long format plus the maps back to questions and raters."""

    data: pd.DataFrame  # task (int), worker (int), label (answer str)
    questions: pd.DataFrame  # row i = task i: file_name, label
    raters: np.ndarray  # worker code -> rater_id

    @classmethod
    def from_votes(cls, votes: pd.DataFrame) -> "CrowdData":
        missing = [c for c in REQUIRED_COLUMNS if c not in votes.columns]
        if missing:
            raise ValueError(f"votes lack column(s) {missing}")
        # Task codes in order of first appearance, matching drop_duplicates' order.
        task = votes.groupby(["file_name", "label"], sort=False).ngroup().to_numpy()
        questions = votes[["file_name", "label"]].drop_duplicates()
        worker, raters = pd.factorize(votes["rater_id"].to_numpy())
        answers = votes["answer"].astype(object).to_numpy()
        if not np.isin(answers, ANSWERS).all():
            raise ValueError(f"votes.answer has values outside {ANSWERS}; validate the votes first")
        data = pd.DataFrame({"task": task, "worker": worker, "label": answers})
        question_frame = pd.DataFrame({"file_name": questions["file_name"].to_numpy(dtype=object),
                                       "label": questions["label"].to_numpy(np.int64)})
        return cls(data, question_frame, np.asarray(raters, dtype=object))

    def binary(self) -> pd.DataFrame:
        return self.data.assign(label=self.data["label"].map(PRESENCE_OF_ANSWER).astype(np.int64))

    def task_groups(self, groups: pd.DataFrame) -> pd.Series:
        """(file_name, label, group) rows -> group per task code."""
        keyed = groups.set_index(["file_name", "label"])["group"]
        index = pd.MultiIndex.from_frame(self.questions[["file_name", "label"]])
        return pd.Series(keyed.reindex(index).to_numpy(), index=pd.RangeIndex(len(self.questions)))


@dataclasses.dataclass
class AggregationResult:
    """Scores of one aggregation run; ``label_sets`` applies the ReaL rule to them."""

    method: str
    threshold: float
    scores_: pd.DataFrame  # file_name, label, score = P(label present)
    model_: Any  # the fitted crowd-kit aggregator
    rater_ids_: np.ndarray  # crowd-kit worker code -> rater_id
    params: dict[str, Any]

    @property
    def n_iter_(self) -> int | None:
        return getattr(self.model_, "n_iter_", None)

    @property
    def errors_(self) -> pd.DataFrame | None:
        """Per-rater confusion matrices indexed by (rater_id, answer), DS methods only."""
        errors = getattr(self.model_, "errors_", None)
        if errors is None or not len(errors):
            return None
        workers = errors.index.get_level_values("worker").to_numpy()
        index = pd.MultiIndex.from_arrays([self.rater_ids_[workers], errors.index.get_level_values("label")],
                                          names=["rater_id", "answer"])
        return pd.DataFrame(errors.to_numpy(), index=index, columns=errors.columns).sort_index()

    def label_sets(self, original_labels: pd.DataFrame, threshold: float | None = None) -> LabelSets:
        return label_sets(self.scores_, original_labels,
                          self.threshold if threshold is None else threshold)


def rater_history_counts(rater_matrices: Mapping[str, np.ndarray], strength: float) -> pd.DataFrame:
    """Pseudo-counts from raters' known confusion matrices.

    ``rater_matrices``: rater (crowd-kit worker key) -> (2, 3) P(answer in (no, maybe, yes) | absent, present);
    ``strength``: how many votes each matrix is worth.
    """
    rows, values = [], []
    for rater, matrix in rater_matrices.items():
        for a, answer in enumerate(("no", "maybe", "yes")):
            rows.append((rater, answer))
            values.append([strength * matrix[ABSENT][a], strength * matrix[PRESENT][a]])
    return pd.DataFrame(values, index=pd.MultiIndex.from_tuples(rows, names=["worker", "label"]),
                        columns=pd.Index([ABSENT, PRESENT], name="label"))


def _dawid_skene(crowd: CrowdData, *, n_iter: int = 100, tol: float = 1e-5, smoothing: float = 1.0,
                 shrinkage: float = 0.0, prior_groups: pd.Series | None = None,
                 rater_history: Mapping[str, np.ndarray] | None = None,
                 rater_history_strength: float = 50.0) -> tuple[np.ndarray, Any]:
    history = None
    if rater_history is not None:
        # crowd-kit sees worker codes; the history is keyed by rater id.
        code_of = {str(rater): code for code, rater in enumerate(crowd.raters)}
        known = {code_of[str(r)]: m for r, m in rater_history.items() if str(r) in code_of}
        history = rater_history_counts(known, rater_history_strength) if known else None
    model = PresenceDawidSkene(n_iter=n_iter, tol=tol, smoothing=smoothing, shrinkage=shrinkage,
                               initial_truth=PRESENCE_OF_ANSWER, rater_pseudo_counts=history)
    probas = model.fit_predict_proba(crowd.data, prior_groups=prior_groups)
    return present_scores(probas, len(crowd.questions)), model


def _majority_vote(crowd: CrowdData) -> tuple[np.ndarray, Any]:
    model = MajorityVote()
    return present_scores(model.fit_predict_proba(crowd.binary()), len(crowd.questions)), model


def _one_coin(crowd: CrowdData, *, n_iter: int = 100, tol: float = 1e-5) -> tuple[np.ndarray, Any]:
    model = OneCoinDawidSkene(n_iter=n_iter, tol=tol)
    return present_scores(model.fit_predict_proba(crowd.binary()), len(crowd.questions)), model


def _glad(crowd: CrowdData, *, n_iter: int = 100, tol: float = 1e-5, **params: Any) -> tuple[np.ndarray, Any]:
    model = GLAD(n_iter=n_iter, tol=tol, **params)
    return present_scores(model.fit_predict_proba(crowd.binary()), len(crowd.questions)), model


def _mace(crowd: CrowdData, *, n_iter: int = 50, n_restarts: int = 1, random_state: int = 0,
          **params: Any) -> tuple[np.ndarray, Any]:
    # crowd-kit's default of 10 restarts costs ~4 min on the ReaL votes (1 restart ~25 s).
    model = MACE(n_iter=n_iter, n_restarts=n_restarts, random_state=random_state, **params)
    return present_scores(model.fit_predict_proba(crowd.binary()), len(crowd.questions)), model


def present_scores(probas: pd.DataFrame, n_tasks: int) -> np.ndarray:
    """P(present) per task code 0..n_tasks-1 from a crowd-kit probas frame."""
    if PRESENT not in probas.columns:  # nobody ever answered yes/maybe
        return np.zeros(n_tasks)
    return probas[PRESENT].reindex(pd.RangeIndex(n_tasks)).to_numpy(np.float64)


METHODS: dict[str, Callable[..., tuple[np.ndarray, Any]]] = {
    "dawid-skene": _dawid_skene,
    "majority-vote": _majority_vote,
    "one-coin-dawid-skene": _one_coin,
    "glad": _glad,
    "mace": _mace,
}


def aggregate(votes: pd.DataFrame, method: str = DEFAULT_METHOD, threshold: float = DEFAULT_THRESHOLD, *,
              prior: str = "global", prior_classes: str | Iterable[int] | None = None,
              original_labels: pd.DataFrame | None = None, prior_groups: pd.DataFrame | None = None,
              **params: Any) -> AggregationResult:
    """Score every (file_name, label) question of validated ``votes``.

    ``params`` go to the method (dawid-skene: n_iter, tol, smoothing, shrinkage toward
    the pooled rater matrix, see ``PresenceDawidSkene``). Class priors
    (dawid-skene only): ``prior="global"`` is one prior for all questions (votes
    alone); ``prior="original-label"`` gives questions about an image's original
    label their own prior, for labels in ``prior_classes`` (a WordNet id such as
    ``priors.ANIMAL_WNID``, class indices, or None = all), and needs
    ``original_labels`` (file_name, label). ``prior_groups`` (file_name, label, group)
    sets the groups directly.
    """
    if method not in METHODS:
        raise ValueError(f"unknown aggregation method {method!r}; expected one of {sorted(METHODS)}")
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; expected one of {PRIORS}")
    crowd = CrowdData.from_votes(votes)
    if prior == "original-label" and prior_groups is None:
        if original_labels is None:
            raise ValueError("prior='original-label' needs original_labels (file_name, label)")
        prior_groups = original_label_prior_groups(crowd.questions, original_labels,
                                                   resolve_prior_classes(prior_classes))
    if prior_groups is not None:
        if method != "dawid-skene":
            raise ValueError(f"class-prior groups are a dawid-skene option, not {method!r}")
        params["prior_groups"] = crowd.task_groups(prior_groups)
    scores, model = METHODS[method](crowd, **params)
    frame = crowd.questions.assign(score=scores)
    used = {k: v for k, v in params.items() if k != "prior_groups"} | {"prior": prior,
                                                                        "prior_classes": prior_classes}
    return AggregationResult(method=method, threshold=threshold, scores_=frame, model_=model,
                             rater_ids_=crowd.raters, params=used)


__all__ = ["ABSENT", "PRESENT", "AggregationResult", "CrowdData", "METHODS", "aggregate", "present_scores"]
