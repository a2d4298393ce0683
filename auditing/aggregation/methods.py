"""``aggregate``: votes -> one score P(label present) per (image, label) question.

Methods by name, each with a typed parameter model (``PARAMS``; unknown or ill-typed
parameters are an ``AggregationParamsError`` naming the key and the valid ones, so a
config can be checked before anything runs):

- ``dawid-skene`` (default): ``PresenceDawidSkene``, one 2 x 3 confusion matrix
  P(no/maybe/yes | absent/present) per rater, EM to convergence (see dawid_skene.py).
  With gold questions: seeded from the gold-counted matrices, gold truth held fixed.
- ``gold-confusion``: rater matrices counted on gold questions, one posterior per
  question, no EM: the published ReaL recipe (gold_confusion.py). Needs gold.
- ``majority-vote``: share of a question's votes that are yes or maybe.
- ``one-coin-dawid-skene``, ``glad``, ``mace``: crowd-kit's models on binary votes
  (yes, maybe -> present; no -> absent). They have one truth class per answer, so
  cannot keep the 3 answers apart under 2 truths; "maybe" goes with "yes" because in
  the ReaL votes it is evidence for presence (a question answered "maybe" by all 5
  raters is in the published labels 121 times out of 121).

``gold-confusion`` and ``dawid-skene`` take an ``original_label_rater``: the original
label as one more rater (original_label_rater.py).

Votes are passed to crowd-kit with integer task/worker codes (crowd.py); results are
mapped back to (file_name, label) and rater ids.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
import pydantic

from auditing.aggregation.crowd import CrowdData, GoldTasks, factorized_text, present_scores, question_codes
from auditing.aggregation.dawid_skene_params import DawidSkeneParams
from auditing.aggregation.gold_confusion import GoldConfusion, GoldConfusionParams
from auditing.aggregation.label_sets import LabelSets, label_sets
from auditing.aggregation.original_label_rater import OriginalLabelRaterParams, original_label_answers, resolve
from auditing.aggregation.priors import original_label_prior_groups, resolve_prior_classes
from auditing.aggregation.truth import ABSENT, PRESENCE_OF_ANSWER, PRESENT
from auditing.errors import InputError
from auditing.gold import Gold

DEFAULT_METHOD = "dawid-skene"
DEFAULT_THRESHOLD = 0.8
PRIORS = ("global", "original-label")


class _Params(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class MajorityVoteParams(_Params):
    """``majority-vote`` has no parameters."""


class OneCoinParams(_Params):
    n_iter: int = pydantic.Field(100, ge=1)
    tol: float = pydantic.Field(1e-5, ge=0)


class GladParams(_Params):
    n_iter: int = pydantic.Field(100, ge=1)
    tol: float = pydantic.Field(1e-5, ge=0)
    m_step_max_iter: int = pydantic.Field(25, ge=1)
    m_step_tol: float = pydantic.Field(1e-2, ge=0)


class MaceParams(_Params):
    n_iter: int = pydantic.Field(50, ge=1)
    # crowd-kit's default of 10 restarts costs ~4 min on the ReaL votes (1 restart ~25 s).
    n_restarts: int = pydantic.Field(1, ge=1)
    random_state: int = 0
    method: Literal["vb", "em"] = "vb"
    smoothing: float = pydantic.Field(0.1, ge=0)
    default_noise: float = pydantic.Field(0.5, ge=0, le=1)
    alpha: float = pydantic.Field(0.5, gt=0)
    beta: float = pydantic.Field(0.5, gt=0)


class AggregationParamsError(InputError):
    """A bad ``stages.aggregate`` method or parameter: one line naming the key and the valid ones."""

    def __init__(self, message: str, *, method: str, key: str, valid: list[str]):
        super().__init__(message)
        self.method, self.key, self.valid = method, key, valid


@dataclasses.dataclass
class AggregationResult:
    """Scores of one aggregation run; ``label_sets`` applies the ReaL rule to them."""

    method: str
    threshold: float
    scores_: pd.DataFrame  # file_name, label, score = P(label present)
    model_: Any  # the fitted crowd-kit-style aggregator
    rater_ids_: np.ndarray  # worker code -> rater_id
    params: dict[str, Any]

    @property
    def n_iter_(self) -> int | None:
        return getattr(self.model_, "n_iter_", None)

    @property
    def errors_(self) -> pd.DataFrame | None:
        """Per-rater confusion matrices indexed by (rater_id, answer), DS-like methods only."""
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


@dataclasses.dataclass
class _Inputs:
    """What a method gets besides its parameters."""

    gold: Gold | None
    original_labels: pd.DataFrame | None
    prior_groups: pd.Series | None  # per task code
    rater_history: Mapping[str, np.ndarray] | None
    rater_history_strength: float
    pseudo_rater: OriginalLabelRaterParams | None
    gold_answers: GoldAnswers | None = None  # gold_tasks' tasks prepared (FoldGold.without)


def rater_history_counts(rater_matrices: Mapping[Any, np.ndarray], strength: float) -> pd.DataFrame:
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


def gold_tasks(crowd: CrowdData, inputs: _Inputs) -> tuple[GoldTasks, CrowdData, list[int], float]:
    """The gold answers as crowd-kit tasks after the voted ones, the crowd with codes
    for gold raters not in the votes, the pseudo-rater's code (if any) and the share
    of present gold questions (under the gold's own rule): from ``inputs.gold_answers``,
    else from the tasks ``gold_answers`` makes of ``inputs.gold`` (one way either way)."""
    prepared = inputs.gold_answers
    if prepared is None:
        assert inputs.gold is not None
        prepared = gold_answers(inputs.gold, inputs.original_labels, inputs.pseudo_rater)
    return _prepared_gold_tasks(crowd, prepared)


@dataclasses.dataclass(frozen=True)
class GoldAnswers:
    """The gold questions as rated tasks, apart from any votes (the sharded engine counts
    its matrices from these): ``answers`` (task, worker = rater_id, label = answer),
    ``true_labels`` (task -> ABSENT / PRESENT), ``raters`` (in order of first appearance,
    the pseudo-rater last), ``pseudo_rater`` (its id, or None) and ``present_share``
    (the share of present gold questions under the gold's own rule)."""

    answers: pd.DataFrame
    true_labels: pd.Series
    raters: np.ndarray
    pseudo_rater: str | None
    present_share: float


def gold_answers(gold: Gold, original_labels: pd.DataFrame | None = None,
                 pseudo_rater: OriginalLabelRaterParams | None = None) -> GoldAnswers:
    """The gold questions as tasks 0..n-1 answered by the raters (question order of
    ``gold.truth()``), then, with ``pseudo_rater``, tasks n..2n-1 answered by the
    original label under its own truth rule."""
    if pseudo_rater is not None and original_labels is None:
        raise ValueError("original_label_rater needs original_labels (file_name, label)")
    truth = gold.truth()
    if not len(truth):
        raise ValueError("the gold set has no questions")
    no_votes = CrowdData(pd.DataFrame({"task": pd.Series(dtype=np.int64), "worker": pd.Series(dtype=np.int64),
                                       "label": pd.Series(dtype=object)}),
                         pd.DataFrame({"file_name": pd.Series(dtype=object), "label": pd.Series(dtype=np.int64)}),
                         np.array([], dtype=object))
    codes, crowd = no_votes.worker_codes(gold.rater_votes["rater_id"])
    tasks = GoldTasks.empty().append(gold.rater_votes, truth, codes, first_code=0)
    if pseudo_rater is not None:
        answers = original_label_answers(truth, original_labels, None, pseudo_rater.rater_id)
        pseudo_codes, crowd = crowd.worker_codes(answers["rater_id"])
        tasks = tasks.append(answers, gold.truth(pseudo_rater.present_if), pseudo_codes, first_code=tasks.next_code)
    answers = tasks.data.assign(worker=crowd.raters[tasks.data["worker"].to_numpy()])
    return GoldAnswers(answers, tasks.true_labels, crowd.raters,
                       None if pseudo_rater is None else pseudo_rater.rater_id, float(truth["truth"].mean()))


def _prepared_gold_tasks(crowd: CrowdData, prepared: GoldAnswers
                         ) -> tuple[GoldTasks, CrowdData, list[int], float]:
    """``gold_tasks`` from tasks ``gold_answers`` made: their task codes after the voted
    ones, their raters coded in the crowd (new ones in the same order of first
    appearance, the pseudo-rater last)."""
    if not len(prepared.true_labels):
        raise ValueError("the gold set has no questions")
    workers = prepared.answers["worker"]
    codes, crowd = crowd.worker_codes(workers)
    first = len(crowd.questions)
    data = pd.DataFrame({"task": prepared.answers["task"].to_numpy(np.int64) + first, "worker": codes,
                         "label": prepared.answers["label"].to_numpy(object)})
    true_labels = pd.Series(prepared.true_labels.to_numpy(), index=prepared.true_labels.index.to_numpy() + first)
    excludes = ([] if prepared.pseudo_rater is None
                else sorted(set(codes[workers.to_numpy(object) == prepared.pseudo_rater].tolist())))
    return GoldTasks(data, true_labels), crowd, excludes, prepared.present_share


@dataclasses.dataclass(frozen=True)
class FoldGold:
    """A gold set's ``gold_answers`` made once, with the question (row of
    ``gold.truth()``) of each task: ``without(images)`` is then what ``gold_answers``
    gives for ``gold.subset(images, keep=False)`` (the same tasks in the same order),
    by array operations instead of joins on (file_name, label) per fold. For k-fold
    evaluation (``auditing.expert_evaluation``), passed as ``aggregate(gold_answers=)``."""

    answers: GoldAnswers
    question_images: np.ndarray  # file name of each gold question (row of gold.truth())
    question_truth: pd.Series  # each gold question's truth under the gold's own rule

    @classmethod
    def prepare(cls, gold: Gold, original_labels: pd.DataFrame | None = None,
                pseudo_rater: OriginalLabelRaterParams | None = None) -> "FoldGold":
        truth = gold.truth()
        return cls(gold_answers(gold, original_labels, pseudo_rater), truth["file_name"].to_numpy(object),
                   truth["truth"].reset_index(drop=True))

    def without(self, images: Collection[str]) -> GoldAnswers:
        n = len(self.question_images)
        kept = ~pd.Series(self.question_images).isin(set(images)).to_numpy()
        rank = np.cumsum(kept) - 1
        n_kept = int(kept.sum())

        # gold_answers numbers the raters' tasks 0..n-1 (question order), the
        # pseudo-rater's n..2n-1: renumbered over the kept questions alike.
        def renumber(tasks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            question = tasks % n
            return kept[question], (tasks // n) * n_kept + rank[question]

        full = self.answers
        keep, tasks = renumber(full.answers["task"].to_numpy(np.int64))
        answers = full.answers.loc[keep].assign(task=tasks[keep]).reset_index(drop=True)
        keep_true, true_tasks = renumber(full.true_labels.index.to_numpy(np.int64))
        true_labels = pd.Series(full.true_labels.to_numpy()[keep_true], index=true_tasks[keep_true])
        share = float(self.question_truth.loc[kept].mean()) if n_kept else float("nan")
        return GoldAnswers(answers, true_labels, full.raters, full.pseudo_rater, share)


def _gold_confusion(crowd: CrowdData, p: GoldConfusionParams, inputs: _Inputs
                    ) -> tuple[np.ndarray, Any, CrowdData]:
    if inputs.gold is None and inputs.gold_answers is None:
        raise ValueError("gold-confusion needs gold questions (stages.votes.gold)")
    tasks, crowd, excludes, gold_prior = gold_tasks(crowd, inputs)
    model = GoldConfusion(smoothing=p.smoothing, raters_without_gold=p.raters_without_gold,
                          prior=gold_prior if p.prior is None else p.prior, default_excludes=excludes)
    model.fit(crowd.data, tasks.data, tasks.true_labels)
    return present_scores(model.probas_, len(crowd.questions)), model, crowd


def _dawid_skene(crowd: CrowdData, p: DawidSkeneParams, inputs: _Inputs) -> tuple[np.ndarray, Any, CrowdData]:
    history = None
    if inputs.rater_history is not None:
        # crowd-kit sees worker codes; the history is keyed by rater id.
        code_of = {str(rater): code for code, rater in enumerate(crowd.raters)}
        known = {code_of[str(r)]: m for r, m in inputs.rater_history.items() if str(r) in code_of}
        history = rater_history_counts(known, inputs.rater_history_strength) if known else None
    from auditing.aggregation.dawid_skene import PresenceDawidSkene  # imports crowd-kit (~2 s)

    model = PresenceDawidSkene(n_iter=p.n_iter, tol=p.tol, smoothing=p.smoothing, shrinkage=p.shrinkage,
                               initial_truth=PRESENCE_OF_ANSWER, rater_pseudo_counts=history)
    n = len(crowd.questions)
    if (inputs.gold is not None or inputs.gold_answers is not None) and p.use_gold:
        tasks, crowd, excludes, _ = gold_tasks(crowd, inputs)
        seed = GoldConfusion(smoothing=p.gold_smoothing, default_excludes=excludes)
        seed.fit(crowd.data, tasks.data, tasks.true_labels)
        data = pd.concat([crowd.data, tasks.data], ignore_index=True)
        probas = model.fit_predict_proba(data, prior_groups=inputs.prior_groups, true_labels=tasks.true_labels,
                                         initial_error=seed.errors_)
    else:
        probas = model.fit_predict_proba(crowd.data, prior_groups=inputs.prior_groups)
    return present_scores(probas, n), model, crowd


def _binary(model: Any) -> Callable[[CrowdData], tuple[np.ndarray, Any, CrowdData]]:
    def run(crowd: CrowdData) -> tuple[np.ndarray, Any, CrowdData]:
        return present_scores(model.fit_predict_proba(crowd.binary()), len(crowd.questions)), model, crowd
    return run


# crowd-kit is imported where its methods run: importing it (scipy.stats) costs ~2 s,
# which gold-confusion does not need.
def _majority_vote(crowd: CrowdData, p: MajorityVoteParams, inputs: _Inputs):
    from crowdkit.aggregation import MajorityVote

    return _binary(MajorityVote())(crowd)


def _one_coin(crowd: CrowdData, p: OneCoinParams, inputs: _Inputs):
    from crowdkit.aggregation import OneCoinDawidSkene

    return _binary(OneCoinDawidSkene(n_iter=p.n_iter, tol=p.tol))(crowd)


def _glad(crowd: CrowdData, p: GladParams, inputs: _Inputs):
    from crowdkit.aggregation import GLAD

    return _binary(GLAD(**p.model_dump()))(crowd)


def _mace(crowd: CrowdData, p: MaceParams, inputs: _Inputs):
    from crowdkit.aggregation import MACE

    return _binary(MACE(**p.model_dump()))(crowd)


METHODS: dict[str, Callable[..., tuple[np.ndarray, Any, CrowdData]]] = {
    "dawid-skene": _dawid_skene,
    "gold-confusion": _gold_confusion,
    "majority-vote": _majority_vote,
    "one-coin-dawid-skene": _one_coin,
    "glad": _glad,
    "mace": _mace,
}
# Method name -> its parameter model: the config layer validates stages.aggregate.params with it.
PARAMS: dict[str, type[pydantic.BaseModel]] = {
    "dawid-skene": DawidSkeneParams,
    "gold-confusion": GoldConfusionParams,
    "majority-vote": MajorityVoteParams,
    "one-coin-dawid-skene": OneCoinParams,
    "glad": GladParams,
    "mace": MaceParams,
}
NEEDS_GOLD = frozenset({"gold-confusion"})


def _fields_at(model: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the (nested) model at ``loc``."""
    for part in loc:
        field = model.model_fields.get(str(part))
        nested = None if field is None else next(
            (t for t in getattr(field.annotation, "__args__", (field.annotation,))
             if isinstance(t, type) and issubclass(t, pydantic.BaseModel)), None)
        if nested is None:
            break
        model = nested
    return list(model.model_fields)


def validate_params(method: str, params: Mapping[str, Any]) -> pydantic.BaseModel:
    """``params`` as ``method``'s typed model; AggregationParamsError naming the bad key."""
    if method not in PARAMS:
        raise AggregationParamsError(f"unknown aggregation method {method!r}; expected one of {sorted(PARAMS)}",
                                     method=method, key="method", valid=sorted(PARAMS))
    model = PARAMS[method]
    if not isinstance(params, Mapping):
        raise AggregationParamsError(f"parameters of aggregation method {method!r} must be a mapping, got "
                                     f"{params!r}", method=method, key="params", valid=list(model.model_fields))
    try:
        return model.model_validate(dict(params))
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        loc = tuple(error["loc"])
        key = ".".join(str(part) for part in loc)
        valid = _fields_at(model, loc[:-1])
        if error["type"] == "extra_forbidden":
            message = (f"unknown parameter {key!r} for aggregation method {method!r}; "
                       f"valid: {', '.join(valid) or '(none)'}")
        else:
            message = (f"parameter {key!r} of aggregation method {method!r}: {error['msg']} "
                       f"(got {error.get('input')!r})")
        raise AggregationParamsError(message, method=method, key=key, valid=valid) from None


def aggregate(votes: pd.DataFrame, method: str = DEFAULT_METHOD, threshold: float = DEFAULT_THRESHOLD, *,
              original_labels: pd.DataFrame | None = None, gold: Gold | None = None,
              prior_groups: pd.DataFrame | None = None, rater_history: Mapping[str, np.ndarray] | None = None,
              rater_history_strength: float = 50.0, gold_answers: GoldAnswers | None = None,
              **params: Any) -> AggregationResult:
    """Score every (file_name, label) question of validated ``votes``.

    ``params`` are the method's (``PARAMS[method]``, checked by ``validate_params``).
    Inputs besides the votes: ``original_labels`` (file_name, label; for the
    original-label prior and pseudo-rater), ``gold`` (``auditing.gold.Gold``; needed by
    gold-confusion, used by dawid-skene unless ``use_gold=False``, ignored by the
    others), ``prior_groups`` (file_name, label, group;
    dawid-skene's class-prior groups set directly), ``rater_history`` (rater ->
    2 x 3 matrix, dawid-skene pseudo-counts worth ``rater_history_strength`` votes),
    ``gold_answers``: the gold's tasks already made (``FoldGold.without``; the gold as
    ``gold`` would give them, made with the same original-label rater), instead of ``gold``.
    """
    if gold is not None and gold_answers is not None:
        raise ValueError("pass gold or gold_answers, not both")
    spec = validate_params(method, params)
    prior = getattr(spec, "prior", None) if method == "dawid-skene" else None
    pseudo: OriginalLabelRaterParams | None = getattr(spec, "original_label_rater", None)
    if (prior == "original-label" or pseudo is not None) and original_labels is None:
        what = "prior='original-label'" if prior == "original-label" else "original_label_rater"
        raise ValueError(f"{what} needs original_labels (file_name, label)")
    if method != "dawid-skene" and (prior_groups is not None or rater_history is not None):
        raise ValueError(f"class-prior groups and rater history are dawid-skene options, not {method!r}")
    if method in NEEDS_GOLD and gold is None and gold_answers is None:
        raise ValueError(f"{method} needs gold questions (stages.votes.gold)")
    if pseudo is not None:
        if pseudo.rater_id in factorized_text(votes["rater_id"])[1]:
            raise ValueError(f"original_label_rater.rater_id {pseudo.rater_id!r} is also a rater of the votes")
        questions = votes[["file_name", "label"]].iloc[question_codes(votes)[1]]
        extra = original_label_answers(questions, original_labels, resolve(pseudo), pseudo.rater_id)
        # Appended last: the pseudo-rater's factor comes last in each product.
        votes = _appended(votes[list(extra.columns)], extra)
    crowd = CrowdData.from_votes(votes)
    if prior == "original-label" and prior_groups is None:
        prior_groups = original_label_prior_groups(crowd.questions, original_labels,
                                                   resolve_prior_classes(getattr(spec, "prior_classes")))
    inputs = _Inputs(gold=gold, original_labels=original_labels,
                     prior_groups=crowd.task_groups(prior_groups) if prior_groups is not None else None,
                     rater_history=rater_history, rater_history_strength=rater_history_strength,
                     pseudo_rater=pseudo, gold_answers=gold_answers)
    scores, model, crowd = METHODS[method](crowd, spec, inputs)
    frame = crowd.questions.assign(score=scores)
    used = spec.model_dump() | {"gold": gold is not None or gold_answers is not None}
    return AggregationResult(method=method, threshold=threshold, scores_=frame, model_=model,
                             rater_ids_=crowd.raters, params=used)


def _appended(votes: pd.DataFrame, more: pd.DataFrame) -> pd.DataFrame:
    """``pd.concat([votes, more])``, except that a column that is an unordered
    Categorical in ``votes`` (``read_votes(categorical=True)``'s file names and rater
    ids) stays one, over the union of the categories: concat would make it a Python
    string per vote."""
    columns = {}
    for column in votes.columns:
        first, second = votes[column], more[column]
        if isinstance(first.dtype, pd.CategoricalDtype) and not first.cat.ordered and first.dtype != second.dtype:
            columns[column] = pd.api.types.union_categoricals([first, second.astype("category")],
                                                             ignore_order=True)
        else:
            columns[column] = pd.concat([first, second], ignore_index=True)
    return pd.DataFrame(columns, copy=False)


__all__ = ["ABSENT", "PARAMS", "PRESENT", "AggregationParamsError", "AggregationResult", "CrowdData", "FoldGold",
           "GoldAnswers", "METHODS", "aggregate", "gold_answers", "present_scores", "validate_params"]
