"""Presence Dawid-Skene over votes in shards: the numpy kernels of the distributed path.

The in-memory ``PresenceDawidSkene`` (dawid_skene.py) holds every vote in one pandas
frame. At ImageNet-train scale (~24M votes) that is ~12 GB in one process, so
``pipelines/beam_aggregation.py`` runs the same EM over shards of votes, each shard
holding every vote of its questions. These are the per-shard and per-iteration steps
it calls; they are the arithmetic of crowd-kit's ``_e_step`` / ``_m_step`` as
``PresenceDawidSkene`` uses them, written on dense arrays:

- truth classes absent/present (``ABSENT``, ``PRESENT``), answers no/maybe/yes
  (``ANSWERS`` codes 0, 1, 2); rater matrices ``errors[rater, answer, truth]`` =
  P(answer | truth), columns summing to 1 over answers;
- initialisation: majority vote over the answers mapped to truths (no -> absent,
  maybe/yes -> present);
- E-step: log2 posterior = log2(clip(prior, 1e-10)) + sum over a question's votes of
  log2 P(answer | truth), shifted by its max, exp2, normalised (crowd-kit's order);
- M-step: weighted answer counts per rater + pseudo-counts (smoothing, raters'
  history), clipped at 1e-10 and normalised; then optionally mixed with the pooled
  matrix (``shrinkage``). Cells of answers a rater never gave are left out when
  there are no pseudo-counts, as crowd-kit's groupby leaves them out;
- class prior: mean posterior over all questions or within each prior group;
- stopping: the largest posterior change of an iteration below ``tol``.

A shard's sufficient statistics for the M-step are small: rater x answer x truth
weighted counts, rater x answer vote counts, and per prior group the posterior sums
and sizes, plus the largest posterior change. Statistics of shards add up.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from auditing.aggregation.truth import ABSENT, PRESENT

N_ANSWERS, N_TRUTHS = 3, 2  # no, maybe, yes ; absent, present
TRUTH_OF_ANSWER = np.array([ABSENT, PRESENT, PRESENT])  # PRESENCE_OF_ANSWER on the answer codes
EPS = 1e-10  # crowd-kit's clip of counts and priors (its _EPS)


@dataclasses.dataclass
class VoteShard:
    """Every vote of some questions. Questions are numbered 0..Q-1 within the shard,
    raters by one code for all shards.

    ``question_log2_likelihood`` (optional, (Q, 2)): log2 P(evidence | absent, present)
    of a pseudo-rater per question (e.g. a model's answer), added in every E-step.
    """

    question_group: np.ndarray  # (Q,) int: class-prior group of each question
    vote_question: np.ndarray  # (V,) int: question of each vote
    vote_rater: np.ndarray  # (V,) int: rater code of each vote
    vote_answer: np.ndarray  # (V,) int: 0 no, 1 maybe, 2 yes
    question_log2_likelihood: np.ndarray | None = None

    @property
    def n_questions(self) -> int:
        return len(self.question_group)

    @property
    def n_votes(self) -> int:
        return len(self.vote_question)


@dataclasses.dataclass
class ShardStatistics:
    """What the M-step needs from the posteriors of some shards; ``+`` combines."""

    weighted_counts: np.ndarray  # (W, 3, 2): sum of P(truth) over each rater's votes per answer
    vote_counts: np.ndarray  # (W, 3): votes per rater and answer
    group_sums: np.ndarray  # (G, 2): sum of posteriors per prior group
    group_sizes: np.ndarray  # (G,): questions per prior group
    max_change: float = 0.0  # largest |posterior change| of the iteration

    def __add__(self, other: "ShardStatistics") -> "ShardStatistics":
        return ShardStatistics(self.weighted_counts + other.weighted_counts, self.vote_counts + other.vote_counts,
                               self.group_sums + other.group_sums, self.group_sizes + other.group_sizes,
                               max(self.max_change, other.max_change))

    @classmethod
    def zeros(cls, n_raters: int, n_groups: int) -> "ShardStatistics":
        return cls(np.zeros((n_raters, N_ANSWERS, N_TRUTHS)), np.zeros((n_raters, N_ANSWERS), np.int64),
                   np.zeros((n_groups, N_TRUTHS)), np.zeros(n_groups, np.int64))


def _vote_cells(shard: VoteShard) -> np.ndarray:
    """rater * 3 + answer per vote: the row of a vote in a flattened (W * 3, 2) matrix."""
    return shard.vote_rater.astype(np.int64) * N_ANSWERS + shard.vote_answer


def _per_question(shard: VoteShard, weights: np.ndarray) -> np.ndarray:
    return np.bincount(shard.vote_question, weights=weights, minlength=shard.n_questions)


def _rows_normalised(columns: list[np.ndarray]) -> np.ndarray:
    # Column by column: numpy reduces a (Q, 2) array along its short axis slowly.
    total = columns[0] + columns[1]
    return np.stack([c / total for c in columns], axis=1)


def majority_posteriors(shard: VoteShard) -> np.ndarray:
    """(Q, 2) share of each question's votes for absent / present (crowd-kit MajorityVote)."""
    truth = TRUTH_OF_ANSWER[shard.vote_answer]
    return _rows_normalised([_per_question(shard, (truth == k).astype(np.float64)) for k in range(N_TRUTHS)])


def posteriors(shard: VoteShard, errors: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """(Q, 2) P(truth | votes) given rater matrices ``errors`` (W, 3, 2) and class priors
    ``priors`` (G, 2) per prior group: crowd-kit's E-step."""
    with np.errstate(divide="ignore"):  # a cell no rater used may be 0; no vote reads it
        log2_errors = np.log2(errors).reshape(-1, N_TRUTHS)
    cells = _vote_cells(shard)
    log2_priors = np.log2(np.clip(priors, EPS, None))
    log_likelihood = [log2_priors[shard.question_group, k] + _per_question(shard, log2_errors[:, k][cells])
                      for k in range(N_TRUTHS)]
    if shard.question_log2_likelihood is not None:
        log_likelihood = [ll + shard.question_log2_likelihood[:, k] for k, ll in enumerate(log_likelihood)]
    top = np.maximum(log_likelihood[0], log_likelihood[1])
    return _rows_normalised([np.exp2(ll - top) for ll in log_likelihood])


def shard_statistics(shard: VoteShard, probas: np.ndarray, n_raters: int, n_groups: int,
                     max_change: float = 0.0) -> ShardStatistics:
    """The M-step's sufficient statistics of one shard's posteriors ``probas`` (Q, 2)."""
    cells = _vote_cells(shard)
    weighted = np.stack([np.bincount(cells, weights=probas[:, k][shard.vote_question],
                                     minlength=n_raters * N_ANSWERS) for k in range(N_TRUTHS)], axis=1)
    votes = np.bincount(cells, minlength=n_raters * N_ANSWERS).reshape(n_raters, N_ANSWERS)
    group_sums = np.stack([np.bincount(shard.question_group, weights=probas[:, k], minlength=n_groups)
                           for k in range(N_TRUTHS)], axis=1)
    sizes = np.bincount(shard.question_group, minlength=n_groups)
    return ShardStatistics(weighted.reshape(n_raters, N_ANSWERS, N_TRUTHS), votes, group_sums, sizes, max_change)


def _normalise(counts: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Clip present cells at EPS and divide by their sum over answers; absent cells 0."""
    counts = np.where(present[..., None], np.clip(counts, EPS, None), 0.0)
    return counts / counts.sum(axis=-2, keepdims=True)


def m_step(stats: ShardStatistics, pseudo_counts: np.ndarray | None = None, shrinkage: float = 0.0) -> np.ndarray:
    """Rater matrices (W, 3, 2) from the statistics: crowd-kit's M-step ('addition' of
    ``pseudo_counts`` (W, 3, 2) when given), then ``(1 - shrinkage) * own + shrinkage *
    pooled`` as ``PresenceDawidSkene._shrunk_m_step``."""
    given = stats.vote_counts > 0
    if pseudo_counts is None:
        errors = _normalise(stats.weighted_counts, given)
    else:
        errors = _normalise(stats.weighted_counts + pseudo_counts, np.ones_like(given))
    if shrinkage == 0.0:
        return errors
    pooled = _normalise(stats.weighted_counts.sum(axis=0), given.any(axis=0))  # (3, 2)
    return errors * (1.0 - shrinkage) + pooled[None] * shrinkage


def class_priors(stats: ShardStatistics) -> np.ndarray:
    """(G, 2) mean posterior per prior group (0.5 for a group without questions: unused)."""
    sizes = stats.group_sizes[:, None].astype(np.float64)
    return np.divide(stats.group_sums, sizes, out=np.full_like(stats.group_sums, 0.5), where=sizes > 0)


def smoothing_pseudo_counts(n_raters: int, smoothing: float, history: np.ndarray | None = None) -> np.ndarray | None:
    """``PresenceDawidSkene._pseudo_counts`` on codes: ``smoothing`` in every cell plus the
    raters' history counts (W, 3, 2) (0 for raters without history); None when neither."""
    if smoothing <= 0 and history is None:
        return None
    counts = np.full((n_raters, N_ANSWERS, N_TRUTHS), max(smoothing, 0.0))
    return counts if history is None else counts + history


def history_pseudo_counts(rater_ids: np.ndarray, rater_matrices: dict[str, np.ndarray],
                          strength: float) -> np.ndarray:
    """(W, 3, 2) ``strength`` x each known rater's (2, 3) P(answer | truth) matrix,
    transposed to (answer, truth); zeros for raters without one (``rater_history_counts``)."""
    counts = np.zeros((len(rater_ids), N_ANSWERS, N_TRUTHS))
    for code, rater in enumerate(rater_ids):
        matrix = rater_matrices.get(str(rater))
        if matrix is not None:
            counts[code] = strength * np.asarray(matrix, dtype=np.float64).T
    return counts


def max_change(new: np.ndarray, old: np.ndarray) -> float:
    """The stopping measure: the largest |posterior change| over a shard's questions."""
    return float(np.abs(new - old).max()) if new.size else 0.0


@dataclasses.dataclass
class EMState:
    """Dawid-Skene after ``iteration`` E-steps: the rater matrices and priors of the
    M-step on the current posteriors, and those that produced the current posteriors
    (None at iteration 0 when its posteriors are the majority vote; the seed matrices
    and priors when EM was seeded). Posteriors are never
    stored: a shard recomputes them from these parameters (an E-step is cheaper than
    moving a posterior per question between iterations)."""

    iteration: int
    errors: np.ndarray  # (W, 3, 2)
    priors: np.ndarray  # (G, 2)
    previous_errors: np.ndarray | None = None
    previous_priors: np.ndarray | None = None
    changes: tuple[float, ...] = ()
    converged: bool = False

    def current_posteriors(self, shard: VoteShard) -> np.ndarray:
        """The posteriors of iteration ``iteration`` (what the scores are when it stops)."""
        if self.previous_errors is None:
            return majority_posteriors(shard)
        return posteriors(shard, self.previous_errors, self.previous_priors)

    def done(self, n_iter: int) -> bool:
        return self.converged or self.iteration >= n_iter


def held_truth_statistics(shard: VoteShard, truth: np.ndarray, n_raters: int, n_groups: int) -> ShardStatistics:
    """Statistics of questions whose posteriors are held at their ``truth`` (gold; 0
    absent, 1 present) in every iteration, as ``PresenceDawidSkene``'s ``true_labels``:
    their votes count in every M-step; they have a prior group of their own, which no
    voted question uses, so their group sums are left out. Constant over iterations."""
    probas = np.stack([truth == ABSENT, truth == PRESENT], axis=1).astype(np.float64)
    stats = shard_statistics(shard, probas, n_raters, n_groups)
    return dataclasses.replace(stats, group_sums=np.zeros_like(stats.group_sums),
                               group_sizes=np.zeros_like(stats.group_sizes))


def _with_held(stats: ShardStatistics, held: ShardStatistics | None) -> ShardStatistics:
    return stats if held is None else stats + held


def initial_state(stats: ShardStatistics, pseudo_counts: np.ndarray | None, shrinkage: float,
                  held: ShardStatistics | None = None, seed_errors: np.ndarray | None = None,
                  seed_priors: np.ndarray | None = None) -> EMState:
    """Iteration 0 from the statistics of the initial posteriors: the majority vote's,
    or with ``seed_errors`` and ``seed_priors`` (e.g. gold-counted matrices) those of one
    E-step under them. ``held``: ``held_truth_statistics`` of gold questions."""
    total = _with_held(stats, held)
    return EMState(0, m_step(total, pseudo_counts, shrinkage), class_priors(total), seed_errors, seed_priors)


def advance(state: EMState, stats: ShardStatistics, pseudo_counts: np.ndarray | None, shrinkage: float,
            tol: float, held: ShardStatistics | None = None) -> EMState:
    """One EM iteration from the statistics of ``posteriors(shard, state.errors, state.priors)``."""
    total = _with_held(stats, held)
    return EMState(state.iteration + 1, m_step(total, pseudo_counts, shrinkage), class_priors(total),
                   state.errors, state.priors, state.changes + (stats.max_change,), stats.max_change < tol)


def e_step_statistics(shard: VoteShard, state: EMState, n_raters: int, n_groups: int) -> ShardStatistics:
    """One shard's share of the next iteration: its new posteriors' statistics and how far
    they moved from the current ones."""
    new = posteriors(shard, state.errors, state.priors)
    return shard_statistics(shard, new, n_raters, n_groups, max_change(new, state.current_posteriors(shard)))


__all__ = ["EMState", "N_ANSWERS", "N_TRUTHS", "ShardStatistics", "VoteShard", "advance", "class_priors",
           "e_step_statistics", "held_truth_statistics", "history_pseudo_counts", "initial_state", "m_step", "majority_posteriors",
           "max_change", "posteriors", "shard_statistics", "smoothing_pseudo_counts"]
