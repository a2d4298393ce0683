"""The original label as one more rater (a pseudo-rater), for a set of classes.

ImageNet's original label is itself a (noisy) vote: the published ReaL scores treat
it as a rater for questions on animal classes (WordNet n00015388), who answers "yes"
if the question's label is the image's original label and "no" otherwise, with its
own confusion matrix counted on the gold questions under its own truth rule (">= 2
of 5 experts said yes"; issue 11). Usable with ``gold-confusion`` and
``dawid-skene`` (where, without gold, EM learns its matrix like any rater's).

The pseudo-rater's gold answers are counted on every gold question whose image has
an original label, not only those in ``classes``: that is what the published
matrix, (171, 1, 134)/306 given present and (811, 1, 23)/835 given absent over
(no, maybe, yes), counts (303 + 832 = 1,135 questions, + 3 smoothing each).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pydantic

from auditing.aggregation.priors import resolve_prior_classes
from auditing.gold import PresenceRule
from auditing.votes import ANSWER_DTYPE

DEFAULT_RATER_ID = "original-label"


class OriginalLabelRaterParams(pydantic.BaseModel):
    """``classes``: a WordNet id (its ImageNet classes), class indices, or None (all);
    ``present_if``: its gold truth rule (None: the gold's own); ``rater_id``: its name."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    classes: str | list[int] | None = None
    present_if: PresenceRule | None = None
    rater_id: str = pydantic.Field(DEFAULT_RATER_ID, min_length=1)


def original_label_answers(questions: pd.DataFrame, original_labels: pd.DataFrame,
                           classes: np.ndarray | None = None, rater_id: str = DEFAULT_RATER_ID) -> pd.DataFrame:
    """The pseudo-rater's votes (vote schema) on ``questions`` (file_name, label) whose
    label is in ``classes`` (all when None) and whose image has an original label:
    yes if the label is the original one, no otherwise."""
    original = original_labels.drop_duplicates("file_name").set_index("file_name")["label"]
    of_image = questions["file_name"].map(original)
    asked = of_image.notna().to_numpy()
    if classes is not None:
        asked &= questions["label"].isin(np.asarray(classes)).to_numpy()
    chosen = questions.loc[asked]
    is_original = (of_image[asked].astype(np.int64) == chosen["label"]).to_numpy()
    return pd.DataFrame({"file_name": chosen["file_name"].to_numpy(dtype=object),
                         "label": chosen["label"].to_numpy(np.int64),
                         "rater_id": rater_id,
                         "answer": pd.Categorical(np.where(is_original, "yes", "no"), dtype=ANSWER_DTYPE)})


def resolve(params: OriginalLabelRaterParams) -> np.ndarray | None:
    return resolve_prior_classes(params.classes)
