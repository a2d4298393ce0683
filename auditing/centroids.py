"""Nearest class centroid of each image's penultimate features: one more label proposer.

The "croquet ball that is a tennis ball" audit: a model's top-1 repeats what the
labelling taught it, but an image whose features sit closer to another class's
images than to its own class's is worth asking about, whatever the classifier says.

A class centroid is the mean of the L2-normalised features of that class's reference
images; similarity is cosine. The reference set is

- ``"audited"``: the audited images themselves under their original labels, each image
  left out of its own class's centroid (else every image would pull its centroid
  towards its own label); an image that is its class's only reference has no centroid
  of its own class and is matched to the others;
- ``"examples"``: a separate labelled set (e.g. ``imagenet_class_examples/``, one
  image per class), which no audited image is part of;
- ``"both"``: the union, with the same leave-one-out for the audited images.

Pure numpy: features in, labels out (``pipelines/`` reads the prediction files).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np

from auditing.metrics import LabelSetArray
from auditing.proposals import ModelSelections

Reference = Literal["audited", "examples", "both"]
REFERENCES = ("audited", "examples", "both")
# Rows of the (images x classes) similarity matrix computed at once: 4096 x 1000 float32 = 16 MB.
_ROWS_PER_CHUNK = 4096


def _unit_rows(features: np.ndarray, what: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"{what}: features must be (n, D), got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{what}: features hold NaN or infinite values")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    # An all-zero feature vector has no direction: it stays zero, similar to nothing.
    return features / np.where(norms > 0, norms, 1.0)


def _check_labels(labels: np.ndarray, n: int, num_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"{what}: expected {n} labels, got shape {labels.shape}")
    if (labels >= num_classes).any() or (labels < -1).any():
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}) (or -1 for unknown)")
    return labels


@dataclasses.dataclass
class NearestCentroid:
    """Nearest class centroid (cosine) of every audited image.

    ``fit(features, labels, example_features, example_labels)``: ``features`` (N, D) of the
    audited images, ``labels`` (N,) their original labels (-1 = unknown: queried, never a
    reference); the examples are needed for ``reference="examples"`` / ``"both"``.

    Fitted: ``labels_`` (N,) the nearest class (-1 where no class has a centroid),
    ``similarity_`` (N,) its cosine, ``own_similarity_`` (N,) the cosine to the image's
    own class (leave-one-out; NaN where it has none), ``counts_`` (C,) reference
    images per class.
    """

    reference: Reference = "both"
    num_classes: int = 1000

    labels_: np.ndarray = dataclasses.field(init=False, repr=False)
    similarity_: np.ndarray = dataclasses.field(init=False, repr=False)
    own_similarity_: np.ndarray = dataclasses.field(init=False, repr=False)
    counts_: np.ndarray = dataclasses.field(init=False, repr=False)

    def fit(self, features: np.ndarray, labels: np.ndarray,
            example_features: np.ndarray | None = None,
            example_labels: np.ndarray | None = None) -> "NearestCentroid":
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        queries = _unit_rows(features, "audited images")
        labels = _check_labels(labels, len(queries), self.num_classes, "audited images")
        dim = queries.shape[1]
        sums = np.zeros((self.num_classes, dim), np.float64)
        counts = np.zeros(self.num_classes, np.int64)
        if self.reference in ("examples", "both"):
            if example_features is None or example_labels is None:
                raise ValueError(f"reference={self.reference!r} needs example_features and example_labels")
            examples = _unit_rows(example_features, "examples")
            if examples.shape[1] != dim:
                raise ValueError(f"examples have {examples.shape[1]} features, the audited images {dim}")
            example_labels = _check_labels(example_labels, len(examples), self.num_classes, "examples")
            known = example_labels >= 0
            np.add.at(sums, example_labels[known], examples[known])
            counts += np.bincount(example_labels[known], minlength=self.num_classes)
        audited = self.reference in ("audited", "both")
        known = labels >= 0
        if audited:
            np.add.at(sums, labels[known], queries[known])
            counts += np.bincount(labels[known], minlength=self.num_classes)

        # Cosine to a centroid = cosine to the class's sum of unit vectors (scale is irrelevant).
        sum_norms = np.linalg.norm(sums, axis=1)
        directions = (sums / np.where(sum_norms > 0, sum_norms, 1.0)[:, None]).astype(np.float32)
        has_centroid = sum_norms > 0
        nearest = np.full(len(queries), -1, np.int64)
        best = np.full(len(queries), np.nan)
        own = np.full(len(queries), np.nan)
        for start in range(0, len(queries), _ROWS_PER_CHUNK):
            rows = slice(start, start + _ROWS_PER_CHUNK)
            sims = queries[rows] @ directions.T
            sims[:, ~has_centroid] = -np.inf
            chunk_labels = labels[rows]
            mine = np.flatnonzero(chunk_labels >= 0)
            if len(mine):
                own_class = chunk_labels[mine]
                if audited:
                    # Leave one out: the class sum without this image.
                    rest = sums[own_class] - queries[rows][mine]
                    rest_norm = np.linalg.norm(rest, axis=1)
                    empty = (counts[own_class] <= 1) | (rest_norm <= 1e-6)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        loo = np.einsum("ij,ij->i", queries[rows][mine], rest) / rest_norm
                    sims[mine, own_class] = np.where(empty, -np.inf, loo)
                own_values = sims[mine, own_class]
                own[start + mine] = np.where(np.isfinite(own_values), own_values, np.nan)
            found = np.isfinite(sims).any(axis=1)
            # argmax takes the lower class index among equal similarities.
            arg = np.argmax(sims, axis=1)
            nearest[rows] = np.where(found, arg, -1)
            best[rows] = np.where(found, sims[np.arange(len(arg)), arg], np.nan)
        self.labels_, self.similarity_, self.own_similarity_, self.counts_ = nearest, best, own, counts
        return self

    def fit_predict(self, features: np.ndarray, labels: np.ndarray,
                    example_features: np.ndarray | None = None,
                    example_labels: np.ndarray | None = None) -> np.ndarray:
        return self.fit(features, labels, example_features, example_labels).labels_

    def as_selections(self, name: str) -> ModelSelections:
        """The nearest centroids as a top-1-only proposer for ``auditing.proposals``'s pool:
        its pairs carry the source ``"<name>:top1"`` (e.g. ``centroid-efficientnet-lite2``)."""
        if (self.labels_ < 0).any():
            raise ValueError(f"{int((self.labels_ < 0).sum())} images have no centroid to propose "
                             "(no reference image of any class)")
        empty = np.zeros(0, np.int64)
        return ModelSelections(name, self.num_classes, empty, empty, self.labels_.copy())


def suspected_label_errors(original: np.ndarray, nearest: np.ndarray,
                           top1: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per image: its original label is neither its nearest centroid nor any model's top-1."""
    original = np.asarray(original, dtype=np.int64)
    agreed = np.asarray(nearest) == original
    for values in top1.values():
        agreed |= np.asarray(values) == original
    return ~agreed


@dataclasses.dataclass(frozen=True)
class DisagreementCheck:
    """Of the images (with a non-empty ReaL-style set) where a proposer's label differs
    from the original label, how many have that label in their set."""

    n_images: int  # images with a non-empty set
    n_disagreeing: int  # ... whose proposed label differs from the original label
    n_in_set: int  # ... and is in the set

    @property
    def share_in_set(self) -> float:
        return self.n_in_set / self.n_disagreeing if self.n_disagreeing else float("nan")


def check_disagreements(original: np.ndarray, proposed: np.ndarray, sets: LabelSetArray) -> DisagreementCheck:
    """How often a label that contradicts the original is confirmed by ``sets`` (e.g. ReaL)."""
    original, proposed = np.asarray(original, np.int64), np.asarray(proposed, np.int64)
    rated = sets.sizes > 0
    disagreeing = rated & (proposed != original) & (proposed >= 0)
    in_set = disagreeing & sets.contains(np.where(proposed >= 0, proposed, 0))
    return DisagreementCheck(int(rated.sum()), int(disagreeing.sum()), int(in_set.sum()))


def labels_added(proposed: np.ndarray, sets: LabelSetArray, pool: LabelSetArray) -> np.ndarray:
    """Per image: the proposed label is in its set (e.g. ReaL) but not among the pool's
    proposals for it: a true label that only this proposer finds."""
    proposed = np.asarray(proposed, np.int64)
    valid = proposed >= 0
    safe = np.where(valid, proposed, 0)
    return valid & sets.contains(safe) & ~pool.contains(safe)


def centroid_summary(original: np.ndarray, nearest: np.ndarray, top1: Mapping[str, np.ndarray],
                     sets: LabelSetArray, pool: LabelSetArray) -> dict[str, object]:
    """The centroid proposer measured against reference sets (e.g. ReaL), beside the
    models' top-1 (JSON-ready): for the images where each disagrees with the original
    label, how often its label is in the set; the set labels only the centroid finds
    (not in ``pool``); and the suspected label errors."""
    def check(proposed: np.ndarray) -> dict[str, object]:
        c = check_disagreements(original, proposed, sets)
        return {"n_images": c.n_images, "n_disagreeing": c.n_disagreeing, "n_in_set": c.n_in_set,
                "share_in_set": None if c.n_disagreeing == 0 else c.share_in_set}

    suspects = suspected_label_errors(original, nearest, top1)
    rated = sets.sizes > 0
    return {"centroid": check(nearest),
            "top1": {name: check(values) for name, values in top1.items()},
            "set_labels_only_the_centroid_finds": int(labels_added(nearest, sets, pool).sum()),
            "nearest_is_original": float(np.mean(np.asarray(nearest) == np.asarray(original))),
            "suspected_label_errors": int(suspects.sum()),
            "suspected_with_a_set": int((suspects & rated).sum()),
            "suspected_with_original_not_in_set": int(
                (suspects & rated & ~sets.contains(np.asarray(original, np.int64))).sum())}
