"""Stage 5 of the method: votes -> per-question P(label present) -> label sets.

One algorithm per module, crowd-kit style:

- ``dawid_skene``: ``PresenceDawidSkene``, crowd-kit's DS with 2 truths x 3 answers,
  run to convergence (the default engine).
- ``methods``: ``aggregate(votes, method=...)`` and the other methods by name.
- ``priors``: which questions share a class prior (original label vs proposals).
- ``label_sets``: the ReaL rule from scores to label sets.
"""
from auditing.aggregation.dawid_skene import ABSENT, PRESENCE_OF_ANSWER, PRESENT, PresenceDawidSkene
from auditing.aggregation.label_sets import LabelSets, label_sets
from auditing.aggregation.methods import (DEFAULT_METHOD, DEFAULT_THRESHOLD, METHODS, PRIORS,
                                          AggregationResult, CrowdData, aggregate, present_scores)
from auditing.aggregation.priors import ANIMAL_WNID, original_label_prior_groups, resolve_prior_classes

__all__ = ["ABSENT", "ANIMAL_WNID", "DEFAULT_METHOD", "DEFAULT_THRESHOLD", "METHODS", "PRESENCE_OF_ANSWER",
           "PRESENT", "PRIORS", "AggregationResult", "CrowdData", "LabelSets", "PresenceDawidSkene",
           "aggregate", "label_sets", "present_scores", "original_label_prior_groups", "resolve_prior_classes"]
