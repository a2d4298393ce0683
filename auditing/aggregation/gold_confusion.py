"""``gold-confusion``: rater matrices counted on gold questions, one posterior per question.

The recipe of the published ReaL scores (issue 11; ``scores.npz`` reproduced with
max |difference| 0.0 by ``tests/test_aggregation.py``):

1. For each rater r with gold answers, for truth t in {absent, present} and answer a in
   (no, maybe, yes): p_t[r, a] = (n_t[r, a] + alpha) / (N_t[r] + 3 alpha), counted on
   the gold questions (additive smoothing; ReaL: alpha = 1).
2. Raters without gold answers (or with gold answers on one truth only): the mean of
   the other raters' matrices (``raters_without_gold="mean"``, ReaL) or the matrix of
   all gold answers pooled as one rater (``"pooled"``). Pseudo-raters
   (``default_excludes``) take no part in either.
3. prior = P(present), the share of present gold questions unless given.
4. score = prior * prod p_present / (prior * prod p_present + (1 - prior) * prod p_absent)
   over the question's votes: one E-step, no EM.

Bit-exactness with the published floats needs the products taken in probability space,
one vote at a time in the order of the raters' first appearance in ``data`` (raters.npz
order for the ReaL votes, pseudo-raters appended last), and the prior multiplied in at
the end. Questions where both products underflow (hundreds of votes) fall back to log
space.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import attr
import numpy as np
import pandas as pd
import pydantic

from auditing.aggregation.truth import ABSENT, PRESENT
from auditing.aggregation.original_label_rater import OriginalLabelRaterParams
from auditing.votes import ANSWERS


class GoldConfusionParams(pydantic.BaseModel):
    """Parameters of ``gold-confusion`` (``stages.aggregate.params``)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    smoothing: float = pydantic.Field(1.0, ge=0)  # alpha, added to every (truth, answer) count
    raters_without_gold: Literal["mean", "pooled"] = "mean"
    prior: float | None = pydantic.Field(None, gt=0, lt=1)  # None: share of present gold questions
    original_label_rater: OriginalLabelRaterParams | None = None


@attr.s
class GoldConfusion:
    """crowd-kit-style aggregator: ``fit(data, gold, true_labels)``.

    ``data``: votes (task, worker, label = answer); ``gold``: gold answers (task,
    worker, label) on gold tasks; ``true_labels``: gold task -> ABSENT / PRESENT.
    Results: ``errors_`` ((worker, answer) x truth, each column a distribution per
    worker, as crowd-kit's ``DawidSkene.errors_``), ``probas_`` (task x truth),
    ``priors_``, ``labels_``, ``gold_answers_`` (worker -> number of gold answers;
    0 = matrix from the default).
    """

    smoothing: float = attr.ib(default=1.0)
    raters_without_gold: str = attr.ib(default="mean")
    prior: float | None = attr.ib(default=None)
    # Workers left out of the mean / pooled default (pseudo-raters such as the original label).
    default_excludes: Sequence[Hashable] = attr.ib(default=())
    answers: Sequence[str] = attr.ib(default=ANSWERS)

    errors_: pd.DataFrame = attr.ib(init=False)
    probas_: pd.DataFrame = attr.ib(init=False)
    priors_: pd.Series = attr.ib(init=False)
    labels_: pd.Series = attr.ib(init=False)
    gold_answers_: pd.Series = attr.ib(init=False)

    def fit(self, data: pd.DataFrame, gold: pd.DataFrame, true_labels: pd.Series) -> "GoldConfusion":
        workers = pd.unique(pd.concat([data["worker"], gold["worker"]], ignore_index=True))
        matrices, n_gold = self.rater_matrices(gold, true_labels, workers)
        self.gold_answers_ = pd.Series(n_gold, index=pd.Index(workers, name="worker"))
        self.errors_ = self._errors_frame(matrices, workers)
        prior = self.present_prior(true_labels)
        # np.unique(return_inverse=True), by hashing: sorting the votes' tasks costs ~4x more.
        task_codes, tasks = pd.factorize(data["task"].to_numpy(), sort=True)
        worker_codes = pd.Index(workers).get_indexer(data["worker"])
        answer_codes = self._answer_codes(data["label"])
        present = self.posterior(matrices, prior, len(tasks), task_codes, worker_codes, answer_codes)
        truths = pd.Index([ABSENT, PRESENT], name="label")
        self.probas_ = pd.DataFrame(np.stack([1.0 - present, present], axis=1),
                                    index=pd.Index(tasks, name="task"), columns=truths)
        self.priors_ = pd.Series([1.0 - prior, prior], index=truths)
        # crowd-kit's get_most_probable_labels, without importing crowd-kit (~2 s of scipy.stats).
        self.labels_ = (self.probas_.idxmax(axis="columns") if self.probas_.size
                        else pd.Series([], dtype="O"))
        return self

    def fit_predict_proba(self, data: pd.DataFrame, gold: pd.DataFrame, true_labels: pd.Series) -> pd.DataFrame:
        return self.fit(data, gold, true_labels).probas_

    def fit_predict(self, data: pd.DataFrame, gold: pd.DataFrame, true_labels: pd.Series) -> "pd.Series[Any]":
        return self.fit(data, gold, true_labels).labels_

    # ------------------------------------------------------------------ helpers

    def _answer_codes(self, answers: pd.Series) -> np.ndarray:
        codes = pd.Categorical(answers.astype(object), categories=list(self.answers)).codes
        if (codes < 0).any():
            bad = sorted(set(answers.astype(object)[codes < 0].astype(str)))[:5]
            raise ValueError(f"answers {bad} are not among {list(self.answers)}")
        return np.asarray(codes, dtype=np.int64)

    def present_prior(self, true_labels: pd.Series) -> float:
        """P(present): ``prior``, or the share of present gold tasks."""
        prior = self.prior if self.prior is not None else float(np.mean(true_labels.to_numpy() == PRESENT))
        if not 0 < prior < 1:
            raise ValueError(f"prior P(present) must be in (0, 1), got {prior} (no present or no absent gold?)")
        return prior

    def rater_matrices(self, gold: pd.DataFrame, true_labels: pd.Series, workers: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(workers, 2 truths, answers) probabilities and each worker's gold answers.
        ``workers`` in the order of their first appearance in the votes: the mean default
        is summed in that order (the sharded engine passes the same order, for the same floats)."""
        if self.raters_without_gold not in ("mean", "pooled"):
            raise ValueError(f"raters_without_gold must be 'mean' or 'pooled', got {self.raters_without_gold!r}")
        if self.smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {self.smoothing}")
        n_answers = len(self.answers)
        truth = true_labels.reindex(gold["task"]).to_numpy()
        if pd.isna(truth).any():
            raise ValueError("gold answers on tasks without a true label")
        worker = pd.Index(workers).get_indexer(gold["worker"])
        cell = (worker * 2 + truth.astype(np.int64)) * n_answers + self._answer_codes(gold["label"])
        counts = np.bincount(cell, minlength=len(workers) * 2 * n_answers).astype(np.float64)
        counts = counts.reshape(len(workers), 2, n_answers)
        n_gold = counts.sum(axis=(1, 2)).astype(np.int64)
        alpha = float(self.smoothing)
        with np.errstate(invalid="ignore", divide="ignore"):
            own = (counts + alpha) / (counts.sum(axis=2, keepdims=True) + alpha * n_answers)
        # Raters whose matrix defines the default: gold answers on both truths, not a pseudo-rater.
        both = (counts.sum(axis=2) > 0).all(axis=1)
        donors = both & ~np.isin(workers, np.asarray(list(self.default_excludes), dtype=object))
        if not donors.any():
            raise ValueError("no rater has gold answers on both present and absent gold questions")
        if self.raters_without_gold == "mean":
            default = own[donors].mean(axis=0)
        else:
            pooled = counts[donors].sum(axis=0)
            default = (pooled + alpha) / (pooled.sum(axis=1, keepdims=True) + alpha * n_answers)
        matrices = np.where(both[:, None, None], own, default[None])
        if not np.isfinite(matrices).all():
            raise ValueError("smoothing=0 leaves a rater's matrix undefined; use smoothing > 0")
        return matrices, n_gold

    def _errors_frame(self, matrices: np.ndarray, workers: np.ndarray) -> pd.DataFrame:
        index = pd.MultiIndex.from_product([workers, list(self.answers)], names=["worker", "label"])
        values = matrices.transpose(0, 2, 1).reshape(-1, 2)  # (worker, answer) x truth
        return pd.DataFrame(values, index=index, columns=pd.Index([ABSENT, PRESENT], name="label"))

    @staticmethod
    def posterior(matrices: np.ndarray, prior: float, n_tasks: int, task_codes: np.ndarray,
                   worker_codes: np.ndarray, answer_codes: np.ndarray) -> np.ndarray:
        """P(present) per task: the factors of each task's votes multiplied one at a time in
        worker-code order, the prior last (log space where both products underflow)."""
        # One vote at a time, in worker order: np.multiply.at is unbuffered and applies
        # the factors in array order, so each product is the sequential one.
        # The same order from a radix sort where the codes fit in 16 bits (~8x faster).
        narrow = np.int16 if len(matrices) <= np.iinfo(np.int16).max else np.int64
        order = np.argsort(np.asarray(worker_codes).astype(narrow, copy=False), kind="stable")
        tasks, workers, answers = task_codes[order], worker_codes[order], answer_codes[order]
        like_present, like_absent = np.ones(n_tasks), np.ones(n_tasks)
        np.multiply.at(like_present, tasks, matrices[workers, PRESENT, answers])
        np.multiply.at(like_absent, tasks, matrices[workers, ABSENT, answers])
        numerator = prior * like_present
        with np.errstate(invalid="ignore"):  # 0 / 0 where both underflow: replaced below
            score = numerator / (numerator + (1.0 - prior) * like_absent)
        underflow = (like_present == 0) & (like_absent == 0)
        if underflow.any():
            log_ratio = np.zeros(n_tasks)
            np.add.at(log_ratio, tasks, np.log(matrices[workers, PRESENT, answers])
                      - np.log(matrices[workers, ABSENT, answers]))
            log_odds = np.log(prior) - np.log1p(-prior) + log_ratio
            score[underflow] = 1.0 / (1.0 + np.exp(-log_odds[underflow]))
        return score
