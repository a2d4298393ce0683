"""The audit report as data: every figure of ``report.json`` from label sets, original
labels and predictions. Pure functions (no I/O); ``pipelines/report.py`` reads the
inputs and writes ``report.json`` and ``index.html``."""
from __future__ import annotations

import datetime
import math
import os
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import pandas as pd

from auditing import cooccurrence, imagenet, metrics
from auditing.metrics import LabelSets
from auditing.predictions import Predictions

SCHEMA_VERSION = 1
TOP_COOCCURRING = 5
MOST_AFFECTED = 30
BEATS_ORACLE_LISTED = 25
SUBSET_ORDER = ("dogs", "organisms", "objects")


class ReportInputError(ValueError):
    """Inputs that cannot be reported on; the message names the file or argument."""


# ---------------------------------------------------------------------------------
# Building the report dict (no I/O).


def _class_entry(label: int, classes: imagenet.ImageNetClasses) -> dict[str, Any]:
    return {"label": int(label), "wnid": classes.wnids[label], "name": classes.names[label]}


def _finite(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _summary(original: np.ndarray, sets: LabelSets) -> dict[str, Any]:
    sizes = sets.sizes
    rated = sizes > 0
    return {
        "images": int(len(sets)),
        "labels": int(sizes.sum()),
        "empty_sets": int((~rated).sum()),
        "multi_label_images": int((sizes >= 2).sum()),
        # Over the images that kept at least one label (the paper's 57,553 / 46,837).
        "mean_set_size": _finite(sizes[rated].mean()) if rated.any() else None,
        "original_label_in_set": int(sets.contains(original).sum()),
        "original_label_real_accuracy": _finite(metrics.real_accuracy(original, sets)),
        "set_size_histogram": {str(k): int(v) for k, v in
                               zip(*np.unique(sizes, return_counts=True))},
    }


def _subset_summary(original: np.ndarray, sets: LabelSets, subset: np.ndarray,
                    oracle: np.ndarray) -> dict[str, Any]:
    images = metrics.subset_mask(original, subset)
    part = sets.take(images)
    sizes = part.sizes
    return {
        "n_classes": int(len(subset)),
        "n_images": int(images.sum()),
        "empty_sets": int((sizes == 0).sum()),
        "multi_label_images": int((sizes >= 2).sum()),
        "mean_set_size": _finite(sizes[sizes > 0].mean()) if (sizes > 0).any() else None,
        "original_label_real_accuracy": _finite(metrics.real_accuracy(original[images], part)),
        "oracle_accuracy": _finite(np.nanmean(oracle[subset])) if
        (~np.isnan(oracle[subset])).any() else None,
    }


def _model_metrics(name: str, prediction: Predictions, file_names: list[str], original: np.ndarray,
                   sets: LabelSets, co: cooccurrence.Cooccurrence,
                   subsets: Mapping[str, np.ndarray],
                   classes: imagenet.ImageNetClasses) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Report entry of one model, and its per-class accuracies (for ``per_class``)."""
    if prediction.num_classes not in (None, sets.num_classes):
        raise ReportInputError(f"predictions {name!r} ({prediction.source}) have "
                               f"{prediction.num_classes} classes, the labels {sets.num_classes}")
    ours, theirs = metrics.align(file_names, prediction.file_names)
    top1 = np.asarray(prediction.top1_labels(), dtype=np.int64)[theirs]
    if len(top1) and (top1.max() >= sets.num_classes):
        raise ReportInputError(f"predictions {name!r} ({prediction.source}): top-1 class "
                               f"{int(top1.max())} is outside [0, {sets.num_classes})")
    if not len(ours):
        raise ReportInputError(f"predictions {name!r} ({prediction.source}) share no file name "
                               f"with the label sets (e.g. {prediction.file_names[:1].tolist()} vs "
                               f"{file_names[:1]})")
    part, part_original = sets.take(ours), original[ours]
    real_hit = metrics.real_correct(top1, part)
    rated = part.sizes > 0
    multilabel = metrics.multilabel_accuracy(top1, part_original, part)
    entry: dict[str, Any] = {
        "source": prediction.source,
        "n_images": int(len(ours)),
        "n_missing": int(len(file_names) - len(ours)),
        "has_logits": prediction.logits is not None,
        "original_accuracy": _finite(metrics.original_accuracy(top1, part_original)),
        "real_accuracy": _finite(metrics.real_accuracy(top1, part)),
        "n_real_images": int(rated.sum()),
        "multilabel_accuracy": _finite(multilabel.mean),
        "strict_topk_accuracy": None,
        "strict_topk_by_size": None,
    }
    if prediction.logits is not None:
        logits = prediction.logits[theirs]
        entry["strict_topk_accuracy"] = _finite(metrics.strict_topk_accuracy(logits, part))
        entry["strict_topk_by_size"] = {str(k): v for k, v in
                                        metrics.strict_topk_by_size(logits, part).items()}

    per_class = {
        "original_accuracy": metrics.per_class_accuracy(top1 == part_original, part_original,
                                                        sets.num_classes),
        "real_accuracy": metrics.per_class_accuracy(real_hit[rated], part_original[rated],
                                                    sets.num_classes),
        "accuracy_on_oracle_images": cooccurrence.accuracy_on_oracle_images(top1, part_original,
                                                                            part),
    }
    beating = cooccurrence.classes_beating_oracle(per_class["accuracy_on_oracle_images"],
                                                  co.oracle_accuracy_, co.support_)
    entry["oracle_image_class_mean_accuracy"] = _finite(
        np.nanmean(per_class["accuracy_on_oracle_images"]))
    entry["classes_beating_oracle"] = int(len(beating))
    entry["beats_oracle"] = [
        {**_class_entry(row.label, classes), "n_images": int(row.n_images),
         "model_accuracy": float(row.model_accuracy), "oracle_accuracy": float(row.oracle_accuracy),
         "margin": float(row.margin)}
        for row in beating.head(BEATS_ORACLE_LISTED).itertuples()]
    entry["subsets"] = {}
    for subset_name, subset in subsets.items():
        images = metrics.subset_mask(part_original, subset)
        entry["subsets"][subset_name] = {
            "n_images": int(images.sum()),
            "original_accuracy": _finite(metrics.original_accuracy(top1[images],
                                                                   part_original[images])),
            "real_accuracy": _finite(metrics.real_accuracy(top1[images], part.take(images))),
            "multilabel_accuracy": _finite(np.nanmean(multilabel.per_class[subset]))
            if (~np.isnan(multilabel.per_class[subset])).any() else None,
        }
    return entry, per_class


def display_names(classes: imagenet.ImageNetClasses,
                  hierarchy: imagenet.WordNetHierarchy) -> list[str]:
    """First lemmas, with the parent synset's name added where two classes share one
    ("crane (wading bird)", "crane (lifting device)")."""
    counts = pd.Series(classes.names).value_counts()
    names = []
    for wnid, name in zip(classes.wnids, classes.names):
        parents = hierarchy.parents(wnid)
        if counts[name] > 1 and parents:
            name = f"{name} ({hierarchy.name(parents[0])})"
        names.append(name)
    return names


def _model_zoo(zoo: pd.DataFrame) -> dict[str, Any]:
    fits = metrics.accuracy_regression(zoo["original_top1"].to_numpy(), zoo["real_top1"].to_numpy())
    return {
        "n_models": int(len(zoo)),
        "points": zoo[["original_top1", "real_top1"]].round(5).to_numpy().tolist(),
        "fits": {k: {"slope": f.slope, "intercept": f.intercept, "r": _finite(f.r), "n": f.n,
                     "original_range": list(f.x_range)} for k, f in fits.items()},
    }


def build_report(file_names: list[str], original: np.ndarray, sets: LabelSets,
                 predictions: Mapping[str, Predictions] | None = None,
                 extra_summary: Mapping[str, Any] | None = None,
                 model_zoo: pd.DataFrame | None = None,
                 classes: imagenet.ImageNetClasses | None = None,
                 subsets: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The report dict for aligned inputs (``original[i]`` and ``sets`` row i belong to
    ``file_names[i]``). JSON-ready: accuracies and shares are fractions, NaN is None."""
    classes = classes or imagenet.load_classes()
    subsets = dict(subsets if subsets is not None else imagenet.class_subsets())
    original = np.asarray(original, dtype=np.int64)
    if len(classes) != sets.num_classes:
        raise ReportInputError(f"{len(classes)} class names for {sets.num_classes} classes")
    co = cooccurrence.Cooccurrence().fit(original, sets)
    oracle = co.oracle_accuracy_
    n_images = np.bincount(original, minlength=sets.num_classes)
    set_size_sum = np.bincount(original, weights=sets.sizes, minlength=sets.num_classes)

    models: dict[str, Any] = {}
    model_per_class: dict[str, dict[str, np.ndarray]] = {}
    for name, prediction in (predictions or {}).items():
        models[name], model_per_class[name] = _model_metrics(
            name, prediction, file_names, original, sets, co, subsets, classes)

    display = display_names(classes, imagenet.load_hierarchy())
    per_class: dict[str, Any] = {}
    for c in range(sets.num_classes):
        per_class[str(c)] = {
            "wnid": classes.wnids[c],
            "name": classes.names[c],
            "display_name": display[c],
            "n_images": int(n_images[c]),
            "n_oracle_images": int(co.support_[c]),
            "mean_set_size": _finite(set_size_sum[c] / n_images[c]) if n_images[c] else None,
            "oracle_accuracy": _finite(oracle[c]),
            "top_cooccurring": [{"label": j, "name": classes.names[j], "share": share}
                                for j, share in co.top(c, TOP_COOCCURRING)],
            "models": {name: {key: _finite(values[c]) for key, values in table.items()}
                       for name, table in model_per_class.items()},
        }
    # Lowest oracle accuracy = most images with several labels = most affected.
    ranked = [c for c in np.lexsort((np.arange(len(oracle)), np.nan_to_num(oracle, nan=2.0)))
              if not np.isnan(oracle[c])]
    report = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "summary": _summary(original, sets),
        "run": dict(extra_summary or {}),
        "oracle": {"class_mean_accuracy": _finite(np.nanmean(oracle)) if np.isfinite(oracle).any() else None,
                   "most_affected_classes": [int(c) for c in ranked[:MOST_AFFECTED]]},
        "subsets": {k: _subset_summary(original, sets, subsets[k], oracle)
                    for k in SUBSET_ORDER if k in subsets},
        "models": models,
        "per_class": per_class,
        "model_zoo": _model_zoo(model_zoo) if model_zoo is not None and len(model_zoo) >= 4 else None,
    }
    return report


# ---------------------------------------------------------------------------------
# Inputs and outputs.


def _original_series(original_labels: pd.DataFrame | Mapping[str, int]) -> pd.Series:
    if isinstance(original_labels, pd.DataFrame):
        missing = {"file_name", "label"} - set(original_labels.columns)
        if missing:
            raise ReportInputError(f"original labels need columns file_name and label; missing "
                                   f"{sorted(missing)}")
        series = pd.Series(original_labels["label"].to_numpy(),
                           index=original_labels["file_name"].to_numpy())
    else:
        series = pd.Series(dict(original_labels))
    if series.index.has_duplicates:
        raise ReportInputError(f"original labels: file name "
                               f"{series.index[series.index.duplicated()][0]!r} appears twice")
    return series.astype(np.int64)


def align_inputs(label_sets: Mapping[str, Collection[int]],
                 original_labels: pd.DataFrame | Mapping[str, int],
                 num_classes: int) -> tuple[list[str], np.ndarray, LabelSets, list[str]]:
    """Sorted file names having both a label set and an original label, their original
    labels, their ``LabelSets``, and the label-set file names without an original label."""
    original = _original_series(original_labels)
    names = sorted(label_sets)
    known = original.index.get_indexer(pd.Index(names)) >= 0
    unmatched = [n for n, ok in zip(names, known) if not ok]
    names = [n for n, ok in zip(names, known) if ok]
    if not names:
        raise ReportInputError("no image has both a label set and an original label "
                               f"(label sets e.g. {sorted(label_sets)[:1]}, original labels e.g. "
                               f"{original.index[:1].tolist()})")
    labels = original.loc[names].to_numpy()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ReportInputError(f"original labels must be in [0, {num_classes})")
    return names, labels, metrics.sets_from_mapping(names, label_sets, num_classes), unmatched


def jsonable(value: Any) -> Any:
    """``value`` in JSON types: numpy scalars and arrays as numbers and lists, NaN and
    infinities as None, paths as strings, mapping keys as strings."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) or math.isinf(value) else float(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)
