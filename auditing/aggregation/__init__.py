"""Stage 5 of the method: votes -> per-question P(label present) -> label sets.

One algorithm per module, crowd-kit style:

- ``dawid_skene``: ``PresenceDawidSkene``, crowd-kit's DS with 2 truths x 3 answers,
  run to convergence (the default engine), optionally with gold questions.
- ``gold_confusion``: ``GoldConfusion``, rater matrices counted on gold questions, one
  posterior per question (the published ReaL recipe).
- ``original_label_rater``: the original label as a pseudo-rater.
- ``methods``: ``aggregate(votes, method=...)``, the methods by name and their typed
  parameters (``PARAMS``, ``validate_params``).
- ``crowd``: votes and gold answers as crowd-kit frames.
- ``priors``: which questions share a class prior (original label vs proposals).
- ``label_sets``: the ReaL rule from scores to label sets.
"""
import importlib

# Light modules load with the package. dawid_skene imports crowd-kit (~1.5 s: scipy.stats)
# and loads on first use of one of its names; so do crowd, gold_confusion and methods
# (pydantic models, auditing.gold), which only the in-memory engine and the gold-confusion
# kernels need: the sharded kernels (auditing/aggregation/sharded.py) start fast.
from auditing.aggregation.label_sets import LabelSets, label_sets, label_sets_of_shards
from auditing.aggregation.original_label_rater import OriginalLabelRaterParams, original_label_answers
from auditing.aggregation.priors import ANIMAL_WNID, original_label_prior_groups, resolve_prior_classes
from auditing.aggregation.truth import ABSENT, PRESENCE_OF_ANSWER, PRESENT

_LAZY = {
    "crowd": ("CrowdData", "GoldTasks", "present_scores"),
    "dawid_skene": ("PresenceDawidSkene",),
    "dawid_skene_params": ("DawidSkeneParams",),
    "gold_confusion": ("GoldConfusion", "GoldConfusionParams"),
    "methods": ("DEFAULT_METHOD", "DEFAULT_THRESHOLD", "METHODS", "PARAMS", "PRIORS", "AggregationParamsError",
                "AggregationResult", "aggregate", "validate_params"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'auditing.aggregation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"auditing.aggregation.{module}"), name)
    globals()[name] = value
    return value


__all__ = ["ABSENT", "ANIMAL_WNID", "DEFAULT_METHOD", "DEFAULT_THRESHOLD", "METHODS", "PARAMS",
           "PRESENCE_OF_ANSWER", "PRESENT", "PRIORS", "AggregationParamsError", "AggregationResult", "CrowdData",
           "DawidSkeneParams", "GoldConfusion", "GoldConfusionParams", "GoldTasks", "LabelSets",
           "OriginalLabelRaterParams", "PresenceDawidSkene", "aggregate", "label_sets", "label_sets_of_shards",
           "original_label_answers", "original_label_prior_groups", "present_scores", "resolve_prior_classes",
           "validate_params"]
