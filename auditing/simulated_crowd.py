"""A SIMULATED crowd, for image sets nobody rated (e.g. the sample photos).

Not for real audits: its votes are drawn, not given. It exists so that every stage of
the pipeline can run end to end on real photos with real models.

Each simulated rater is one of the real ReaL raters: its 2 x 3 confusion matrix
P(answer in {no, maybe, yes} | label absent / present) is estimated from that rater's
real votes, weighted by the Dawid-Skene posterior of each question it answered (the
M-step of Dawid-Skene, with the posteriors of the aggregation engine). A simulated vote
on (image, label) draws the answer from the row of the true state given by ``truth``.

A simulated vote carries the id of the real rater it imitates, so that the raters'
history (``stages.aggregate.rater_history``) applies to it; the votes stage counts them
as ``simulated``.

Randomness is keyed by (seed, task id), so a task answered in an earlier audit gets the
same votes again in a re-audit and a new task does not change the old ones.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import pandas as pd

ANSWERS = ("no", "maybe", "yes")


def rater_confusions(votes: pd.DataFrame, posteriors: pd.DataFrame, smoothing: float = 1.0,
                     ) -> dict[str, np.ndarray]:
    """Per rater, a (2, 3) matrix P(answer | absent, present) from weighted counts.

    ``votes``: file_name, label, rater_id, answer; ``posteriors``: file_name, label,
    score = P(label present). ``smoothing`` adds pseudo-counts to every cell.
    """
    merged = votes.merge(posteriors[["file_name", "label", "score"]], on=["file_name", "label"],
                         how="inner")
    answer_index = pd.Categorical(merged["answer"].astype(str), categories=ANSWERS).codes
    if (answer_index < 0).any():
        raise ValueError("votes contain answers outside {no, maybe, yes}")
    present = merged["score"].to_numpy(np.float64)
    confusions = {}
    for rater, rows in merged.groupby("rater_id").indices.items():
        counts = np.full((2, 3), smoothing)
        np.add.at(counts[1], answer_index[rows], present[rows])
        np.add.at(counts[0], answer_index[rows], 1.0 - present[rows])
        confusions[str(rater)] = counts / counts.sum(axis=1, keepdims=True)
    return confusions


def _task_rng(seed: int, task_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{task_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def simulate_task_votes(tasks: pd.DataFrame, truth: Mapping[str, frozenset[int]],
                        confusions: Mapping[str, np.ndarray], raters_per_task: int = 5,
                        seed: int = 0) -> pd.DataFrame:
    """Votes for ``tasks`` (long: task_id, file_name, label) from simulated raters.

    An image absent from ``truth`` is an error: the simulation has nothing to answer from.
    """
    missing = sorted(set(tasks["file_name"]) - set(truth))
    if missing:
        raise KeyError(f"the simulated crowd has no true label set for {len(missing)} image(s), "
                       f"e.g. {missing[:3]}")
    raters = sorted(confusions)
    if len(raters) < raters_per_task:
        raise ValueError(f"{raters_per_task} raters per task but only {len(raters)} calibrated raters")
    rows = []
    for task_id, task in tasks.groupby("task_id", sort=True):
        rng = _task_rng(seed, str(task_id))
        chosen = rng.choice(len(raters), size=raters_per_task, replace=False)
        for rater_position in chosen:
            rater = raters[rater_position]
            matrix = confusions[rater]
            for file_name, label in zip(task["file_name"], task["label"]):
                state = int(label) in truth[file_name]
                answer = ANSWERS[rng.choice(3, p=matrix[int(state)])]
                rows.append((str(task_id), file_name, int(label), rater, answer))
    return pd.DataFrame(rows, columns=["task_id", "file_name", "label", "rater_id", "answer"])


def calibrated_confusions(votes: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per rater, the 2 x 3 confusion matrix measured on real ``votes``: the default
    Dawid-Skene posteriors of their questions, then ``rater_confusions``. This is how
    the simulated crowd and the raters' history are calibrated on the ReaL votes."""
    from auditing import aggregation

    return rater_confusions(votes, aggregation.aggregate(votes).scores_)
