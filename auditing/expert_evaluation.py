"""Evaluation of label sets against the experts, on the gold questions.

A gold question (file_name, label) is predicted present iff label is in the image's
label set; the experts' truth (``Gold.truth``) says whether it is. Precision, recall
and F1 of "present" over the gold questions.

Two kinds, always labelled (``ExpertScores.kind``):

- ``in-sample``: the released label sets as they are. When the gold questions also
  fitted the rater matrices (gold-confusion, dawid-skene with gold) this is optimistic:
  the raters were judged on the very questions now scored.
- ``k-fold``: the gold split by image into k folds; for each fold the method is fitted
  on the other folds' gold only and scored on the fold's questions; counts summed over
  folds (micro average), per-fold figures kept.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import pandas as pd

from auditing.aggregation import aggregate, label_sets
from auditing.aggregation.methods import NEEDS_GOLD, FoldGold, validate_params
from auditing.gold import Gold, PresenceRule

PER_QUESTION_METHODS = frozenset({"gold-confusion", "majority-vote"})
IN_SAMPLE = "in-sample"
K_FOLD = "k-fold"


@dataclasses.dataclass(frozen=True)
class ExpertScores:
    """P / R / F1 of "present" on gold questions; ``kind`` says in-sample or k-fold."""

    kind: str
    description: str
    questions: int
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int
    folds: int | None = None
    per_fold: tuple[dict[str, Any], ...] = ()

    @property
    def precision(self) -> float:
        predicted = self.true_positives + self.false_positives
        return self.true_positives / predicted if predicted else float("nan")

    @property
    def recall(self) -> float:
        present = self.true_positives + self.false_negatives
        return self.true_positives / present if present else float("nan")

    @property
    def f1(self) -> float:
        denominator = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / denominator if denominator else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "description": self.description, "questions": self.questions,
                "precision": self.precision, "recall": self.recall, "f1": self.f1,
                "true_positives": self.true_positives, "false_positives": self.false_positives,
                "false_negatives": self.false_negatives, "true_negatives": self.true_negatives,
                "folds": self.folds, "per_fold": list(self.per_fold)}


def _counts(sets: Mapping[str, Collection[int]], truth: pd.DataFrame) -> dict[str, int]:
    predicted = np.array([int(label) in sets.get(name, ()) for name, label in zip(truth["file_name"], truth["label"])],
                         dtype=bool)
    present = truth["truth"].to_numpy(bool)
    return {"questions": len(truth), "true_positives": int((predicted & present).sum()),
            "false_positives": int((predicted & ~present).sum()),
            "false_negatives": int((~predicted & present).sum()),
            "true_negatives": int((~predicted & ~present).sum())}


def evaluate_in_sample(sets: Mapping[str, Collection[int]], gold: Gold, rule: PresenceRule | None = None,
                       gold_fitted: bool = True) -> ExpertScores:
    """``sets`` (file_name -> labels, e.g. the release's) on every gold question.
    ``gold_fitted``: whether the same gold fitted the method (says so in the description)."""
    truth = gold.truth(rule)
    missing = sorted(set(truth["file_name"]) - set(sets))
    if missing:
        raise ValueError(f"{len(missing)} gold image(s) have no label set, e.g. {missing[:3]}")
    why = ("the same gold questions fitted the rater matrices: optimistic" if gold_fitted
           else "the method did not use the gold questions")
    return ExpertScores(kind=IN_SAMPLE, description=f"released label sets on all gold questions ({why})",
                        **_counts(sets, truth))


def fold_images(gold: Gold, k: int, seed: int = 0) -> list[np.ndarray]:
    """The gold images split into ``k`` folds (shuffled with ``seed``, sizes differ by <= 1)."""
    images = np.sort(gold.images.astype(str))
    if not 2 <= k <= len(images):
        raise ValueError(f"k must be in [2, {len(images)}] (the number of gold images), got {k}")
    return [np.sort(f) for f in np.array_split(np.random.default_rng(seed).permutation(images), k)]


def evaluate_k_fold(votes: pd.DataFrame, gold: Gold, *, method: str, original_labels: pd.DataFrame,
                    params: Mapping[str, Any] | None = None, k: int = 5, seed: int = 0, threshold: float = 0.8,
                    rule: PresenceRule | None = None) -> ExpertScores:
    """Fit ``method`` (``params``) with the gold of k - 1 folds, score the held-out
    fold's gold questions; counts summed over the k folds."""
    params = dict(params or {})
    totals = dict.fromkeys(("questions", "true_positives", "false_positives", "false_negatives", "true_negatives"), 0)
    per_fold = []
    per_question = method in PER_QUESTION_METHODS
    if per_question:
        # gold-confusion scores each question from its own votes and the gold matrices
        # alone, so the held-out images' votes suffice (k times less work), and the
        # original labels of the gold images (held out or fitting); EM methods couple
        # all questions and get every vote.
        on_gold = set(gold.images)
        votes = votes.loc[votes["file_name"].isin(on_gold)]
        original_labels = original_labels.loc[original_labels["file_name"].isin(on_gold)]
    # The gold's tasks made once and cut per fold: per fold, making them from the fold's
    # gold (joins on file name and label) cost more than the fit itself.
    prepared = (FoldGold.prepare(gold, original_labels, validate_params(method, params).original_label_rater)
                if method in NEEDS_GOLD else None)
    truth = gold.truth(rule)
    for number, images in enumerate(fold_images(gold, k, seed)):
        held_out = set(images)
        fold_votes = votes.loc[votes["file_name"].isin(held_out)] if per_question else votes
        fit_gold = {"gold_answers": prepared.without(held_out)} if prepared is not None \
            else {"gold": gold.subset(images, keep=False)}
        result = aggregate(fold_votes, method, threshold, original_labels=original_labels, **fit_gold, **params)
        scores = result.scores_.loc[result.scores_["file_name"].isin(held_out)]
        originals = original_labels.loc[original_labels["file_name"].isin(held_out)]
        counts = _counts(label_sets(scores, originals, threshold), truth.loc[truth["file_name"].isin(held_out)])
        fold = ExpertScores(kind=K_FOLD, description="", **counts)
        per_fold.append({"fold": number, "images": len(images), **counts, "precision": fold.precision,
                         "recall": fold.recall, "f1": fold.f1})
        for key in totals:
            totals[key] += counts[key]
    return ExpertScores(kind=K_FOLD, description=(f"{k}-fold by image (seed {seed}): rater matrices fitted without "
                                                  "the scored fold's gold images; counts summed over folds"),
                        folds=k, per_fold=tuple(per_fold), **totals)


__all__ = ["ExpertScores", "IN_SAMPLE", "K_FOLD", "evaluate_in_sample", "evaluate_k_fold", "fold_images"]
