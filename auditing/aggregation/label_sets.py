"""From per-question scores to one label set per image (the ReaL rule).

- A rated image's label set = its questions whose score is > threshold (strictly, as
  the published ReaL labels are exactly the questions with score > 0.8).
- An image nobody rated keeps its original label.
- A rated image with no question above the threshold keeps an empty set (ReaL
  excludes such images from evaluation); they are counted, never dropped.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd


class LabelSets(dict[str, frozenset[int]]):
    """file_name -> frozenset of class indices, with the counts of how each came about."""

    def __init__(self, sets: dict[str, frozenset[int]], *, rated: int, unrated_kept_original: int,
                 rated_without_original: int, threshold: float):
        super().__init__(sets)
        self.rated = rated
        self.unrated_kept_original = unrated_kept_original
        self.rated_without_original = rated_without_original
        self.threshold = threshold

    @property
    def empty(self) -> int:
        return sum(1 for labels in self.values() if not labels)

    @property
    def counts(self) -> dict[str, Any]:
        return {"images": len(self), "labels": sum(len(s) for s in self.values()),
                "rated_images": self.rated, "unrated_kept_original": self.unrated_kept_original,
                "rated_without_original": self.rated_without_original, "empty_sets": self.empty,
                "threshold": self.threshold}

    def to_frame(self) -> pd.DataFrame:
        """Long format (file_name, label), one row per label; empty sets have no row."""
        rows = [(f, label) for f, labels in self.items() for label in sorted(labels)]
        return pd.DataFrame(rows, columns=["file_name", "label"]).astype({"label": "int64"})


def label_sets(scores: pd.DataFrame, original_labels: pd.DataFrame, threshold: float = 0.8) -> LabelSets:
    """``scores``: file_name, label, score (one row per rated question);
    ``original_labels``: file_name, label (one row per image of the split).

    Images appear in ``original_labels`` order, then rated images it lacks (counted in
    ``rated_without_original``)."""
    return label_sets_of_shards([scores], original_labels, threshold)


def label_sets_of_shards(shards: Iterable[pd.DataFrame], original_labels: pd.DataFrame,
                         threshold: float = 0.8) -> LabelSets:
    """``label_sets`` over scores given in parts (e.g. the Beam engine's score shards,
    read one at a time): only each part's labels above the threshold and its rated image
    names are kept, never the whole scores table."""
    missing = [c for c in ("file_name", "label") if c not in original_labels.columns]
    if missing:
        raise ValueError(f"original_labels lacks column(s) {missing}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    by_image: dict[str, frozenset[int]] = {}
    rated: dict[str, None] = {}  # insertion-ordered set
    for scores in shards:
        missing = [c for c in ("file_name", "label", "score") if c not in scores.columns]
        if missing:
            raise ValueError(f"scores lacks column(s) {missing}")
        for name, labels in _sets_above(scores, threshold).items():
            by_image[name] = by_image[name] | labels if name in by_image else labels
        rated.update(dict.fromkeys(pd.unique(scores["file_name"])))
    sets: dict[str, frozenset[int]] = {}
    unrated = 0
    for file_name, label in zip(original_labels["file_name"], original_labels["label"]):
        if file_name in sets:
            continue
        if file_name in rated:
            sets[file_name] = by_image.get(file_name, frozenset())
        else:
            sets[file_name] = frozenset({int(label)})
            unrated += 1
    extra = [f for f in rated if f not in sets]
    for file_name in extra:
        sets[file_name] = by_image.get(file_name, frozenset())
    return LabelSets(sets, rated=len(rated), unrated_kept_original=unrated,
                     rated_without_original=len(extra), threshold=threshold)


def _sets_above(scores: pd.DataFrame, threshold: float) -> dict[str, frozenset[int]]:
    above = scores["score"].to_numpy() > threshold
    # Images as codes and one split of the labels at the codes' boundaries: a groupby
    # with a Python function per image costs seconds on 50,000 images, sorting the
    # names twice what hashing them does.
    codes, names = pd.factorize(scores["file_name"].to_numpy(dtype=object)[above], use_na_sentinel=False)
    labels = scores["label"].to_numpy(np.int64)[above][np.argsort(codes, kind="stable")].tolist()
    ends = np.cumsum(np.bincount(codes, minlength=len(names))).tolist()
    return {name: frozenset(labels[start:end]) for name, start, end in zip(names.tolist(), [0, *ends[:-1]], ends)}
