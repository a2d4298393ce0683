"""Which questions share a class prior in Dawid-Skene.

Plain DS has one prior P(present) for every question. A question about an image's
original ImageNet label is far more often "present" than one about a model's
proposal (68.5% vs 9.6% in the published ReaL labels), so pooling them makes a weak
"no"-leaning vote pattern look the same on both.

Measured offline (``benchmarks/aggregation_fidelity.py`` and the analysis in its
docstring): the published ReaL ``scores.npz`` is reproduced to 1e-10 in log-odds by
``logit(score) = prior(group) + sum over votes of w[rater, answer]`` with exactly
three groups: (animal class, original label), (animal class, other label), and every
other question. "Animal" is WordNet n00015388, i.e. ImageNet classes 0..397. So
``prior_classes=ANIMAL_WNID`` reproduces the published prior structure; ``None``
splits every class by original label (the uniform variant, slightly worse against
the published labels). With the golden questions the structure is explained: the
published scores have one prior and the original label as a pseudo-rater on animal
classes (``gold-confusion``, ``original_label_rater.py``).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

ANIMAL_WNID = "n00015388"  # WordNet "animal": ImageNet classes 0..397
ORIGINAL, PROPOSED, SHARED = "original", "proposed", "shared"


def resolve_prior_classes(spec: str | Iterable[int] | None) -> np.ndarray | None:
    """A WordNet id (its descendant ImageNet classes), class indices, or None (all)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        from auditing.imagenet import load_hierarchy  # reads the pinned WordNet file

        return load_hierarchy().descendant_classes(spec)
    return np.asarray(list(spec), dtype=np.int64)


def original_label_prior_groups(questions: pd.DataFrame, original_labels: pd.DataFrame,
                                classes: Iterable[int] | None = None) -> pd.DataFrame:
    """Per question (file_name, label): ``original`` if label is the image's original
    label, ``proposed`` otherwise, for labels in ``classes`` (all when None); labels
    outside ``classes`` form one ``shared`` group. Images without an original label
    count as ``proposed``."""
    original = original_labels.drop_duplicates("file_name").set_index("file_name")["label"]
    of_image = questions["file_name"].map(original)
    is_original = (of_image == questions["label"]).to_numpy()
    group = np.where(is_original, ORIGINAL, PROPOSED).astype(object)
    if classes is not None:
        group[~questions["label"].isin(np.asarray(list(classes))).to_numpy()] = SHARED
    return pd.DataFrame({"file_name": questions["file_name"].to_numpy(),
                         "label": questions["label"].to_numpy(), "group": group})
