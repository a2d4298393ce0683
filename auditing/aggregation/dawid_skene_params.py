"""``DawidSkeneParams``, apart from dawid_skene.py so that the methods table (and the
config layer, which validates ``stages.aggregate.params`` with it) does not import
crowd-kit (~2 s of scipy.stats) for a method that does not run it.
"""
from __future__ import annotations

from typing import Literal

import pydantic

from auditing.aggregation.original_label_rater import OriginalLabelRaterParams


class DawidSkeneParams(pydantic.BaseModel):
    """Parameters of ``dawid-skene`` (``stages.aggregate.params``)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    n_iter: int = pydantic.Field(100, ge=1)
    tol: float = pydantic.Field(1e-5, ge=0)
    smoothing: float = pydantic.Field(1.0, ge=0)
    shrinkage: float = pydantic.Field(0.0, ge=0, le=1)
    # Class priors: one for all questions, or questions on an image's original label
    # get their own, for labels in prior_classes (WordNet id, class indices, None = all).
    prior: Literal["global", "original-label"] = "global"
    prior_classes: str | list[int] | None = None
    # With gold questions given: seed from the gold-counted matrices and hold the gold
    # truth fixed. False: votes only, even when gold is there.
    use_gold: bool = True
    gold_smoothing: float = pydantic.Field(1.0, ge=0)  # alpha of the gold-counted seed matrices
    # The original label as a pseudo-rater (auditing/aggregation/original_label_rater.py).
    original_label_rater: OriginalLabelRaterParams | None = None
