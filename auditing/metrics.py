"""Accuracy metrics over label sets: original, ReaL, strict top-k, multi-label, per class.

Pure numpy/pandas, no I/O. Images are rows; every per-image array has one entry per
image, in the same order as the ``LabelSetArray`` it is scored against.

Definitions (METHOD.md, stage 6):
- original accuracy: top-1 equals the single original label.
- ReaL accuracy (Beyer et al. 2020): top-1 is in the image's label set; images with an
  empty set are excluded (big_vision's ReaL evaluator masks them out the same way).
- strict top-k: the model's k highest logits, as a set, equal the label set. ``k`` is
  the size of each image's own set (so a 2-label image needs exactly its two labels as
  the top-2); ``strict_topk_accuracy(..., k=K)`` instead scores only images whose set
  has exactly K labels. Empty sets are excluded. Needs logits (top-1 alone cannot say
  what the second guess was).
- multi-label accuracy (Shankar et al. 2020, TFDS ``imagenet2012_multilabel``): top-1 is
  correct if it is in the "correct" or the "unclear" set, problematic images are
  skipped, accuracy is computed per class (of the original label) and then averaged
  over classes. With ReaL sets: correct = the set, unclear = empty, problematic =
  images whose set is empty.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd


class LabelOutOfRange(ValueError):
    """A label outside [0, num_classes); names the image (position, or file name)."""

    def __init__(self, image: int, label: int, num_classes: int, file_name: str | None = None):
        where = file_name if file_name is not None else f"image {image}"
        super().__init__(f"{where}: label {label} is outside [0, {num_classes})")
        self.image, self.label = image, label


@dataclasses.dataclass(frozen=True)
class LabelSetArray:
    """Label sets of ``n`` images in CSR form.

    The labels of image ``i`` are ``indices[indptr[i]:indptr[i + 1]]``, sorted and
    unique. Compact (57k labels for ImageNet val instead of a 50M-entry multi-hot) and
    fast to score against: every metric below is a few vectorised numpy calls.
    """

    indptr: np.ndarray
    indices: np.ndarray
    num_classes: int

    @classmethod
    def from_sets(cls, sets: Iterable[Collection[int]], num_classes: int) -> "LabelSetArray":
        """From one collection of class indices per image (duplicates are dropped)."""
        # Each set read twice (its size, its labels), never copied: ~10^5 sets per report.
        sets = sets if isinstance(sets, (list, tuple)) else list(sets)
        sizes = np.fromiter(map(len, sets), dtype=np.int64, count=len(sets))
        rows = np.repeat(np.arange(len(sets), dtype=np.int64), sizes)
        labels = np.fromiter(itertools.chain.from_iterable(sets), dtype=np.int64, count=len(rows))
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            first = np.flatnonzero(bad)[0]
            raise LabelOutOfRange(int(rows[first]), int(labels[first]), num_classes)
        # One sorted, de-duplicated key per (image, label) pair.
        keys = np.unique(rows * num_classes + labels)
        indices = keys % num_classes
        sizes = np.bincount(keys // num_classes, minlength=len(sets))
        indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls(indptr=indptr, indices=indices, num_classes=num_classes)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Number of labels of each image."""
        return np.diff(self.indptr)

    @property
    def rows(self) -> np.ndarray:
        """The image index of each entry of ``indices``."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.sizes)

    def contains(self, labels: np.ndarray) -> np.ndarray:
        """Whether ``labels[i]`` is in the set of image ``i``, for every image."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(self),):
            raise ValueError(f"expected {len(self)} labels (one per image), got shape {labels.shape}")
        rows = self.rows
        hits = rows[self.indices == labels[rows]]
        return np.bincount(hits, minlength=len(self)).astype(bool)

    def take(self, images: np.ndarray) -> "LabelSetArray":
        """The sets of the given images (indices or a boolean mask), in that order."""
        images = np.arange(len(self))[images]
        sizes = self.sizes[images]
        indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        starts = np.repeat(self.indptr[images] - indptr[:-1], sizes)
        indices = self.indices[starts + np.arange(indptr[-1])]
        return LabelSetArray(indptr=indptr, indices=indices, num_classes=self.num_classes)

    def to_sets(self) -> list[frozenset[int]]:
        return [frozenset(self.indices[a:b].tolist()) for a, b in zip(self.indptr[:-1], self.indptr[1:])]


def _nan_mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def original_accuracy(top1: np.ndarray, original: np.ndarray) -> float:
    """Share of images whose top-1 equals the original label."""
    return _nan_mean(np.asarray(top1) == np.asarray(original))


def real_correct(top1: np.ndarray, label_sets: LabelSetArray) -> np.ndarray:
    """Per image: top-1 is in the label set (always False for an empty set)."""
    return label_sets.contains(top1)


def real_accuracy(top1: np.ndarray, label_sets: LabelSetArray) -> float:
    """ReaL accuracy: share of images with a non-empty set whose top-1 is in the set."""
    rated = label_sets.sizes > 0
    return _nan_mean(real_correct(top1, label_sets)[rated])


def strict_topk_correct(logits: np.ndarray, label_sets: LabelSetArray) -> np.ndarray:
    """Per image: the top-|set| classes equal the set (False for empty sets)."""
    logits = np.asarray(logits)
    sizes = label_sets.sizes
    correct = np.zeros(len(label_sets), dtype=bool)
    for k in np.unique(sizes[sizes > 0]):
        images = np.flatnonzero(sizes == k)
        top = np.sort(np.argpartition(-logits[images], int(k) - 1, axis=1)[:, :k], axis=1)
        # Within each row indices are sorted, so rows of size k line up column by column.
        wanted = label_sets.indices[label_sets.indptr[images][:, None] + np.arange(k)]
        correct[images] = (top == wanted).all(axis=1)
    return correct


def strict_topk_accuracy(logits: np.ndarray, label_sets: LabelSetArray, k: int | None = None) -> float:
    """Strict top-k accuracy; ``k=None``: k = each image's set size (non-empty sets).

    With an int ``k``, only images whose set has exactly ``k`` labels are scored.
    """
    sizes = label_sets.sizes
    scored = sizes > 0 if k is None else sizes == k
    return _nan_mean(strict_topk_correct(logits, label_sets)[scored])


def strict_topk_by_size(logits: np.ndarray, label_sets: LabelSetArray) -> dict[int, float]:
    """Strict top-k accuracy for each set size k present (k = 1, 2, ...)."""
    correct = strict_topk_correct(logits, label_sets)
    sizes = label_sets.sizes
    return {int(k): float(correct[sizes == k].mean()) for k in np.unique(sizes[sizes > 0])}


def per_class_accuracy(correct: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean of ``correct`` over the images of each class; NaN for a class with no image."""
    classes = np.asarray(classes, dtype=np.int64)
    totals = np.bincount(classes, minlength=num_classes).astype(np.float64)
    hits = np.bincount(classes, weights=np.asarray(correct, dtype=np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, hits / np.maximum(totals, 1), np.nan)


@dataclasses.dataclass(frozen=True)
class MultiLabelAccuracy:
    """Shankar et al.'s multi-label accuracy: ``mean`` = average of ``per_class`` over
    the classes that have at least one scored image."""

    mean: float
    per_class: np.ndarray
    n_images: int


def multilabel_accuracy(top1: np.ndarray, original: np.ndarray, correct_sets: LabelSetArray,
                        unclear_sets: LabelSetArray | None = None,
                        problematic: np.ndarray | None = None) -> MultiLabelAccuracy:
    """Multi-label accuracy, TFDS ``imagenet2012_multilabel`` semantics.

    ``problematic`` (bool per image) defaults to "correct and unclear sets both empty",
    which with ReaL sets skips the images ReaL excludes.
    """
    top1 = np.asarray(top1, dtype=np.int64)
    hit = correct_sets.contains(top1)
    if unclear_sets is not None:
        hit |= unclear_sets.contains(top1)
    if problematic is None:
        problematic = correct_sets.sizes == 0
        if unclear_sets is not None:
            problematic &= unclear_sets.sizes == 0
    kept = ~np.asarray(problematic, dtype=bool)
    per_class = per_class_accuracy(hit[kept], np.asarray(original)[kept], correct_sets.num_classes)
    scored = per_class[~np.isnan(per_class)]
    return MultiLabelAccuracy(mean=_nan_mean(scored), per_class=per_class, n_images=int(kept.sum()))


def subset_mask(classes: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """Images whose class (e.g. original label) is one of ``subset``'s classes."""
    return np.isin(np.asarray(classes), np.asarray(subset))


def align(target: Sequence[str], source: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Positions pairing two lists of file names: ``target[t[i]] == source[s[i]]``.

    Names of ``target`` missing from ``source`` are left out; ``source`` must not
    repeat a name.
    """
    index = pd.Index(source)
    if index.has_duplicates:
        raise ValueError(f"file name {index[index.duplicated()][0]!r} appears more than once")
    positions = index.get_indexer(pd.Index(target))
    found = np.flatnonzero(positions >= 0)
    return found, positions[found]


@dataclasses.dataclass(frozen=True)
class Regression:
    """Least-squares line ``y = slope * x + intercept`` with Pearson r."""

    slope: float
    intercept: float
    r: float
    n: int
    x_range: tuple[float, float]


def linear_fit(x: np.ndarray, y: np.ndarray) -> Regression:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        raise ValueError(f"a line needs at least 2 points, got {len(x)}")
    slope, intercept = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
    return Regression(float(slope), float(intercept), r, len(x), (float(x.min()), float(x.max())))


def accuracy_regression(original: np.ndarray, real: np.ndarray) -> dict[str, Regression]:
    """ReaL accuracy regressed on original accuracy across models.

    ``all`` models, and the ``lower_half`` / ``upper_half`` by original accuracy (the
    paper's question: do gains on the original labels still carry over to ReaL at
    the top?). With an odd count the middle model goes to the upper half.
    """
    original, real = np.asarray(original, dtype=np.float64), np.asarray(real, dtype=np.float64)
    order = np.argsort(original, kind="stable")
    lower, upper = order[:len(order) // 2], order[len(order) // 2:]
    return {"all": linear_fit(original, real),
            "lower_half": linear_fit(original[lower], real[lower]),
            "upper_half": linear_fit(original[upper], real[upper])}


def sets_from_mapping(file_names: Sequence[str], sets: Mapping[str, Collection[int]],
                      num_classes: int) -> LabelSetArray:
    """``LabelSetArray`` for ``file_names`` from a {file_name: labels} mapping (all must be present)."""
    missing = [f for f in file_names if f not in sets]
    if missing:
        raise KeyError(f"{len(missing)} file names have no label set, e.g. {missing[0]!r}")
    try:
        return LabelSetArray.from_sets((sets[f] for f in file_names), num_classes)
    except LabelOutOfRange as e:  # name the file, not just its position
        raise LabelOutOfRange(e.image, e.label, num_classes, file_names[e.image]) from None


def _sorted_members(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``np.isin(values, keys)`` for sorted unique ``keys`` (a ``LabelSetArray``'s
    ``rows * num_classes + indices``): a binary search each, no sort of both."""
    at = np.minimum(np.searchsorted(keys, values), max(len(keys) - 1, 0))
    return keys[at] == values if len(keys) else np.zeros(len(values), dtype=bool)


def agreement_with_published(scores: pd.DataFrame, ours: Mapping[str, frozenset[int]],
                             published: Mapping[str, frozenset[int]],
                             original_labels: Mapping[str, int] | None = None) -> dict[str, float | int]:
    """How our audit agrees with published label sets (e.g. ReaL's real.json).

    ``scores``: the rated questions (file_name, label, ...). Per question: is the label
    in our set exactly when it is in the published set. Per rated image: are the two
    sets equal. For measuring only: published labels never feed the labels.
    """
    names = list(ours)
    image = pd.Index(names).get_indexer(scores["file_name"])
    asked = image >= 0  # questions about our images
    image, labels = image[asked], scores["label"].to_numpy(np.int64)[asked]
    ours_sets = [ours[f] for f in names]
    published_sets = [published.get(f, frozenset()) for f in names]
    num_classes = 1 + max(max(map(max, filter(None, ours_sets)), default=0),
                          max(map(max, filter(None, published_sets)), default=0), int(labels.max(initial=0)))
    arrays = {"ours": LabelSetArray.from_sets(ours_sets, num_classes),
              "published": LabelSetArray.from_sets(published_sets, num_classes)}
    # (image, label) pairs as one integer key each: set membership and equality in numpy.
    ours_keys, published_keys = (a.rows * num_classes + a.indices for a in arrays.values())
    questions = image * num_classes + labels
    in_ours, in_published = _sorted_members(questions, ours_keys), _sorted_members(questions, published_keys)
    same_set = np.ones(len(names), dtype=bool)
    same_set[np.setxor1d(ours_keys, published_keys, assume_unique=True) // num_classes] = False
    rated = pd.unique(image)
    extra = {}
    if original_labels is not None:
        # ReaL accuracy of the original labels under each label set (empty sets excluded;
        # so are images without an original label, -1 here: align_inputs allows them).
        original = np.fromiter((original_labels.get(f, -1) for f in names), np.int64, len(names))
        for which, array in arrays.items():
            hits = array.contains(original)[(array.sizes > 0) & (original >= 0)]
            extra[f"original_labels_real_accuracy_{which}"] = float(np.mean(hits)) if len(hits) else float("nan")
    return extra | {"questions": int(len(questions)), "question_agreement": float((in_ours == in_published).mean()),
            "rated_images": int(len(rated)), "image_exact_match": float(same_set[rated].mean()),
            "all_images_exact_match": float(same_set.mean())}


@dataclasses.dataclass(frozen=True)
class ProposalQuality:
    """Proposed (image, label) pairs against reference label sets (e.g. ReaL), over the
    images whose reference set is non-empty: ``recall`` = share of the reference labels
    that were proposed, ``precision`` = share of the proposals that are reference labels."""

    n_images: int
    n_reference_labels: int
    n_proposed: int
    n_hits: int

    @property
    def recall(self) -> float:
        return self.n_hits / self.n_reference_labels if self.n_reference_labels else float("nan")

    @property
    def precision(self) -> float:
        return self.n_hits / self.n_proposed if self.n_proposed else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self) | {"recall": self.recall, "precision": self.precision}


def proposal_quality(proposed: LabelSetArray, reference: LabelSetArray) -> ProposalQuality:
    """Recall and precision of ``proposed`` sets against ``reference`` sets, row for row;
    images with an empty reference set are left out (ReaL excludes them)."""
    if len(proposed) != len(reference) or proposed.num_classes != reference.num_classes:
        raise ValueError(f"{len(proposed)} proposed sets x {proposed.num_classes} classes against "
                         f"{len(reference)} reference sets x {reference.num_classes} classes")
    scored = np.flatnonzero(reference.sizes > 0)
    proposed, reference = proposed.take(scored), reference.take(scored)
    c = reference.num_classes
    hits = np.intersect1d(proposed.rows * c + proposed.indices, reference.rows * c + reference.indices,
                          assume_unique=True)
    return ProposalQuality(n_images=int(len(scored)), n_reference_labels=int(len(reference.indices)),
                           n_proposed=int(len(proposed.indices)), n_hits=int(len(hits)))
