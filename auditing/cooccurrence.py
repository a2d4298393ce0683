"""Co-occurring classes and the unbiased oracle (METHOD.md, stage 7).

For class c, the "oracle images" are the images whose original label is c and whose
label set contains c. Over them:

- co-occurrence share of class j: the share whose set also contains j (e.g. most
  "desktop computer" images also show a monitor and a keyboard);
- unbiased oracle accuracy: a model that answers one label of the set uniformly at
  random is right about the original label with probability 1/|set|, so its expected
  accuracy on class c is the mean of 1/|set|. A real model that beats it on a class
  has learned which of several present objects the original labellers happened to
  pick: the labelling bias, not the image.

Pure numpy/pandas; no I/O.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from auditing.metrics import LabelSetArray, per_class_accuracy


def oracle_images(original: np.ndarray, label_sets: LabelSetArray) -> np.ndarray:
    """Per image: its label set contains its original label."""
    return label_sets.contains(original)


def oracle_accuracy(original: np.ndarray, label_sets: LabelSetArray) -> np.ndarray:
    """Per class: mean of 1/|set| over its oracle images; NaN for a class without any."""
    kept = oracle_images(original, label_sets)
    chance = 1.0 / np.maximum(label_sets.sizes, 1)
    return per_class_accuracy(chance[kept], np.asarray(original)[kept], label_sets.num_classes)


def accuracy_on_oracle_images(top1: np.ndarray, original: np.ndarray,
                              label_sets: LabelSetArray) -> np.ndarray:
    """Per class: a model's accuracy against the original label over the oracle images
    (the images the oracle is scored on, so the two are comparable)."""
    kept = oracle_images(original, label_sets)
    original = np.asarray(original)
    correct = np.asarray(top1)[kept] == original[kept]
    return per_class_accuracy(correct, original[kept], label_sets.num_classes)


@dataclasses.dataclass
class Cooccurrence:
    """Co-occurrence of classes within label sets, grouped by original label.

    After ``fit``: ``support_[c]`` = number of oracle images of c, ``counts_[c, j]`` =
    how many of them also have j in their set (``counts_[c, c] == support_[c]``),
    ``shares_[c, j] = counts_[c, j] / support_[c]`` (NaN rows where support is 0),
    ``oracle_accuracy_[c]`` = the unbiased oracle's expected accuracy on c.
    """

    support_: np.ndarray = dataclasses.field(init=False)
    counts_: np.ndarray = dataclasses.field(init=False)
    shares_: np.ndarray = dataclasses.field(init=False)
    oracle_accuracy_: np.ndarray = dataclasses.field(init=False)

    def fit(self, original: np.ndarray, label_sets: LabelSetArray) -> "Cooccurrence":
        original = np.asarray(original, dtype=np.int64)
        if original.shape != (len(label_sets),):
            raise ValueError(f"expected {len(label_sets)} original labels, got shape {original.shape}")
        num_classes = label_sets.num_classes
        kept = oracle_images(original, label_sets)
        # Every (original class, co-present class) pair of every oracle image, counted
        # in one bincount over c * C + j.
        rows = label_sets.rows
        entry_kept = kept[rows]
        pairs = original[rows[entry_kept]] * num_classes + label_sets.indices[entry_kept]
        self.counts_ = np.bincount(pairs, minlength=num_classes * num_classes).reshape(
            num_classes, num_classes)
        self.support_ = np.bincount(original[kept], minlength=num_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.shares_ = np.where(self.support_[:, None] > 0,
                                    self.counts_ / np.maximum(self.support_, 1)[:, None], np.nan)
        self.oracle_accuracy_ = oracle_accuracy(original, label_sets)
        return self

    def top(self, label: int, k: int = 5, min_share: float = 0.0) -> list[tuple[int, float]]:
        """The ``k`` classes that co-occur most with ``label`` (itself excluded), as
        (class, share) with share > ``min_share``, highest first (ties: lower index)."""
        shares = self.shares_[label].copy()
        shares[label] = np.nan
        order = np.lexsort((np.arange(len(shares)), -np.nan_to_num(shares, nan=-1.0)))
        return [(int(j), float(shares[j])) for j in order[:k]
                if not np.isnan(shares[j]) and shares[j] > min_share]


def classes_beating_oracle(model_accuracy: np.ndarray, oracle: np.ndarray,
                           support: np.ndarray) -> pd.DataFrame:
    """Classes where a model's accuracy (on the oracle images) exceeds the oracle's.

    Columns: label, n_images, model_accuracy, oracle_accuracy, margin; largest margin
    first. Classes with no oracle image are left out.
    """
    model_accuracy, oracle = np.asarray(model_accuracy), np.asarray(oracle)
    margin = model_accuracy - oracle
    beats = np.flatnonzero(~np.isnan(margin) & (margin > 0))
    table = pd.DataFrame({
        "label": beats,
        "n_images": np.asarray(support)[beats],
        "model_accuracy": model_accuracy[beats],
        "oracle_accuracy": oracle[beats],
        "margin": margin[beats],
    })
    return table.sort_values(["margin", "label"], ascending=[False, True], ignore_index=True)
