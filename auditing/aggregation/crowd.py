"""Votes in crowd-kit's long format (task, worker, label), and gold tasks beside them.

Integer task / worker codes make crowd-kit's joins fast; ``CrowdData`` keeps the maps
back to (file_name, label) questions and rater ids. Gold tasks (questions with known
truth, answered by the raters) get task codes after the voted questions', so a
method sees one frame and the scores of the voted questions stay codes 0..n-1.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from auditing.aggregation.truth import ABSENT, PRESENCE_OF_ANSWER, PRESENT
from auditing.votes import ANSWERS, REQUIRED_COLUMNS, combined_key


def question_codes(votes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each vote's (file_name, label) question code, numbered in order of first
    appearance (``groupby(sort=False).ngroup()``), and the row of each question's first
    vote (the rows ``drop_duplicates`` keeps). One integer key per question and one
    factorize: a groupby on the two columns costs ~0.5 s more on the ReaL votes (and a
    Categorical ``file_name`` is factorized on its codes)."""
    image, images = pd.factorize(votes["file_name"])
    label = votes["label"].to_numpy(np.int64)
    if not len(label):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    low = int(label.min())
    # (images x label range) fits an int64 for any vote table that fits in memory.
    codes, _ = pd.factorize(combined_key([image, label - low], [len(images), int(label.max()) - low + 1]))
    # Numbered in order of first appearance: a question's first vote is where the
    # running maximum of the codes grows (no sort, as np.unique's return_index needs).
    running = np.maximum.accumulate(codes)
    return codes.astype(np.int64), np.flatnonzero(np.r_[True, running[1:] > running[:-1]])


@dataclasses.dataclass
class CrowdData:
    """Votes in crowd-kit's long format plus the maps back to questions and raters."""

    data: pd.DataFrame  # task (int), worker (int), label (answer str)
    questions: pd.DataFrame  # row i = task i: file_name, label
    raters: np.ndarray  # worker code -> rater_id, in order of first appearance in the votes

    @classmethod
    def from_votes(cls, votes: pd.DataFrame) -> "CrowdData":
        missing = [c for c in REQUIRED_COLUMNS if c not in votes.columns]
        if missing:
            raise ValueError(f"votes lack column(s) {missing}")
        # Task codes in order of first appearance, matching drop_duplicates' order.
        task, first = question_codes(votes)
        questions = votes.iloc[first]
        worker, raters = factorized_text(votes["rater_id"])
        answer_codes, answer_table = factorized_text(votes["answer"])
        answers = answer_table[answer_codes]
        if not np.isin(answer_table, ANSWERS).all():
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

    def worker_codes(self, rater_ids: pd.Series) -> tuple[np.ndarray, "CrowdData"]:
        """Codes of ``rater_ids``; raters not in the votes get new codes (after all
        others), returned with the extended ``raters`` map."""
        ids = rater_ids.astype(str).to_numpy()
        # A hash lookup: np.isin on strings sorts both arrays.
        codes = pd.Index(self.raters).get_indexer(ids)
        new = pd.unique(ids[codes < 0])
        raters = self.raters
        if len(new):
            raters = np.concatenate([raters, np.asarray(new, dtype=object)])
            codes = pd.Index(raters).get_indexer(ids)
        return codes.astype(np.int64), dataclasses.replace(self, raters=raters)


def factorized_text(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes in order of first appearance, distinct values as str objects) of
    ``values.astype(str)``; a Categorical of strings is factorized on its codes,
    without a Python string per row."""
    if isinstance(values.dtype, pd.CategoricalDtype) and pd.api.types.is_string_dtype(values.cat.categories) \
            and not values.isna().any():
        codes, uniques = pd.factorize(values)
        return codes, np.asarray(uniques.astype(object), dtype=object)
    codes, uniques = pd.factorize(values.astype(str).to_numpy())
    return codes, np.asarray(uniques, dtype=object)


@dataclasses.dataclass
class GoldTasks:
    """Gold answers as crowd-kit rows: ``data`` (task, worker, label) with task codes
    from ``first_code`` on, and ``true_labels`` (task -> ABSENT / PRESENT)."""

    data: pd.DataFrame
    true_labels: pd.Series

    @classmethod
    def empty(cls) -> "GoldTasks":
        return cls(pd.DataFrame({"task": pd.Series(dtype=np.int64), "worker": pd.Series(dtype=np.int64),
                                 "label": pd.Series(dtype=object)}), pd.Series(dtype=np.int64))

    def append(self, answers: pd.DataFrame, truth: pd.DataFrame, workers: np.ndarray, first_code: int
               ) -> "GoldTasks":
        """Add gold tasks: ``truth`` (file_name, label, truth) gets task codes
        ``first_code``...; ``answers`` (file_name, label, answer) answered by ``workers``
        (codes). Answers on questions outside ``truth`` are an error (the gold reader
        quarantines them)."""
        keys = pd.MultiIndex.from_frame(truth[["file_name", "label"]])
        code_of = pd.Series(first_code + np.arange(len(truth)), index=keys)
        tasks = code_of.reindex(pd.MultiIndex.from_frame(answers[["file_name", "label"]])).to_numpy()
        if np.isnan(tasks.astype(float)).any():
            raise ValueError("gold answers on questions without gold truth; read gold with auditing.gold")
        data = pd.DataFrame({"task": tasks.astype(np.int64), "worker": np.asarray(workers, dtype=np.int64),
                             "label": answers["answer"].astype(object).to_numpy()})
        true = pd.Series(np.where(truth["truth"].to_numpy(bool), PRESENT, ABSENT), index=code_of.to_numpy())
        return GoldTasks(pd.concat([self.data, data], ignore_index=True),
                         pd.concat([self.true_labels, true]))

    @property
    def next_code(self) -> int:
        return int(self.true_labels.index.max()) + 1 if len(self.true_labels) else 0


def present_scores(probas: pd.DataFrame, n_tasks: int) -> np.ndarray:
    """P(present) per task code 0..n_tasks-1 from a crowd-kit probas frame."""
    if PRESENT not in probas.columns:  # nobody ever answered yes/maybe
        return np.zeros(n_tasks)
    return probas[PRESENT].reindex(pd.RangeIndex(n_tasks)).to_numpy(np.float64)
