"""Stages 6-7: the audit report (``report.json`` + a self-contained ``index.html``).

    label-audit report --labels PATH [--original-labels PATH|imagenet]
                       [--predictions NAME=PATH ...] [--images DIR] --out DIR

``--labels``: a TFDS release folder (features ``file_name``, ``original_label``,
``real_label``; a ``<out>/tfds/<name>`` folder means its latest version), a real.json
list, a gold JSON ``{file_name: [labels]}`` or a gold TSV (several rows per image).
``--original-labels``: a ``file_name<TAB>label`` TSV, or ``imagenet`` for the labels
shipped with tensorflow-datasets; by default the release's ``original_label``.
``--predictions``: NPZ files in the ``auditing.predictions`` format (logits or top-1).

``write_report`` is the same stage as a function; ``label-audit run`` calls it last.
Every image is scored against its original label and its label set; images whose set
is empty are left out of ReaL accuracy (and counted), a model is scored on the images
it has predictions for (the rest are counted as missing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditing import atomic, cooccurrence, imagenet, labelsets, metrics, report_html, sources
from auditing.metrics import LabelSets
from auditing.predictions import Predictions, load_predictions

log = logging.getLogger(__name__)

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
        "oracle": {"class_mean_accuracy": _finite(np.nanmean(oracle)),
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
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


def write_report(out_dir: str | os.PathLike, label_sets: Mapping[str, Collection[int]],
                 original_labels: pd.DataFrame | Mapping[str, int],
                 predictions: Mapping[str, Predictions] | None = None,
                 extra_summary: Mapping[str, Any] | None = None,
                 example_images: Mapping[str, bytes] | None = None,
                 model_zoo: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write ``report.json`` and ``index.html`` under ``out_dir``; returns their paths.

    ``label_sets``: {file_name: class indices} (e.g. ``labelsets.read_real_json``);
    ``original_labels``: DataFrame[file_name, label] or {file_name: label};
    ``predictions``: {model name: Predictions}; ``extra_summary``: run facts shown
    in the report (release name/version, quarantined rows, agreement...);
    ``example_images``: {file_name: encoded image bytes}, only the chosen few are read;
    ``model_zoo``: per-model original and ReaL top-1 (``read_model_zoo``).
    """
    classes = imagenet.load_classes()
    names, original, sets, unmatched = align_inputs(label_sets, original_labels, len(classes))
    extra = dict(extra_summary or {})
    if unmatched:
        log.warning("%d images have a label set but no original label (e.g. %s); left out",
                    len(unmatched), unmatched[0])
        extra["images_without_original_label"] = len(unmatched)
    report = _jsonable(build_report(names, original, sets, predictions, extra, model_zoo, classes))
    examples = []
    if example_images is not None:
        available = np.array([n in example_images for n in names])
        for index, kind in report_html.choose_examples(original, sets, available):
            examples.append(report_html.ExampleImage(
                file_name=names[index], data=example_images[names[index]], kind=kind,
                original_label=int(original[index]), label_set=sets.take([index]).indices.tolist()))
    html = report_html.render_html(report, examples)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report_json": out / "report.json", "html": out / "index.html"}
    atomic.write_text(paths["report_json"],
                  json.dumps(report, indent=1, allow_nan=False, ensure_ascii=False) + "\n")
    atomic.write_text(paths["html"], html)
    return paths


def read_model_zoo(original_csv: str | os.PathLike, real_csv: str | os.PathLike) -> pd.DataFrame:
    """Per-model top-1 on original and ReaL labels (timm's results CSVs, in percent),
    as fractions: DataFrame[model, img_size, original_top1, real_top1]."""
    columns = ["model", "img_size", "top1"]
    frames = []
    for path in (original_csv, real_csv):
        frame = pd.read_csv(path)
        missing = set(columns) - set(frame.columns)
        if missing:
            raise ReportInputError(f"{path}: missing column(s) {sorted(missing)}")
        frames.append(frame[columns])
    zoo = frames[0].merge(frames[1], on=["model", "img_size"], suffixes=("_original", "_real"))
    return pd.DataFrame({"model": zoo["model"], "img_size": zoo["img_size"],
                         "original_top1": zoo["top1_original"] / 100.0,
                         "real_top1": zoo["top1_real"] / 100.0})


def local_model_zoo() -> pd.DataFrame | None:
    """timm's published results if a local copy exists (never downloads)."""
    original, real = sources.local_path("timm_results"), sources.local_path("timm_results_real")
    if original is None or real is None:
        return None
    return read_model_zoo(original, real)


def _release_version_dir(path: Path) -> Path:
    if (path / "dataset_info.json").is_file():
        return path
    versions = sorted((p for p in path.iterdir() if (p / "dataset_info.json").is_file()
                       and not p.name.startswith(".")),
                      key=lambda p: tuple(int(x) if x.isdigit() else -1 for x in p.name.split(".")))
    if not versions:
        raise ReportInputError(f"{path}: not a TFDS dataset folder (no dataset_info.json here or "
                               "in a version folder below)")
    return versions[-1]


def read_tfds_release(path: str | os.PathLike, batch: int = 4096
                      ) -> tuple[dict[str, frozenset[int]], pd.DataFrame | None]:
    """Label sets (and original labels, if present) of a TFDS release's validation split,
    by feature name: ``file_name``, ``real_label``, optional ``original_label``."""
    import tensorflow_datasets as tfds  # only this input needs TFDS

    folder = _release_version_dir(Path(path))
    builder = tfds.builder_from_directory(str(folder))
    features = builder.info.features
    missing = {"file_name", "real_label"} - set(features.keys())
    if missing:
        raise ReportInputError(f"{folder}: the release has no feature(s) {sorted(missing)} "
                               f"(has {sorted(features.keys())})")
    source = builder.as_data_source(split="validation")
    sets: dict[str, frozenset[int]] = {}
    originals: list[tuple[str, int]] = []
    for start in range(0, len(source), batch):
        for example in source.__getitems__(list(range(start, min(start + batch, len(source))))):
            name = example["file_name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            sets[name] = frozenset(int(v) for v in example["real_label"])
            if "original_label" in example:
                originals.append((name, int(example["original_label"])))
    original = pd.DataFrame(originals, columns=["file_name", "label"]) if originals else None
    return sets, original


def read_label_sets(path: str | os.PathLike) -> tuple[dict[str, frozenset[int]], pd.DataFrame | None]:
    """Label sets from a TFDS release, real.json, gold JSON or gold TSV (see module doc);
    the original labels too when the file carries them (a release)."""
    path = Path(path)
    if path.is_dir():
        return read_tfds_release(path)
    if not path.is_file():
        raise ReportInputError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as f:
            first = f.read(64).lstrip()[:1]
        if first == "[":
            return labelsets.read_real_json(path), None
    return labelsets.read_gold_label_sets(path), None


class ImageFolder(Mapping[str, bytes]):
    """{file_name: bytes} over the files of a folder, read only when asked for."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ReportInputError(f"--images {folder}: not a folder")
        self._names = {p.name for p in self.folder.iterdir() if p.is_file()}

    def __getitem__(self, name: str) -> bytes:
        if name not in self._names:
            raise KeyError(name)
        return (self.folder / name).read_bytes()

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)


# ---------------------------------------------------------------------------------
# CLI.


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True,
                        help="label sets: TFDS release folder, real.json, gold JSON or gold TSV")
    parser.add_argument("--original-labels",
                        help="file_name<TAB>label TSV, or 'imagenet' for the TFDS wheel's "
                             "validation labels (default: the release's original_label)")
    parser.add_argument("--predictions", action="append", type=_named_path, default=[],
                        metavar="NAME=PATH", help="a model's predictions NPZ (repeatable)")
    parser.add_argument("--images", help="folder of the images by file name, for examples")
    parser.add_argument("--model-zoo", action=argparse.BooleanOptionalAction, default=True,
                        help="add the timm models' original-vs-ReaL regression when its "
                             "results files are local (default: on)")
    parser.add_argument("--out", required=True, help="output folder")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def main(args: argparse.Namespace) -> int:
    sets, release_original = read_label_sets(args.labels)
    if args.original_labels == "imagenet":
        original = labelsets.original_val_labels()
    elif args.original_labels:
        original = labelsets.read_label_tsv(args.original_labels)
    elif release_original is not None:
        original = release_original
    else:
        raise ReportInputError(f"{args.labels} carries no original labels: pass --original-labels "
                               "(a TSV, or 'imagenet')")
    names = [name for name, _ in args.predictions]
    if len(set(names)) != len(names):
        raise ReportInputError(f"--predictions: model names must be unique, got {names}")
    predictions = {name: load_predictions(path) for name, path in args.predictions}
    paths = write_report(
        args.out, sets, original, predictions,
        extra_summary={"labels": str(args.labels),
                       "original_labels": str(args.original_labels or "release")},
        example_images=ImageFolder(args.images) if args.images else None,
        model_zoo=local_model_zoo() if args.model_zoo else None)
    report = json.loads(paths["report_json"].read_text())
    summary = report["summary"]
    print(f"{summary['images']} images, {summary['labels']} labels, {summary['empty_sets']} empty "
          f"sets; ReaL accuracy of the original labels: "
          f"{_percent(summary['original_label_real_accuracy'])}")
    for name, m in report["models"].items():
        print(f"{name}: original {_percent(m['original_accuracy'])}, ReaL "
              f"{_percent(m['real_accuracy'])}, multi-label {_percent(m['multilabel_accuracy'])}, "
              f"strict top-k {_percent(m['strict_topk_accuracy'])}")
    print(f"wrote {paths['report_json']} and {paths['html']}")
    return 0
