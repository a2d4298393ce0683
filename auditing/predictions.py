"""Stage-1 predictions of one model over one image set, and their NPZ file format.

NPZ format (``np.savez``, read with ``allow_pickle=False``; strings are unicode
arrays, never objects):

=========================  ===============  =============================================
key                        shape / dtype    meaning
=========================  ===============  =============================================
``file_names``             (N,) str         image file name, unique (e.g. ``ILSVRC2012_val_00000001.JPEG``)
``logits``                 (N, C) float     the model's full logits (stored as float32)
``top1``                   (N,) int         top-1 class only, for models whose logits are
                                            not available; exactly one of ``logits`` /
                                            ``top1`` is present
``image_index``            (N,) int         optional: the image's position in the data
                                            set's sorted file order
``labels``                 (N,) int         optional: the original label, -1 where unknown
``quarantined_file_names`` (M,) str         optional: images that could not be decoded
``quarantine_reasons``     (M,) str         optional: why, one per quarantined image
=========================  ===============  =============================================

Probabilities are not stored: they are ``softmax(logits)`` (``Predictions.probabilities``),
so every reader derives the same float32 values from the same logits.

An external model's results (e.g. a 19-model pool computed elsewhere) are used by
writing this format: ``np.savez(path, file_names=names, logits=logits)``.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from auditing import atomic

REQUIRED_KEYS = ("file_names",)
OPTIONAL_KEYS = ("logits", "top1", "image_index", "labels", "quarantined_file_names",
                 "quarantine_reasons")


class PredictionsFormatError(ValueError):
    """A predictions file or array that breaks the format; the message names file, key and row."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    shifted = np.asarray(logits, dtype=np.float32)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, largest first; ties go to the lower index."""
    k = min(k, scores.shape[-1])
    # A stable sort of -scores keeps the lower class index first among equal scores.
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


@dataclasses.dataclass(frozen=True, eq=False)
class Predictions:
    """One model's predictions over N images (see the module docstring for the fields)."""

    file_names: np.ndarray
    logits: np.ndarray | None = None
    top1: np.ndarray | None = None
    image_index: np.ndarray | None = None
    labels: np.ndarray | None = None
    quarantined_file_names: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, dtype=str))
    quarantine_reasons: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, dtype=str))
    # Where the arrays came from, for error messages.
    source: str = "<predictions>"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_images(self) -> int:
        return len(self.file_names)

    @property
    def num_classes(self) -> int | None:
        return None if self.logits is None else self.logits.shape[1]

    @property
    def num_read(self) -> int:
        """Images read = predicted + quarantined."""
        return self.num_images + len(self.quarantined_file_names)

    def probabilities(self) -> np.ndarray:
        return softmax(self._require_logits())

    def top1_labels(self) -> np.ndarray:
        if self.top1 is not None:
            return self.top1
        return top_k(self._require_logits(), 1)[:, 0]

    def top_k_labels(self, k: int) -> np.ndarray:
        """(N, k) class indices, most likely first."""
        return top_k(self._require_logits(), k)

    def _require_logits(self) -> np.ndarray:
        if self.logits is None:
            raise PredictionsFormatError(f"{self.source}: has top-1 predictions only (no 'logits')")
        return self.logits


def _validate(p: Predictions) -> None:
    where = p.source
    names = p.file_names
    if names.ndim != 1 or names.dtype.kind != "U":
        raise PredictionsFormatError(
            f"{where}: 'file_names' must be a 1-d string array, got shape {names.shape} "
            f"dtype {names.dtype}")
    n = len(names)
    if (p.logits is None) == (p.top1 is None):
        raise PredictionsFormatError(
            f"{where}: needs exactly one of 'logits' (N, C) and 'top1' (N,); got "
            f"{'both' if p.logits is not None else 'neither'}")
    if p.logits is not None:
        if p.logits.ndim != 2 or p.logits.shape[0] != n or p.logits.dtype.kind != "f":
            raise PredictionsFormatError(
                f"{where}: 'logits' must be a float array of shape ({n}, C) to match "
                f"'file_names', got shape {p.logits.shape} dtype {p.logits.dtype}")
        finite = np.isfinite(p.logits).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise PredictionsFormatError(
                f"{where}: 'logits' row {row} ({names[row]}) has a NaN or infinite value "
                f"({(~finite).sum()} rows in all)")
    for key in ("top1", "image_index", "labels"):
        values = getattr(p, key)
        if values is not None and (values.shape != (n,) or values.dtype.kind not in "iu"):
            raise PredictionsFormatError(
                f"{where}: '{key}' must be an integer array of shape ({n},), got shape "
                f"{values.shape} dtype {values.dtype}")
    if p.top1 is not None and n and p.top1.min() < 0:
        row = int(np.argmin(p.top1))
        raise PredictionsFormatError(f"{where}: 'top1' row {row} ({names[row]}) is negative")
    _check_unique(names, "file_names", where)
    if p.quarantined_file_names.shape != p.quarantine_reasons.shape:
        raise PredictionsFormatError(
            f"{where}: 'quarantined_file_names' {p.quarantined_file_names.shape} and "
            f"'quarantine_reasons' {p.quarantine_reasons.shape} differ in shape")
    both = np.intersect1d(names, p.quarantined_file_names)
    if len(both):
        raise PredictionsFormatError(f"{where}: {str(both[0])!r} is both predicted and quarantined")


def _check_unique(names: np.ndarray, key: str, where: str) -> None:
    unique, counts = np.unique(names, return_counts=True)
    if len(unique) != len(names):
        duplicate = int(np.argmax(counts > 1))
        rows = np.flatnonzero(names == unique[duplicate])[:5].tolist()
        raise PredictionsFormatError(
            f"{where}: '{key}' has duplicates, e.g. {str(unique[duplicate])!r} at rows {rows}")


def load_predictions(path: str | os.PathLike) -> Predictions:
    """Read and validate a predictions NPZ (see the module docstring)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise PredictionsFormatError(f"{path}: predictions file not found") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        # ValueError: object arrays (pickles) are refused by allow_pickle=False.
        raise PredictionsFormatError(f"{path}: unreadable predictions NPZ: {e}") from e
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise PredictionsFormatError(
            f"{path}: missing key {missing[0]!r} (has {sorted(arrays)}); expected 'file_names' "
            "and 'logits' (or 'top1')")
    unknown = sorted(set(arrays) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise PredictionsFormatError(
            f"{path}: unknown key(s) {unknown}; known: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    if arrays["file_names"].dtype.kind == "S":  # bytes written by an external tool
        arrays["file_names"] = np.char.decode(arrays["file_names"], "utf-8")
    return Predictions(**arrays, source=str(path))


def save_predictions(path: str | os.PathLike, predictions: Predictions) -> Path:
    """Write ``predictions`` as NPZ atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"file_names": predictions.file_names}
    for key in OPTIONAL_KEYS:
        value = getattr(predictions, key)
        if value is not None and not (key.startswith("quarantin") and len(value) == 0):
            arrays[key] = value
    if predictions.logits is not None:
        arrays["logits"] = predictions.logits.astype(np.float32, copy=False)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def concatenate_sorted(parts: list[Predictions], source: str = "<merged>") -> Predictions:
    """Merge partial predictions (e.g. shards) into one, sorted by file name.

    ``image_index`` becomes each image's rank in the sorted file names of every read
    image (predicted or quarantined), so it is the same whichever order the parts
    were read in. ``labels`` are kept only if every part has them.
    """
    if not parts:
        raise ValueError("nothing to merge: no partial predictions")
    names = np.concatenate([p.file_names for p in parts])
    quarantined = np.concatenate([p.quarantined_file_names for p in parts])
    reasons = np.concatenate([p.quarantine_reasons for p in parts])
    order = np.argsort(names, kind="stable")
    all_read = np.concatenate([names, quarantined])
    _check_unique(all_read, "file_names + quarantined_file_names", source)
    image_index = np.searchsorted(np.sort(all_read), names[order]).astype(np.int64)

    def stacked(key: str) -> np.ndarray | None:
        values = [getattr(p, key) for p in parts]
        if any(v is None for v in values):
            return None
        return np.concatenate(values)[order]

    q_order = np.argsort(quarantined, kind="stable")
    return Predictions(file_names=names[order], logits=stacked("logits"), top1=stacked("top1"),
                       image_index=image_index, labels=stacked("labels"),
                       quarantined_file_names=quarantined[q_order],
                       quarantine_reasons=reasons[q_order], source=source)
