"""The audit report as data: every figure of ``report.json`` from label sets, original
labels and predictions. Pure functions (no I/O); ``pipelines/report.py`` reads the
inputs and writes ``report.json`` and ``index.html``."""
from __future__ import annotations

from auditing.errors import InputError
import datetime
import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from auditing import cooccurrence, imagenet, metrics
from auditing.metrics import LabelSetArray
from auditing.predictions import Predictions

SCHEMA_VERSION = 1
TOP_COOCCURRING = 5
MOST_AFFECTED = 30
BEATS_ORACLE_LISTED = 25
SUBSET_ORDER = ("dogs", "organisms", "objects")


class ReportInputError(InputError):
    """Inputs that cannot be reported on; the message names the file or argument."""


# ---------------------------------------------------------------------------------
# Building the report dict (no I/O).


def _class_entry(label: int, classes: imagenet.ImageNetClasses) -> dict[str, Any]:
    return {"label": int(label), "wnid": classes.wnids[label], "name": classes.names[label]}


def _finite(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _summary(original: np.ndarray, sets: LabelSetArray) -> dict[str, Any]:
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


def _subset_summary(original: np.ndarray, sets: LabelSetArray, subset: np.ndarray,
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
                   sets: LabelSetArray, co: cooccurrence.Cooccurrence,
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


def build_report(file_names: list[str], original: np.ndarray, sets: LabelSetArray,
                 predictions: Mapping[str, Predictions] | None = None,
                 extra_summary: Mapping[str, Any] | None = None,
                 model_zoo: pd.DataFrame | None = None,
                 classes: imagenet.ImageNetClasses | None = None,
                 subsets: Mapping[str, np.ndarray] | None = None,
                 sections: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The report dict for aligned inputs (``original[i]`` and ``sets`` row i belong to
    ``file_names[i]``). JSON-ready: accuracies and shares are fractions, NaN is None.
    ``sections``: extra data-driven sections other stages add to the page
    (``auditing.report_html``'s module docstring; e.g. ``report_html.table_section``)."""
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
        "sections": [dict(s) for s in sections or ()],
    }
    report["oracle_comparison"] = oracle_comparison(report) if models else None
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
                 num_classes: int) -> tuple[list[str], np.ndarray, LabelSetArray, list[str]]:
    """Sorted file names having both a label set and an original label, their original
    labels, their ``LabelSetArray``, and the label-set file names without an original label."""
    original = _original_series(original_labels)
    names = sorted(label_sets)
    positions = original.index.get_indexer(pd.Index(names))
    known = positions >= 0
    unmatched = [n for n, ok in zip(names, known) if not ok]
    names = [n for n, ok in zip(names, known) if ok]
    if not names:
        raise ReportInputError("no image has both a label set and an original label "
                               f"(label sets e.g. {sorted(label_sets)[:1]}, original labels e.g. "
                               f"{original.index[:1].tolist()})")
    labels = original.to_numpy()[positions[known]]  # the rows found above: no second lookup by name
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ReportInputError(f"original labels must be in [0, {num_classes})")
    return names, labels, metrics.sets_from_mapping(names, label_sets, num_classes), unmatched


def jsonable(value: Any) -> Any:
    """``value`` in JSON types: numpy scalars and arrays as numbers and lists, NaN and
    infinities as None, paths as strings, mapping keys as strings."""
    # A report holds ~10^5 values: json's C encoder and decoder convert them ~10x faster
    # than walking them in Python (NaN and infinities come back through parse_constant).
    # Keys it refuses (numpy scalars, tuples) take the walk, and so do keys it spells
    # unlike str() (True -> "true", None -> "null", inf -> "Infinity"), seen by their
    # spelling (a string value that looks like such a key only costs the walk).
    try:
        text = json.dumps(value, default=_json_default, ensure_ascii=False, separators=(",", ":"))
    except TypeError:
        return _jsonable_walk(value)
    if any(key in text for key in _KEYS_SPELT_UNLIKE_STR):
        return _jsonable_walk(value)
    return json.loads(text, parse_constant=lambda _: None)


_KEYS_SPELT_UNLIKE_STR = tuple(f'"{k}":' for k in ("true", "false", "null", "NaN", "Infinity", "-Infinity"))


def _json_default(value: Any) -> Any:
    """What json's encoder cannot write itself, as ``_jsonable_walk`` converts it."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _jsonable_walk(value: Any) -> Any:
    kind = type(value)  # the built-in types first: a report has ~10^5 values, ABC checks are slow
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return None if math.isnan(value) or math.isinf(value) else value
    if kind is dict:
        return {str(k): _jsonable_walk(v) for k, v in value.items()}
    if kind is list:
        return [_jsonable_walk(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable_walk(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable_walk(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable_walk(value.tolist())
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


# ---------------------------------------------------------------------------------
# The published models against the unbiased oracle (METHOD.md stage 7, the paper's Fig. 6).


def oracle_comparison(report: Mapping[str, Any]) -> dict[str, Any]:
    """Per model of a built report: original and ReaL accuracy, its mean class accuracy on
    the oracle images beside the oracle's, the classes where it beats the oracle, and its
    accuracy on the most affected classes (the co-occurrence table) against the oracle's.
    JSON-ready; a model that beats the oracle on many classes has learned the labelling
    bias (which of several present objects the original labellers picked)."""
    oracle = report["oracle"]
    n_classes = sum(1 for c in report["per_class"].values() if c["oracle_accuracy"] is not None)
    affected = [str(c) for c in oracle["most_affected_classes"]]
    models = {}
    for name, m in report["models"].items():
        on_affected = [(report["per_class"][c]["models"][name]["accuracy_on_oracle_images"],
                        report["per_class"][c]["oracle_accuracy"]) for c in affected]
        scored = [(a, o) for a, o in on_affected if a is not None and o is not None]
        models[name] = {
            "original_accuracy": m["original_accuracy"],
            "real_accuracy": m["real_accuracy"],
            "class_mean_accuracy_on_oracle_images": m["oracle_image_class_mean_accuracy"],
            "classes_beating_oracle": m["classes_beating_oracle"],
            "share_of_classes_beating_oracle": m["classes_beating_oracle"] / n_classes if n_classes else None,
            "most_affected_mean_accuracy": _finite(np.mean([a for a, _ in scored])) if scored else None,
            "most_affected_classes_beating_oracle": int(sum(a > o for a, o in scored)),
        }
    return {"oracle_class_mean_accuracy": oracle["class_mean_accuracy"],
            "classes_with_oracle": n_classes, "most_affected_classes": len(affected), "models": models}


# ---------------------------------------------------------------------------------
# Figures of an audit of a sample (e.g. 1,300 real validation images) against ReaL.

# Our registry names -> timm's names for the published full-validation results.
TIMM_NAMES = {f"efficientnet-lite{i}": f"tf_efficientnet_lite{i}.in1k" for i in range(5)}


def published_accuracy(zoo: pd.DataFrame, names: Mapping[str, str] = TIMM_NAMES) -> dict[str, dict[str, float]]:
    """{our model name: {"original_top1", "real_top1"}} from timm's published results
    (``pipelines.report.read_model_zoo``'s frame), for the models ``names`` maps."""
    by_timm = zoo.drop_duplicates("model").set_index("model")
    return {ours: {"original_top1": float(by_timm.loc[theirs, "original_top1"]),
                   "real_top1": float(by_timm.loc[theirs, "real_top1"])}
            for ours, theirs in names.items() if theirs in by_timm.index}


def sample_accuracy(file_names: Sequence[str], original: np.ndarray, sets: LabelSetArray,
                    predictions: Mapping[str, Predictions],
                    full_sets: Mapping[str, Collection[int]] | None = None,
                    full_original: Mapping[str, int] | None = None,
                    published: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, dict[str, Any]]:
    """Per model: top-1 and ReaL accuracy on the sample (``file_names`` aligned with
    ``original`` and ``sets``); beside them the full-validation figures: published ones
    (``published``, e.g. timm's) or, for a model whose predictions cover more images
    than the sample (the ImageNet-X CSVs cover all 50,000), computed on all of them
    against ``full_sets`` / ``full_original``."""
    out = {}
    for name, prediction in predictions.items():
        ours, theirs = metrics.align(list(file_names), prediction.file_names)
        top1 = np.asarray(prediction.top1_labels(), np.int64)
        part = sets.take(ours)
        entry: dict[str, Any] = {
            "n_images": int(len(ours)), "n_real_images": int((part.sizes > 0).sum()),
            "top1": _finite(metrics.original_accuracy(top1[theirs], original[ours])),
            "real": _finite(metrics.real_accuracy(top1[theirs], part)),
            "full_val_top1": None, "full_val_real": None, "full_val_source": None,
        }
        if published and name in published:
            entry.update(full_val_top1=published[name]["original_top1"],
                         full_val_real=published[name]["real_top1"], full_val_source="published")
        elif full_sets is not None and full_original is not None and prediction.num_images > len(ours):
            names = [n for n in prediction.file_names.tolist() if n in full_sets and n in full_original]
            rows, _ = metrics.align(prediction.file_names.tolist(), names)
            full = metrics.sets_from_mapping(names, full_sets, sets.num_classes)
            labels = np.array([full_original[n] for n in names], np.int64)
            entry.update(full_val_top1=_finite(metrics.original_accuracy(top1[rows], labels)),
                         full_val_real=_finite(metrics.real_accuracy(top1[rows], full)),
                         full_val_source=f"computed on {len(names):,} images")
        out[name] = entry
    return out


def pool_label_sets(proposals: pd.DataFrame, file_names: Sequence[str], num_classes: int,
                    ) -> dict[str, LabelSetArray]:
    """The proposals of a stage-2 table (``file_name``, ``label``, ``sources``) as label
    sets per proposer, aligned with ``file_names``: one entry per model (its pairs from
    any criterion: ``<model>:logits|probs|top1``) and ``"pooled"`` (every pair, the
    original labels included, as stage 4 asks them)."""
    index = {n: i for i, n in enumerate(file_names)}
    rows = proposals["file_name"].map(index)
    known = rows.notna().to_numpy()
    frame = pd.DataFrame({"row": rows[known].astype(np.int64).to_numpy(),
                          "label": proposals["label"].to_numpy()[known],
                          "sources": proposals["sources"].to_numpy()[known]})
    per_source = frame.explode("sources")
    per_source["model"] = per_source["sources"].astype(str).str.rsplit(":", n=1).str[0]

    def as_sets(part: pd.DataFrame) -> LabelSetArray:
        groups = part.groupby("row")["label"].apply(list)
        return LabelSetArray.from_sets([groups.get(i, []) for i in range(len(file_names))], num_classes)

    sets = {model: as_sets(part) for model, part in per_source.groupby("model", sort=True)
            if model != "original"}
    sets["pooled"] = as_sets(frame)
    return sets


def proposal_quality_table(proposers: Mapping[str, LabelSetArray], reference: LabelSetArray) -> dict[str, Any]:
    """Recall and precision of each proposer's sets against ``reference`` (e.g. ReaL),
    images with an empty reference set left out (``metrics.proposal_quality``)."""
    return {name: metrics.proposal_quality(sets, reference).as_dict() for name, sets in proposers.items()}


def question_sets(questions: pd.DataFrame, file_names: Sequence[str], original: np.ndarray,
                  num_classes: int) -> LabelSetArray:
    """The paper's own proposals for these images: the ReaL questions (``file_name``,
    ``label``: raters.npz's ``info``) plus each image's original label (the paper kept
    the original label of the images it sent to no rater, and asked about it otherwise)."""
    index = {n: i for i, n in enumerate(file_names)}
    per_image: list[set[int]] = [{int(label)} for label in original]
    for name, label in zip(questions["file_name"], questions["label"]):
        if name in index:
            per_image[index[name]].add(int(label))
    return LabelSetArray.from_sets(per_image, num_classes)
