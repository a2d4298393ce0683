"""Stage 2 of METHOD.md: label proposals per model, pooled across models.

Per model, two global selections over the whole split (not a per-image top-k):
the ``n`` largest logits and, separately, the ``n`` largest softmax probabilities
(``n`` = 3 x images by default). Each selected entry is an (image, label) pair.

Exactness. Every entry is ranked by (value descending, image ascending, label
ascending), a total order, so each selection holds exactly ``n`` pairs and equals
what a full sort of all images x classes values gives, ties included. "image" is
the image's position in the split's image order (sorted file names, or the
predictions' ``image_index``); an entry's *key* is ``image * num_classes + label``,
so ties at the n-th value are broken by the smaller key. Because the order is
total, the global top-n is a subset of the union of the top-n of any partition of
the rows, so shards can be selected independently and merged exactly
(:func:`merge_top_n`). Probabilities are computed row by row in float64
(:func:`softmax64`), so a shard gives the same bits as the whole matrix.

Pooling (:func:`pool_proposals`). A pair's ``count`` is the number of (model,
criterion) top-n selections holding it, criterion in {logits, probs}: one model
selecting a pair by both logits and probabilities counts 2. Pairs with count < 2
are dropped; then every model's top-1 (argmax of the logits, the lowest label on
ties) and every original label are added whatever their count. A pair's sources
say who proposed it: ``"<model>:logits"``, ``"<model>:probs"``, ``"<model>:top1"``
and ``"original"``.

Everything here is numpy over arrays; reading files and Beam live in
``pipelines/propose.py``.
"""
from __future__ import annotations

from auditing.errors import InputError
import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

CRITERIA = ("logits", "probs")
TOP1 = "top1"
ORIGINAL = "original"
# Models are bits of a uint64 mask.
MAX_MODELS = 64
_FORBIDDEN_IN_MODEL_NAMES = (":", ";", "+")


def default_top_n(num_images: int) -> int:
    """The paper's N: 3 selections per image on average (150,000 for 50,000 images)."""
    return 3 * num_images


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (each row computed alone, so shards match the whole)."""
    x = np.array(logits, dtype=np.float64)  # a copy: the steps below work in place
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


@dataclasses.dataclass(frozen=True)
class TopN:
    """Entries of one criterion ranked by (value desc, key asc), at most ``n`` of them.

    ``values`` are float64 (exact for float16/32 logits); ``keys`` are int64
    ``image * num_classes + label``. Order within the arrays carries no meaning.
    """

    values: np.ndarray
    keys: np.ndarray

    @classmethod
    def empty(cls) -> TopN:
        return cls(np.empty(0, np.float64), np.empty(0, np.int64))

    def __len__(self) -> int:
        return int(self.keys.size)


def _exact_top_n_positions(values: np.ndarray, n: int, keys_of, check_nan: bool = True) -> np.ndarray:
    """Positions of the ``n`` first entries of ``values`` in (value desc, key asc) order.

    ``keys_of(positions)`` returns the keys of those positions; it is only asked
    for the entries tied at the n-th value, so a matrix never needs all its keys.
    """
    size = values.size
    if n >= size:
        return np.arange(size)
    if n <= 0:
        return np.empty(0, np.int64)
    if check_nan and np.isnan(values).any():
        raise ValueError(f"NaN among the values at position {int(np.flatnonzero(np.isnan(values))[0])}")
    threshold = np.partition(values, size - n)[size - n]
    above = np.flatnonzero(values > threshold)
    tied = np.flatnonzero(values == threshold)
    wanted = n - above.size
    if tied.size > wanted:
        tied_keys = keys_of(tied)
        tied = tied[np.argpartition(tied_keys, wanted - 1)[:wanted]]
    return np.concatenate([above, tied])


def top_n_of_matrix(values: np.ndarray, row_images: np.ndarray, n: int, check_nan: bool = True) -> TopN:
    """Exact top-``n`` entries of a (rows, classes) matrix whose row r is image ``row_images[r]``.

    ``check_nan=False`` skips the NaN check for values known to be finite.
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"expected a (rows, classes) matrix, got shape {values.shape}")
    num_classes = values.shape[1]
    row_images = np.asarray(row_images, dtype=np.int64)
    flat = values.reshape(-1)

    def keys_of(positions: np.ndarray) -> np.ndarray:
        rows, labels = np.divmod(positions, num_classes)
        return row_images[rows] * num_classes + labels

    positions = _exact_top_n_positions(flat, n, keys_of, check_nan)
    return TopN(flat[positions].astype(np.float64), keys_of(positions))


def merge_top_n(parts: Iterable[TopN], n: int) -> TopN:
    """Exact top-``n`` of the union of several :class:`TopN` (disjoint keys)."""
    parts = list(parts)
    if not parts:
        return TopN.empty()
    values = np.concatenate([p.values for p in parts])
    keys = np.concatenate([p.keys for p in parts])
    positions = _exact_top_n_positions(values, n, lambda pos: keys[pos])
    return TopN(values[positions], keys[positions])


class NonFiniteLogitsError(InputError):
    """A row of logits holds a NaN or an infinity; ``row`` is its index in the block given."""

    def __init__(self, row: int):
        super().__init__(f"logits row {row} has a NaN or infinite value")
        self.row = row


@dataclasses.dataclass(frozen=True)
class ModelTopN:
    """One model's partial result over some rows: top-n per criterion and the rows' top-1."""

    logits: TopN
    probs: TopN
    top1_images: np.ndarray  # int64, the images these rows cover
    top1_labels: np.ndarray  # int64, argmax of each row's logits

    @classmethod
    def of_rows(cls, logits: np.ndarray, row_images: np.ndarray, n: int) -> ModelTopN:
        """Summarise a block of rows (a shard or the whole split)."""
        logits = np.asarray(logits)
        if logits.ndim != 2 or not np.issubdtype(logits.dtype, np.floating):
            raise ValueError(f"expected float logits of shape (rows, classes), got {logits.dtype} "
                             f"{logits.shape}")
        finite = np.isfinite(logits).all(axis=1)
        if not finite.all():
            raise NonFiniteLogitsError(int(np.argmin(finite)))
        # Finite logits (checked above) give finite probabilities: no NaN checks needed.
        return cls(logits=top_n_of_matrix(logits, row_images, n, check_nan=False),
                   probs=top_n_of_matrix(softmax64(logits), row_images, n, check_nan=False),
                   top1_images=np.asarray(row_images, dtype=np.int64).copy(),
                   top1_labels=logits.argmax(axis=1).astype(np.int64))

    @classmethod
    def merge(cls, parts: Sequence[ModelTopN], n: int) -> ModelTopN:
        return cls(logits=merge_top_n([p.logits for p in parts], n),
                   probs=merge_top_n([p.probs for p in parts], n),
                   top1_images=np.concatenate([p.top1_images for p in parts]),
                   top1_labels=np.concatenate([p.top1_labels for p in parts]))


@dataclasses.dataclass(frozen=True)
class ModelSelections:
    """One model's stage-2 selections over the whole split.

    ``logits`` / ``probs``: sorted int64 keys (``image * num_classes + label``) of
    its top-n entries; ``top1``: (num_images,) its argmax label per image.
    """

    name: str
    num_classes: int
    logits: np.ndarray
    probs: np.ndarray
    top1: np.ndarray

    def __post_init__(self) -> None:
        check_model_name(self.name)

    @classmethod
    def from_top_n(cls, name: str, summary: ModelTopN, num_images: int,
                   num_classes: int) -> ModelSelections:
        """Finish a merged summary; every image must have been covered exactly once."""
        covered = np.bincount(summary.top1_images, minlength=num_images)
        if covered.size != num_images or (covered != 1).any():
            missing = np.flatnonzero(covered[:num_images] == 0)
            twice = np.flatnonzero(covered > 1)
            raise ValueError(f"model {name!r}: rows must cover images 0..{num_images - 1} once each; "
                             f"{missing.size} missing, {twice.size} seen twice or out of range")
        top1 = np.empty(num_images, np.int64)
        top1[summary.top1_images] = summary.top1_labels
        return cls(name, num_classes, np.sort(summary.logits.keys), np.sort(summary.probs.keys), top1)

    @property
    def num_images(self) -> int:
        return int(self.top1.size)


def select_model_proposals(name: str, logits: np.ndarray, n: int,
                           row_images: np.ndarray | None = None) -> ModelSelections:
    """In-memory stage 2 for one model: ``logits`` (images, classes), row r = image ``row_images[r]``."""
    logits = np.asarray(logits)
    num_images, num_classes = logits.shape
    if row_images is None:
        row_images = np.arange(num_images)
    return ModelSelections.from_top_n(name, ModelTopN.of_rows(logits, row_images, n),
                                      num_images, num_classes)


def check_model_name(name: str) -> None:
    if not name or any(c in name for c in _FORBIDDEN_IN_MODEL_NAMES):
        raise ValueError(f"model name {name!r} must be non-empty and contain none of "
                         f"{_FORBIDDEN_IN_MODEL_NAMES} (they separate sources and subsets)")


def popcount(masks: np.ndarray) -> np.ndarray:
    """Set bits per element of a uint64 array."""
    masks = np.asarray(masks, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(masks).astype(np.int64)
    as_bytes = masks.view(np.uint8).reshape(masks.shape + (8,))
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1).astype(np.int64)


def models_mask(indices: Iterable[int]) -> int:
    """The bitmask of a set of model indices."""
    mask = 0
    for i in indices:
        mask |= 1 << int(i)
    return mask


@dataclasses.dataclass(frozen=True)
class ProposalPool:
    """(image, label) pairs with the models that selected each, sorted by (image, label).

    ``logit_models`` / ``prob_models`` / ``top1_models`` are uint64 bitmasks over
    ``model_names`` (bit m = model m selected the pair by that criterion);
    ``is_original`` marks the original label. :func:`candidate_pool` keeps every
    pair any model touched; :meth:`restrict` applies stage 2's rule for a subset.
    """

    model_names: tuple[str, ...]
    num_classes: int
    file_names: np.ndarray  # (num_images,) str, in image order
    image: np.ndarray
    label: np.ndarray
    logit_models: np.ndarray
    prob_models: np.ndarray
    top1_models: np.ndarray
    is_original: np.ndarray

    @property
    def num_images(self) -> int:
        return int(self.file_names.size)

    @property
    def count(self) -> np.ndarray:
        """Number of (model, criterion) top-n selections holding each pair."""
        return popcount(self.logit_models) + popcount(self.prob_models)

    @property
    def all_models(self) -> int:
        return (1 << len(self.model_names)) - 1

    def mask_of(self, names: Iterable[str]) -> int:
        index = {n: i for i, n in enumerate(self.model_names)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise KeyError(f"unknown model(s) {unknown}; the pool has {list(self.model_names)}")
        return models_mask(index[n] for n in names)

    def names_of(self, mask: int) -> tuple[str, ...]:
        return tuple(n for i, n in enumerate(self.model_names) if mask >> i & 1)

    def proposed(self, mask: int | None = None) -> np.ndarray:
        """Stage 2's rule for the models in ``mask``: count >= 2, or a top-1, or the original."""
        m = np.uint64(self.all_models if mask is None else mask)
        count = popcount(self.logit_models & m) + popcount(self.prob_models & m)
        return (count >= 2) | ((self.top1_models & m) != 0) | self.is_original

    def restrict(self, mask: int | None = None) -> ProposalPool:
        """The proposals of the models in ``mask`` (all by default), provenance limited to them."""
        m = np.uint64(self.all_models if mask is None else mask)
        keep = self.proposed(mask)
        return dataclasses.replace(
            self, image=self.image[keep], label=self.label[keep],
            logit_models=self.logit_models[keep] & m, prob_models=self.prob_models[keep] & m,
            top1_models=self.top1_models[keep] & m, is_original=self.is_original[keep])

    def __len__(self) -> int:
        return int(self.image.size)

    def proposals_per_image(self) -> np.ndarray:
        return np.bincount(self.image, minlength=self.num_images)

    def source_lists(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pair, its proposers, flat: (offsets (P+1,), codes, names).

        Pair p's sources are ``names[codes[offsets[p]:offsets[p + 1]]]``: "<model>:logits",
        "<model>:probs", "<model>:top1" in model order, then "original".
        """
        columns = [(self.logit_models, "logits"), (self.prob_models, "probs"),
                   (self.top1_models, TOP1)]
        blocks = []  # the pairs of each source, in the order sources are listed
        for m, name in enumerate(self.model_names):
            for masks, _ in columns:
                blocks.append(np.flatnonzero((masks >> np.uint64(m)) & np.uint64(1)))
        blocks.append(np.flatnonzero(self.is_original))
        names = [f"{name}:{criterion}" for name in self.model_names for _, criterion in columns]
        offsets = np.zeros(len(self) + 1, np.int64)
        np.cumsum(np.bincount(np.concatenate(blocks), minlength=len(self)), out=offsets[1:])
        # Counting sort: each block appends its code after the codes already placed per pair.
        codes = np.empty(offsets[-1], np.int64)
        filled = offsets[:-1].copy()
        for code, pairs in enumerate(blocks):
            codes[filled[pairs]] = code
            filled[pairs] += 1
        return offsets, codes, np.asarray(names + [ORIGINAL])

    def to_arrow(self) -> pa.Table:
        """One row per pair: file_name, label, count, sources (list<string>)."""
        offsets, codes, names = self.source_lists()
        flat = pa.array(names, pa.string()).take(pa.array(codes))
        return pa.table({
            "file_name": pa.array(self.file_names, pa.string()).take(pa.array(self.image)),
            "label": pa.array(self.label, pa.int64()),
            "count": pa.array(self.count, pa.int64()),
            "sources": pa.ListArray.from_arrays(pa.array(offsets), flat),
        })

    def to_frame(self) -> pd.DataFrame:
        """:meth:`to_arrow` as pandas (``sources`` cells are string arrays, as read from parquet)."""
        return self.to_arrow().to_pandas()


def candidate_pool(selections: Sequence[ModelSelections], original_labels: np.ndarray,
                   file_names: Sequence[str] | np.ndarray) -> ProposalPool:
    """Every (image, label) pair any model selected, any model's top-1, or the original label.

    ``original_labels`` (num_images,) and ``file_names`` (num_images,) are in image order.
    """
    if not selections:
        raise ValueError("no models to pool")
    if len(selections) > MAX_MODELS:
        raise ValueError(f"{len(selections)} models; at most {MAX_MODELS} can be pooled")
    names = tuple(s.name for s in selections)
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {list(names)}")
    num_images, num_classes = selections[0].num_images, selections[0].num_classes
    for s in selections:
        if (s.num_images, s.num_classes) != (num_images, num_classes):
            raise ValueError(f"model {s.name!r} covers {s.num_images} images x {s.num_classes} classes; "
                             f"model {names[0]!r} covers {num_images} x {num_classes}")
    original_labels = np.asarray(original_labels, dtype=np.int64)
    file_names = np.asarray(file_names)
    if original_labels.shape != (num_images,) or file_names.shape != (num_images,):
        raise ValueError(f"need {num_images} original labels and file names, got "
                         f"{original_labels.shape[0]} and {file_names.shape[0]}")
    if ((original_labels < 0) | (original_labels >= num_classes)).any():
        raise ValueError(f"original labels must lie in [0, {num_classes})")
    for s in selections:
        if s.top1.size and (s.top1.min() < 0 or s.top1.max() >= num_classes):
            raise ValueError(f"model {s.name!r}: top-1 labels must lie in [0, {num_classes})")

    images = np.arange(num_images, dtype=np.int64)
    key_sets = {
        "logits": [s.logits for s in selections],
        "probs": [s.probs for s in selections],
        TOP1: [images * num_classes + s.top1 for s in selections],
    }
    original_keys = images * num_classes + original_labels
    every_key = np.sort(np.concatenate([k for ks in key_sets.values() for k in ks] + [original_keys]))
    keys = every_key[np.concatenate([[True], every_key[1:] != every_key[:-1]])]  # np.unique hashes: slower
    masks = {}
    for criterion, per_model in key_sets.items():
        mask = np.zeros(keys.size, np.uint64)
        for m, model_keys in enumerate(per_model):
            mask[np.searchsorted(keys, model_keys)] |= np.uint64(1 << m)
        masks[criterion] = mask
    is_original = np.zeros(keys.size, bool)
    is_original[np.searchsorted(keys, original_keys)] = True
    image, label = np.divmod(keys, num_classes)
    return ProposalPool(names, num_classes, file_names, image, label, masks["logits"],
                        masks["probs"], masks[TOP1], is_original)


def pool_proposals(selections: Sequence[ModelSelections], original_labels: np.ndarray,
                   file_names: Sequence[str] | np.ndarray,
                   models: Iterable[str] | None = None) -> ProposalPool:
    """Stage 2 over ``models`` (all by default): the pooled proposals with provenance."""
    pool = candidate_pool(selections, original_labels, file_names)
    return pool.restrict(None if models is None else pool.mask_of(models))
