"""Dawid-Skene for presence questions: 2 truth classes x 3 answers, run to convergence.

crowd-kit's ``DawidSkene`` is the engine: its ``_m_step`` (weighted answer counts per
rater -> confusion matrices) and ``_e_step`` (log-likelihoods -> posteriors) are used
as they are. This subclass changes three things, each because the stock class is
wrong for ReaL-style votes (measured on the 924,810 ReaL votes, see
``benchmarks/aggregation_fidelity.py``):

1. Truth classes are not answers. Stock DS takes the truth classes to be the answer
   values, so "is X in the image?" answered no/maybe/yes gets a 3 x 3 confusion matrix
   with a latent class "maybe", and nothing says which truth means "present". Here the
   truth classes come from ``initial_truth`` (answer -> truth used to initialise):
   {no: absent, maybe: present, yes: present} gives one 2 x 3 matrix per rater,
   P(answer | absent) and P(answer | present). crowd-kit's M- and E-steps already work
   with rectangular matrices once the posteriors have 2 columns; only the
   initialisation has to produce them.
2. Stopping. Stock DS stops when its per-vote ELBO gains less than ``tol``; on the
   ReaL votes that happens after 2 iterations, far from the fixed point. Here EM stops
   when no posterior moves by more than ``tol`` (about 28 iterations on ReaL at 1e-5).
3. Smoothing and priors. ``smoothing`` pseudo-counts are added to every cell of every
   rater's matrix (a Dirichlet prior; crowd-kit's "addition" initial-error strategy),
   so a rater who never answered "maybe" does not get log(1e-10) for it. ``fit`` takes
   optional ``prior_groups`` (task -> group): the class prior is then estimated per
   group instead of once for all questions (see ``aggregation.priors``).
4. Shrinkage (optional, ``shrinkage`` in [0, 1], default 0): after each M-step every
   rater's matrix becomes ``(1 - shrinkage) * own + shrinkage * pooled``, pooled =
   the matrix of all votes taken as one rater (crowd-kit's M-step on them). A
   fixed share, not a Dirichlet prior: the pull does not fade with a rater's volume.
   Why: the published ReaL matrices are less extreme than the EM fixed point on
   these votes (see ``benchmarks/aggregation_fidelity.py``); 0.3 was chosen offline
   by measurement against the published labels (flat optimum over 0.15..0.5).

5. Gold (optional, ``fit(..., true_labels=, initial_error=)``, crowd-kit's names):
   ``true_labels`` (task -> truth) holds the gold tasks' posteriors fixed at their
   truth in every iteration (crowd-kit's ``_correct_probas_with_golden``), so gold
   answers count in every M-step; gold tasks get a class prior of their own, so they
   do not move the voted questions' prior. ``initial_error`` ((worker, answer) x
   truth probabilities, e.g. ``GoldConfusion.errors_``) replaces the majority-vote
   initialisation with one E-step under those matrices.

With ``initial_truth=None`` the truth classes are the answers, as in the 1979 paper;
only the stopping rule, smoothing and priors differ from the stock class.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import attr
import numpy as np
import pandas as pd
from crowdkit.aggregation import DawidSkene, MajorityVote
from crowdkit.aggregation.utils import get_most_probable_labels

_GOLD_GROUP = "__gold__"


@attr.s
class PresenceDawidSkene(DawidSkene):
    """Dawid-Skene EM with truth classes given by ``initial_truth``; crowd-kit API.

    ``fit(data, prior_groups=None)``: ``data`` has crowd-kit's columns task, worker,
    label (label = the answer). Results: ``probas_`` (task x truth class),
    ``labels_``, ``errors_`` ((worker, answer) x truth class, columns sum to 1 per
    worker), ``priors_`` (per task when grouped, else per class), ``n_iter_``,
    ``converged_`` and ``loss_history_`` (here: the largest posterior change of each
    iteration, the quantity compared with ``tol``).
    """

    n_iter: int = attr.ib(default=100)
    tol: float = attr.ib(default=1e-5)
    smoothing: float = attr.ib(default=1.0)
    initial_truth: Mapping[Hashable, Hashable] | None = attr.ib(default=None)
    shrinkage: float = attr.ib(default=0.0)
    # Raters' history: Dirichlet pseudo-counts ((worker, answer) x truth) added to
    # their counts in every M-step (crowd-kit's initial_error, 'addition'), e.g. matrices
    # measured on earlier audits. Without it a small audit (a few hundred votes) lets
    # EM collapse to "nothing is present".
    rater_pseudo_counts: pd.DataFrame | None = attr.ib(default=None)

    n_iter_: int = attr.ib(init=False, default=0)
    converged_: bool = attr.ib(init=False, default=False)

    def fit(self, data: pd.DataFrame, prior_groups: pd.Series | None = None,  # type: ignore[override]
            true_labels: pd.Series | None = None, initial_error: pd.DataFrame | None = None
            ) -> "PresenceDawidSkene":
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        data = data[["task", "worker", "label"]]
        if not data.size:
            self.probas_, self.priors_ = pd.DataFrame(), pd.Series(dtype=float)
            self.errors_, self.labels_ = pd.DataFrame(), pd.Series(dtype=float)
            self.loss_history_, self.n_iter_, self.converged_ = [], 0, True
            return self
        truth_of = self._truth_map(data)
        truths = sorted(set(truth_of.values()))
        # Initialisation: majority vote over the answers mapped to truth classes.
        probas = MajorityVote().fit_predict_proba(data.assign(label=data["label"].map(truth_of)))
        probas = probas.reindex(columns=truths, fill_value=0.0)
        probas.columns = pd.Index(truths, name="label")
        groups = self._task_groups(probas.index, prior_groups, true_labels)
        if initial_error is not None:  # one E-step under the given matrices instead
            seed_prior = self._priors(self._fix_gold(probas, true_labels), groups)
            probas = self._e_step(data, seed_prior, initial_error).reindex(index=probas.index, columns=truths)
            probas.columns = pd.Index(truths, name="label")
        probas = self._fix_gold(probas, true_labels)
        pseudo_counts = self._pseudo_counts(data, truth_of, truths)
        strategy = "addition" if pseudo_counts is not None else None

        self.loss_history_, self.converged_ = [], False
        priors = self._priors(probas, groups)
        errors = self._shrunk_m_step(data, probas, pseudo_counts, strategy)
        for iteration in range(1, self.n_iter + 1):
            new = self._e_step(data, priors, errors).reindex(index=probas.index, columns=truths)
            new.columns = probas.columns
            new = self._fix_gold(new, true_labels)
            change = float(np.abs(new.to_numpy() - probas.to_numpy()).max())
            probas = new
            priors = self._priors(probas, groups)
            errors = self._shrunk_m_step(data, probas, pseudo_counts, strategy)
            self.loss_history_.append(change)
            self.n_iter_ = iteration
            if change < self.tol:
                self.converged_ = True
                break
        self.probas_, self.priors_, self.errors_ = probas, priors, errors
        self.labels_ = get_most_probable_labels(probas)
        return self

    def fit_predict_proba(self, data: pd.DataFrame, prior_groups: pd.Series | None = None,  # type: ignore[override]
                          true_labels: pd.Series | None = None, initial_error: pd.DataFrame | None = None
                          ) -> pd.DataFrame:
        self.fit(data, prior_groups, true_labels, initial_error)
        return self.probas_

    def fit_predict(self, data: pd.DataFrame, prior_groups: pd.Series | None = None,  # type: ignore[override]
                    true_labels: pd.Series | None = None, initial_error: pd.DataFrame | None = None
                    ) -> "pd.Series[Any]":
        self.fit(data, prior_groups, true_labels, initial_error)
        return self.labels_

    # ------------------------------------------------------------------ helpers

    def _shrunk_m_step(self, data: pd.DataFrame, probas: pd.DataFrame, pseudo_counts: pd.DataFrame | None,
                       strategy: str | None) -> pd.DataFrame:
        """crowd-kit's M-step, then each rater's matrix mixed with the pooled one."""
        errors = self._m_step(data, probas, pseudo_counts, strategy)
        if self.shrinkage == 0.0:
            return errors
        pooled = self._m_step(data.assign(worker=0), probas).droplevel("worker")
        # Every (worker, answer) cell, answers a worker never gave included (they are
        # absent without smoothing), so each mixed column stays a distribution.
        workers = errors.index.get_level_values("worker").unique()
        full = pd.MultiIndex.from_product([workers, pooled.index], names=errors.index.names)
        errors = errors.reindex(full, fill_value=0.0)
        answers = errors.index.get_level_values("label")
        pooled = pooled.reindex(index=answers, columns=errors.columns, fill_value=0.0).to_numpy()
        return errors * (1.0 - self.shrinkage) + pooled * self.shrinkage

    def _truth_map(self, data: pd.DataFrame) -> dict[Hashable, Hashable]:
        answers = pd.unique(data["label"])
        if self.initial_truth is None:
            return {a: a for a in answers}
        unmapped = [a for a in answers if a not in self.initial_truth]
        if unmapped:
            raise ValueError(f"answers {unmapped[:5]} have no entry in initial_truth {dict(self.initial_truth)}")
        return dict(self.initial_truth)

    def _pseudo_counts(self, data: pd.DataFrame, truth_of: Mapping[Hashable, Hashable],
                       truths: list[Hashable]) -> pd.DataFrame | None:
        """``smoothing`` for every (worker, answer) x truth cell, answers never given
        by a worker included, so each matrix column is a smoothed distribution."""
        if self.smoothing <= 0 and self.rater_pseudo_counts is None:
            return None
        answers = sorted(set(pd.unique(data["label"])) | set(truth_of), key=str)
        index = pd.MultiIndex.from_product([pd.unique(data["worker"]), answers], names=["worker", "label"])
        counts = pd.DataFrame(max(self.smoothing, 0.0), index=index, columns=pd.Index(truths, name="label"))
        if self.rater_pseudo_counts is not None:
            history = self.rater_pseudo_counts.reindex(index=index, columns=counts.columns).fillna(0.0)
            counts = counts + history.to_numpy()
        return counts

    @staticmethod
    def _fix_gold(probas: pd.DataFrame, true_labels: pd.Series | None) -> pd.DataFrame:
        """Gold tasks' posteriors = their truth (one-hot)."""
        if true_labels is None or not len(true_labels):
            return probas
        gold = true_labels.reindex(probas.index)
        known = gold.notna().to_numpy()
        values = probas.to_numpy(copy=True)
        values[known] = (gold[known].to_numpy()[:, None] == probas.columns.to_numpy()[None, :]).astype(float)
        return pd.DataFrame(values, index=probas.index, columns=probas.columns)

    @staticmethod
    def _task_groups(tasks: pd.Index, prior_groups: pd.Series | None, true_labels: pd.Series | None = None
                     ) -> np.ndarray | None:
        """Prior group codes per task; gold tasks form a group of their own."""
        gold = (true_labels.reindex(tasks).notna().to_numpy() if true_labels is not None and len(true_labels)
                else None)
        if prior_groups is None and gold is None:
            return None
        if prior_groups is None:
            prior_groups = pd.Series("all", index=tasks)
        aligned = prior_groups.reindex(tasks).astype(object)
        if gold is not None:
            aligned = aligned.where(~gold, _GOLD_GROUP)
        if aligned.isna().any():
            missing = list(tasks[aligned.isna().to_numpy()][:3])
            raise ValueError(f"prior_groups has no group for {int(aligned.isna().sum())} task(s), e.g. {missing}")
        return pd.factorize(aligned)[0]

    @staticmethod
    def _priors(probas: pd.DataFrame, groups: np.ndarray | None) -> pd.Series | pd.DataFrame:
        """Class prior = mean posterior, over all tasks or within each task's group.
        A per-task DataFrame broadcasts in crowd-kit's E-step like its Series does."""
        if groups is None:
            return probas.mean()
        values = probas.to_numpy()
        sums = np.stack([np.bincount(groups, weights=values[:, k]) for k in range(values.shape[1])], axis=1)
        means = sums / np.bincount(groups)[:, None]
        return pd.DataFrame(means[groups], index=probas.index, columns=probas.columns)

