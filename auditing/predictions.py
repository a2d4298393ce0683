"""Stage-1 predictions of one model over one image set, and their two file formats.

``load_predictions`` reads either by suffix: ``.npz`` (below) or ``.csv``, the published
top-1-only format of ImageNet-X (Idrissi et al. 2022, ``model_predictions/base/*.csv``):
a header ``file_name,predicted_class,predicted_probability`` and one row per image,
read as ``top1`` (the probability is checked to lie in [0, 1] and not kept).

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
``features``               (N, D) float     optional: penultimate (global-pooled) features
                                            of the same forward pass, stored as float16
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

from auditing.errors import InputError
import dataclasses
import io
import os
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from auditing import atomic

REQUIRED_KEYS = ("file_names",)
OPTIONAL_KEYS = ("logits", "top1", "features", "image_index", "labels", "quarantined_file_names",
                 "quarantine_reasons")
CSV_COLUMNS = ("file_name", "predicted_class", "predicted_probability")
# float16 keeps ~3 significant digits: plenty for cosine distances between class centroids,
# and half the bytes of float32 (1280 features per image for Lite, 2048 for ResNet-50).
FEATURES_DTYPE = np.float16


class PredictionsFormatError(InputError):
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
    features: np.ndarray | None = None
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
    for key, width in (("logits", "C"), ("features", "D")):
        values = getattr(p, key)
        if values is None:
            continue
        if values.ndim != 2 or values.shape[0] != n or values.dtype.kind != "f":
            raise PredictionsFormatError(
                f"{where}: '{key}' must be a float array of shape ({n}, {width}) to match "
                f"'file_names', got shape {values.shape} dtype {values.dtype}")
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise PredictionsFormatError(
                f"{where}: '{key}' row {row} ({names[row]}) has a NaN or infinite value "
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
    both = np.intersect1d(names, p.quarantined_file_names) if len(p.quarantined_file_names) else ()
    if len(both):
        raise PredictionsFormatError(f"{where}: {str(both[0])!r} is both predicted and quarantined")


def _check_unique(names: np.ndarray, key: str, where: str) -> None:
    if pd.Index(names).is_unique:  # hashing: the common case, without sorting the strings
        return
    unique, counts = np.unique(names, return_counts=True)
    if len(unique) != len(names):
        duplicate = int(np.argmax(counts > 1))
        rows = np.flatnonzero(names == unique[duplicate])[:5].tolist()
        raise PredictionsFormatError(
            f"{where}: '{key}' has duplicates, e.g. {str(unique[duplicate])!r} at rows {rows}")


def load_predictions(path: str | os.PathLike, num_classes: int = 1000) -> Predictions:
    """Read and validate a predictions file: NPZ, or the published top-1 CSV format (by
    suffix; see the module docstring). ``num_classes`` bounds the CSV's class indices."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return read_top1_csv(path, num_classes)
    try:
        with open(path, "rb") as f:
            return read_predictions_npz(f, str(path))
    except FileNotFoundError:
        raise PredictionsFormatError(f"{path}: predictions file not found") from None


def read_predictions_npz(file: BinaryIO, source: str) -> Predictions:
    """Read and validate a predictions NPZ from an open binary file (a local file, or one
    opened through Beam's FileSystems); ``source`` names it in errors."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        # ValueError: object arrays (pickles) are refused by allow_pickle=False.
        raise PredictionsFormatError(f"{source}: unreadable predictions NPZ: {e}") from e
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise PredictionsFormatError(
            f"{source}: missing key {missing[0]!r} (has {sorted(arrays)}); expected 'file_names' "
            "and 'logits' (or 'top1')")
    unknown = sorted(set(arrays) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise PredictionsFormatError(
            f"{source}: unknown key(s) {unknown}; known: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    if arrays["file_names"].dtype.kind == "S":  # bytes written by an external tool
        arrays["file_names"] = np.char.decode(arrays["file_names"], "utf-8")
    return Predictions(**arrays, source=source)


def read_top1_csv(path: str | os.PathLike, num_classes: int = 1000) -> Predictions:
    """Published top-1 predictions (``file_name,predicted_class,predicted_probability``)
    as ``Predictions`` with ``top1``. A bad row raises ``PredictionsFormatError`` naming
    the file, its line number (the header is line 1) and the field."""
    path = Path(path)
    # Numbers parsed by Arrow's CSV reader itself: ~4x faster than pandas' reader (the
    # report reads five such files), which is several times faster than text then
    # to_numeric. Anything off (a missing value, or written oddly, e.g. a class "7.0")
    # is read again as text below, which accepts what it can and names the first bad line.
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv

    try:
        typed = pyarrow.csv.read_csv(path, convert_options=pyarrow.csv.ConvertOptions(column_types={
            "file_name": pa.string(), "predicted_class": pa.int64(), "predicted_probability": pa.float64()}))
    except (OSError, pa.ArrowInvalid):  # unreadable, unparsable: the text reader says what
        typed = None
    if (typed is not None and tuple(typed.column_names) == CSV_COLUMNS
            and not any(column.null_count for column in typed.columns)):
        names = pc.utf8_trim_whitespace(typed["file_name"]).to_numpy().astype(str)
        classes = typed["predicted_class"].to_numpy()
        probability = typed["predicted_probability"].to_numpy()
        if ((names != "").all() and ((classes >= 0) & (classes < num_classes)).all()
                and ((probability >= 0.0) & (probability <= 1.0)).all() and pd.Index(names).is_unique):
            return Predictions(file_names=names, top1=classes.astype(np.int64), source=str(path))
    return _read_top1_csv_text(path, num_classes)


def _read_top1_csv_text(path: Path, num_classes: int) -> Predictions:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise PredictionsFormatError(f"{path}: predictions file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PredictionsFormatError(f"{path}: unreadable predictions CSV: {e}") from e
    if tuple(table.columns) != CSV_COLUMNS:
        raise PredictionsFormatError(
            f"{path}: the header must be {','.join(CSV_COLUMNS)}, got {','.join(map(str, table.columns))}")

    def fail(row: int, field: str, problem: str) -> PredictionsFormatError:
        return PredictionsFormatError(
            f"{path}: line {row + 2}, field {field!r}: {table.iloc[row][field]!r} {problem}")

    names = table["file_name"].str.strip()
    empty = np.flatnonzero((names == "").to_numpy())
    if len(empty):
        raise fail(int(empty[0]), "file_name", "is empty")
    classes = pd.to_numeric(table["predicted_class"].str.strip(), errors="coerce")
    integral = classes.notna() & (classes % 1 == 0) & (classes >= 0) & (classes < num_classes)
    if not integral.all():
        raise fail(int(np.argmin(integral.to_numpy())), "predicted_class",
                   f"is not a class index in [0, {num_classes})")
    probability = pd.to_numeric(table["predicted_probability"].str.strip(), errors="coerce")
    in_range = probability.between(0.0, 1.0)  # False for NaN
    if not in_range.all():
        raise fail(int(np.argmin(in_range.to_numpy())), "predicted_probability",
                   "is not a probability in [0, 1]")
    names = names.to_numpy().astype(str)
    unique, first, counts = np.unique(names, return_index=True, return_counts=True)
    if len(unique) != len(names):
        again = np.flatnonzero(names == unique[np.argmax(counts > 1)])
        raise fail(int(again[1]), "file_name", f"appears again (first on line {again[0] + 2})")
    return Predictions(file_names=names, top1=classes.to_numpy().astype(np.int64), source=str(path))


def read_class_folder_top1(predictions_npy: str | os.PathLike, index_json: str | os.PathLike) -> Predictions:
    """Top-1 labels stored in class-folder order (Northcutt et al.'s label_errors
    ``.npy``) with the JSON list of ``"val/<wnid>/<file name>"`` that orders them."""
    import json

    try:
        paths = json.loads(Path(index_json).read_text())
        top1 = np.load(predictions_npy, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PredictionsFormatError(f"{predictions_npy} / {index_json}: unreadable: {e}") from e
    if not isinstance(paths, list) or len(paths) != len(top1) or top1.ndim != 1:
        raise PredictionsFormatError(f"{index_json}: {len(paths)} paths for {top1.shape} predictions in "
                                     f"{predictions_npy}")
    return Predictions(file_names=np.array([str(p).rsplit("/", 1)[-1] for p in paths]),
                       top1=top1.astype(np.int64), source=str(predictions_npy))


def predictions_npz_bytes(predictions: Predictions) -> bytes:
    """``predictions`` in the NPZ format (logits float32, features float16), in memory."""
    arrays = {"file_names": predictions.file_names}
    for key in OPTIONAL_KEYS:
        value = getattr(predictions, key)
        if value is not None and not (key.startswith("quarantin") and len(value) == 0):
            arrays[key] = value
    if predictions.logits is not None:
        arrays["logits"] = predictions.logits.astype(np.float32, copy=False)
    if predictions.features is not None:
        arrays["features"] = predictions.features.astype(FEATURES_DTYPE, copy=False)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def save_predictions(path: str | os.PathLike, predictions: Predictions) -> Path:
    """Write ``predictions`` as NPZ atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = predictions_npz_bytes(predictions)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
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
                       features=stacked("features"), image_index=image_index, labels=stacked("labels"),
                       quarantined_file_names=quarantined[q_order],
                       quarantine_reasons=reasons[q_order], source=source)
