"""Rater quality measured on gold questions: per-rater counts, tests, flags, matrices.

Per rater (``rater_quality``): answers on gold, accuracy, the 2 x 3 count matrix
(truth absent / present x answer no / maybe / yes) and two tests, each flagging the
rater when it cannot reject "no better than":

- chance: the answers are independent of the truth (likelihood-ratio G-test of
  independence on the 2 x 3 table, what ``scipy.stats.chi2_contingency`` with
  ``lambda_="log-likelihood"`` gives; a rater who gives one answer only is independent
  by construction, p = 1);
- always "no": accuracy is not above that of answering "no" to every gold question
  the rater saw (one-sided exact binomial test, what ``scipy.stats.binomtest`` gives).

Both p-values come from ``scipy.special`` (``chdtrc``, ``betainc``): scipy.stats would
cost the report ~1 s of import for two survival functions.

Accuracy counts an answer as correct when its presence (``PRESENCE_OF_ANSWER``: no ->
absent; maybe, yes -> present, as the aggregation reads them) is the truth: in the
ReaL gold answers "maybe" is evidence of presence (raters who say "maybe" where others
say "yes" are informative, and would all fail the always-"no" test if "maybe" were
counted wrong). The tests are per rater at level
``alpha`` without a multiple-testing correction: a flag says "look at this rater",
not "this rater is a spammer".

``drop_flagged_effect`` re-aggregates without the flagged raters (their votes and
gold answers) and counts what changes in the label sets. ``matrices_for_report``
gives each rater's matrix, sorted by accuracy, as data for the report page (an HTML
table per rater, its cells shaded by P(answer | truth): no figure to draw); nothing
is written to disk.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import pandas as pd
# scipy.special, not scipy.stats: the two p-values rest on special functions, and
# importing scipy.stats costs ~1 s (it builds every distribution's docstring), most of
# the report stage's import time.
from scipy import special

from auditing.aggregation import PRESENCE_OF_ANSWER, PRESENT, aggregate
from auditing.gold import Gold, PresenceRule
from auditing.votes import ANSWERS

COUNT_COLUMNS: tuple[str, ...] = tuple(f"{truth}_{answer}" for truth in ("absent", "present") for answer in ANSWERS)
QUALITY_COLUMNS: tuple[str, ...] = ("rater_id", "answers", "correct", "accuracy", "always_no_accuracy",
                                    *COUNT_COLUMNS, "chance_p", "always_no_p", "no_better_than_chance",
                                    "no_better_than_always_no", "flagged")


def rater_quality(gold: Gold, *, alpha: float = 0.01, rule: PresenceRule | None = None) -> pd.DataFrame:
    """One row per rater with gold answers (``QUALITY_COLUMNS``), best accuracy first.

    ``rule``: the gold truth rule (default: the gold's own)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    truth = gold.truth(rule).set_index(["file_name", "label"])["truth"]
    answers = gold.rater_votes
    present = truth.reindex(pd.MultiIndex.from_frame(answers[["file_name", "label"]])).to_numpy()
    if pd.isna(present).any():
        raise ValueError("gold answers on questions without gold truth; read gold with auditing.gold")
    raters, rater_code = np.unique(answers["rater_id"].astype(str).to_numpy(), return_inverse=True)
    answer_code = pd.Categorical(answers["answer"].astype(object), categories=list(ANSWERS)).codes
    cell = (rater_code * 2 + present.astype(np.int64)) * len(ANSWERS) + answer_code
    counts = np.bincount(cell, minlength=len(raters) * 2 * len(ANSWERS)).reshape(len(raters), 2, len(ANSWERS))
    says_present = np.array([PRESENCE_OF_ANSWER[a] == PRESENT for a in ANSWERS])
    n = counts.sum(axis=(1, 2))
    correct = counts[:, 0, ~says_present].sum(axis=1) + counts[:, 1, says_present].sum(axis=1)
    absent = counts[:, 0].sum(axis=1)
    chance_p = np.array([_independence_p(c) for c in counts])
    always_no_p = np.array([_above_p(int(k), int(m), float(a / m)) if 0 < a < m else 1.0
                            for k, m, a in zip(correct, n, absent)])
    table = pd.DataFrame({"rater_id": raters, "answers": n, "correct": correct, "accuracy": correct / n,
                          "always_no_accuracy": absent / n,
                          **{name: counts.reshape(len(raters), -1)[:, i] for i, name in enumerate(COUNT_COLUMNS)},
                          "chance_p": chance_p, "always_no_p": always_no_p})
    table["no_better_than_chance"] = table["chance_p"] >= alpha
    table["no_better_than_always_no"] = table["always_no_p"] >= alpha
    table["flagged"] = table["no_better_than_chance"] | table["no_better_than_always_no"]
    return table.sort_values(["accuracy", "rater_id"], ascending=[False, True], ignore_index=True)


def _above_p(k: int, n: int, p: float) -> float:
    """One-sided exact binomial p-value of k or more successes in n trials at rate p:
    ``scipy.stats.binomtest(k, n, p, alternative="greater").pvalue``, which is
    ``binom.sf(k - 1, n, p)`` (1 for k = 0). scipy.stats computes that sf as the
    regularized incomplete beta I_p(k, n - k + 1) (Boost's), as ``betainc`` does;
    ``bdtrc`` (Cephes) differs in the 12th digit."""
    return min(1.0, float(special.betainc(k, n - k + 1, p))) if k > 0 else 1.0


def _independence_p(counts: np.ndarray) -> float:
    """G-test p-value that answer and truth are independent (1 when untestable):
    ``scipy.stats.chi2_contingency(table, correction=False, lambda_="log-likelihood")``,
    i.e. G = 2 sum obs log(obs / expected), expected from the margins, against chi^2
    with (rows - 1)(columns - 1) degrees of freedom."""
    table = counts[:, counts.sum(axis=0) > 0].astype(np.float64)
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 1.0
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    g = 2.0 * special.xlogy(table, table / expected).sum()
    return float(special.chdtrc((table.shape[0] - 1) * (table.shape[1] - 1), g))


def matrices(table: pd.DataFrame) -> np.ndarray:
    """The (raters, 2, 3) count matrices of a ``rater_quality`` table, in its row order."""
    return table[list(COUNT_COLUMNS)].to_numpy().reshape(len(table), 2, len(ANSWERS))


@dataclasses.dataclass(frozen=True)
class DropEffect:
    """What dropping raters changes in the label sets (counts only)."""

    raters_dropped: int
    votes_dropped: int
    gold_answers_dropped: int
    questions_left_without_votes: int
    images_changed: int
    labels_added: int
    labels_removed: int
    labels_before: int
    labels_after: int
    empty_sets_before: int
    empty_sets_after: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def drop_flagged_effect(votes: pd.DataFrame, flagged: Collection[str], *, original_labels: pd.DataFrame,
                        method: str, params: Mapping[str, Any] | None = None, gold: Gold | None = None,
                        threshold: float = 0.8, before: Mapping[str, frozenset[int]] | None = None) -> DropEffect:
    """Aggregate ``votes`` with and without the ``flagged`` raters (their votes and gold
    answers) by ``method`` / ``params`` and compare the label sets. ``before``: the
    label sets with every rater, if already computed."""
    params = dict(params or {})
    flagged = {str(r) for r in flagged}
    if before is None:
        before = aggregate(votes, method, threshold, original_labels=original_labels, gold=gold,
                           **params).label_sets(original_labels)
    dropped = votes["rater_id"].astype(str).isin(flagged).to_numpy()
    kept_gold, gold_dropped = gold, 0
    if gold is not None:
        drop_gold = gold.rater_votes["rater_id"].astype(str).isin(flagged).to_numpy()
        gold_dropped = int(drop_gold.sum())
        kept_gold = dataclasses.replace(gold, rater_votes=gold.rater_votes.loc[~drop_gold].reset_index(drop=True))
    if not dropped.any() and not gold_dropped:
        after = before
    else:
        after = aggregate(votes.loc[~dropped], method, threshold, original_labels=original_labels, gold=kept_gold,
                          **params).label_sets(original_labels)
    questions = votes[["file_name", "label"]]
    left = questions.loc[~dropped].drop_duplicates()
    added = removed = changed = 0
    for name in before.keys() | after.keys():
        old, new = before.get(name, frozenset()), after.get(name, frozenset())
        added += len(new - old)
        removed += len(old - new)
        changed += old != new
    return DropEffect(raters_dropped=len(flagged & set(votes["rater_id"].astype(str))),
                      votes_dropped=int(dropped.sum()), gold_answers_dropped=gold_dropped,
                      questions_left_without_votes=len(questions.drop_duplicates()) - len(left),
                      images_changed=changed, labels_added=added, labels_removed=removed,
                      labels_before=sum(map(len, before.values())), labels_after=sum(map(len, after.values())),
                      empty_sets_before=sum(1 for s in before.values() if not s),
                      empty_sets_after=sum(1 for s in after.values() if not s))


def matrices_for_report(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Each rater's count matrix of a ``rater_quality`` table (its order: best accuracy
    first) as the report shows it, JSON-ready: titled "rater: accuracy", ``flagged``,
    rows truth absent / present, columns the answers, the counts and P(answer | truth)
    (0 in a row without answers)."""
    counts = matrices(table)
    totals = counts.sum(axis=2, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    return [{"title": f"{rater.rater_id}: {rater.accuracy:.0%}", "flagged": bool(rater.flagged),
             "rows": ["absent", "present"], "columns": list(ANSWERS),
             "counts": counts[r].tolist(), "shares": shares[r].tolist()}
            for r, rater in enumerate(table.itertuples())]


__all__ = ["COUNT_COLUMNS", "DropEffect", "QUALITY_COLUMNS", "drop_flagged_effect", "matrices",
           "matrices_for_report", "rater_quality"]
