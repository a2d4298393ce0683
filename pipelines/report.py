"""Stages 6-7: the audit report (``report.json`` + a self-contained ``index.html``).

    label-audit report --labels PATH [--original-labels PATH|tfds-wheel]
                       [--predictions NAME=PATH ...] [--images DIR] --out DIR

``--labels``: a TFDS release folder (features ``file_name``, ``original_label``,
``real_label``; a ``<out>/tfds/<name>`` folder means its latest version), a real.json
list, a gold JSON ``{file_name: [labels]}`` or a gold TSV (several rows per image).
``--original-labels``: a ``file_name<TAB>label`` TSV, or ``tfds-wheel`` for the labels
shipped with tensorflow-datasets; by default the release's ``original_label``.
``--predictions``: NPZ files in the ``auditing.predictions`` format (logits or top-1).

``write_report`` is the same stage as a function; ``label-audit run`` calls it last.
Every image is scored against its original label and its label set; images whose set
is empty are left out of ReaL accuracy (and counted), a model is scored on the images
it has predictions for (the rest are counted as missing).
"""
from __future__ import annotations

import argparse
import json
import re
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditing import atomic, imagenet, labelsets, report_html, sources
from auditing.predictions import Predictions
from auditing.report import ReportInputError, align_inputs, build_report, jsonable

log = logging.getLogger(__name__)


def write_report(out_dir: str | os.PathLike, label_sets: Mapping[str, Collection[int]],
                 original_labels: pd.DataFrame | Mapping[str, int],
                 predictions: Mapping[str, Predictions] | None = None,
                 extra_summary: Mapping[str, Any] | None = None,
                 example_images: Mapping[str, bytes] | None = None,
                 model_zoo: pd.DataFrame | None = None,
                 sections: Any = None, suspects: Sequence[str] = (),
                 max_suspects: int = 12) -> dict[str, Path]:
    """Write ``report.json`` and ``index.html`` under ``out_dir``; returns their paths.

    ``label_sets``: {file_name: class indices} (e.g. ``labelsets.read_real_json``);
    ``original_labels``: DataFrame[file_name, label] or {file_name: label};
    ``predictions``: {model name: Predictions}; ``extra_summary``: run facts shown
    in the report (release name/version, quarantined rows, agreement...);
    ``example_images``: {file_name: encoded image bytes}, only the chosen few are read;
    ``model_zoo``: per-model original and ReaL top-1 (``read_model_zoo``); ``sections``:
    extra page sections (``auditing.report_html``), or a function of the aligned
    (file_names, original, label sets) returning them.
    """
    classes = imagenet.load_classes()
    names, original, sets, unmatched = align_inputs(label_sets, original_labels, len(classes))
    extra = dict(extra_summary or {})
    if unmatched:
        log.warning("%d images have a label set but no original label (e.g. %s); left out",
                    len(unmatched), unmatched[0])
        extra["images_without_original_label"] = len(unmatched)
    if callable(sections):  # built from the aligned inputs (file names, originals, label sets)
        sections = sections(names, original, sets)
    report = jsonable(build_report(names, original, sets, predictions, extra, model_zoo, classes,
                                   sections=sections))
    examples = []
    if example_images is not None:
        available = np.array([n in example_images for n in names])
        for index, kind in report_html.choose_examples(original, sets, available):
            examples.append(report_html.ExampleImage(
                file_name=names[index], data=example_images[names[index]], kind=kind,
                original_label=int(original[index]), label_set=sets.take([index]).indices.tolist()))
        row_of = {n: i for i, n in enumerate(names)}
        shown = [n for n in suspects if n in row_of and n in example_images][:max_suspects]
        for name in shown:
            index = row_of[name]
            examples.append(report_html.ExampleImage(
                file_name=name, data=example_images[name], kind="suspected_label_error",
                original_label=int(original[index]), label_set=sets.take([index]).indices.tolist(),
                note="neither the nearest class centroid nor any model's top-1 is the original label"))
    if suspects:
        report["suspected_label_errors"] = {"count": len(suspects), "file_names": list(suspects)}
    html = report_html.render_html(report, examples)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report_json": out / "report.json", "html": out / "index.html"}
    # No indent: json writes indented output with its pure-Python encoder, ~10x slower
    # on the ~1.5 MB of a full report (``python -m json.tool`` indents it for reading).
    atomic.write_text(paths["report_json"], json.dumps(report, allow_nan=False, ensure_ascii=False) + "\n")
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
    """A version folder, or the latest version (by number) of a dataset folder."""
    from auditing.versions import sorted_versions

    if (path / "dataset_info.json").is_file():
        return path
    versions = sorted_versions(p.name for p in path.iterdir() if (p / "dataset_info.json").is_file()
                               and re.fullmatch(r"\d+\.\d+\.\d+", p.name))
    if not versions:
        raise ReportInputError(f"{path}: not a TFDS dataset folder (no dataset_info.json here or "
                               "in a version folder below)")
    return path / versions[-1]


def read_tfds_release(path: str | os.PathLike, batch: int = 4096, images: dict[str, bytes] | None = None
                      ) -> tuple[dict[str, frozenset[int]], pd.DataFrame | None]:
    """Label sets (and original labels, if present) of a TFDS release's validation split,
    by feature name: ``file_name``, ``real_label``, optional ``original_label``. If the
    release has an ``image`` feature and ``images`` is a dict, it is filled with the
    encoded image of every example (for the report's examples)."""
    import tensorflow_datasets as tfds  # only this input needs TFDS

    from pipelines.release import release_source

    folder = _release_version_dir(Path(path))
    builder, _ = release_source(folder)
    features = builder.info.features
    missing = {"file_name", "real_label"} - set(features.keys())
    if missing:
        raise ReportInputError(f"{folder}: the release has no feature(s) {sorted(missing)} "
                               f"(has {sorted(features.keys())})")
    with_images = "image" in features.keys()
    # Encoded bytes as stored: nothing to decode, and what the report embeds.
    decoders = {"image": tfds.decode.SkipDecoding()} if with_images else None
    _, source = release_source(folder, decoders=decoders)
    sets: dict[str, frozenset[int]] = {}
    originals: list[tuple[str, int]] = []
    for start in range(0, len(source), batch):
        for example in source.__getitems__(list(range(start, min(start + batch, len(source))))):
            name = example["file_name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            sets[name] = frozenset(int(v) for v in example["real_label"])
            if with_images and images is not None:
                images[name] = example["image"]
            if "original_label" in example:
                originals.append((name, int(example["original_label"])))
    original = pd.DataFrame(originals, columns=["file_name", "label"]) if originals else None
    return sets, original


def read_label_sets(path: str | os.PathLike, images: dict[str, bytes] | None = None
                    ) -> tuple[dict[str, frozenset[int]], pd.DataFrame | None]:
    """Label sets from a TFDS release, real.json, gold JSON or gold TSV (see module doc);
    the original labels too when the file carries them (a release), and its images into
    ``images`` when it has them."""
    path = Path(path)
    if path.is_dir():
        return read_tfds_release(path, images=images)
    if not path.is_file():
        raise ReportInputError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as f:
            first = f.read(64).lstrip()[:1]
        if first == "[":
            return labelsets.read_real_json(path), None
    return labelsets.read_gold_label_sets(path), None


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
                        help="file_name<TAB>label TSV, or 'tfds-wheel' for the TFDS wheel's "
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
    """The report stage of the graph (pipelines/stages/report.py) on label sets given
    as a file: ``--labels`` becomes ``inputs.label_sets``. A release's own original
    labels and images are used when the flags do not name others."""
    from pipelines import run as run_lib
    from pipelines.config import AuditConfig

    out = Path(args.out)
    work = out / ".label-audit"  # the graph's store for this report
    names = [name for name, _ in args.predictions]
    if len(set(names)) != len(names):
        raise ReportInputError(f"--predictions: model names must be unique, got {names}")
    original, images = args.original_labels, args.images
    if Path(args.labels).is_dir():
        release_images: dict[str, bytes] = {}
        _, release_original = read_label_sets(args.labels, images=release_images)
        if original is None and release_original is not None:
            original = str(work / "original_labels.tsv")
            work.mkdir(parents=True, exist_ok=True)
            atomic.write_text(original, release_original.to_csv(sep="\t", index=False))
        if images is None and release_images:
            images = str(work / "images")
            Path(images).mkdir(parents=True, exist_ok=True)
            for name, data in release_images.items():
                atomic.write_bytes(Path(images) / name, data)
    if original is None:
        raise ReportInputError(f"{args.labels} carries no original labels: pass --original-labels "
                               "(a TSV, or 'tfds-wheel')")
    if images is not None and not Path(images).is_dir():
        raise ReportInputError(f"--images {images}: not a folder")
    config = AuditConfig.model_validate({
        "output_dir": str(work.resolve()),
        "dataset": {"original_labels": str(original) if original == labelsets.TFDS_WHEEL
                    else str(Path(original).resolve()),
                    "images": {"type": "folder", "path": str(Path(images).resolve())} if images else None},
        "inputs": {"label_sets": str(Path(args.labels).resolve())},
        "stages": {"report": {"predictions": {n: str(Path(p).resolve()) for n, p in args.predictions},
                              "model_zoo": args.model_zoo, "out_dir": str(out.resolve())}}})
    run_lib.execute(config, target="report", echo=lambda *a, **k: log.info(" ".join(map(str, a))))
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    print(f"{summary['images']} images, {summary['labels']} labels, {summary['empty_sets']} empty "
          f"sets; ReaL accuracy of the original labels: "
          f"{_percent(summary['original_label_real_accuracy'])}")
    for name, m in report["models"].items():
        print(f"{name}: original {_percent(m['original_accuracy'])}, ReaL "
              f"{_percent(m['real_accuracy'])}, multi-label {_percent(m['multilabel_accuracy'])}, "
              f"strict top-k {_percent(m['strict_topk_accuracy'])}")
    print(f"wrote {out / 'report.json'} and {out / 'index.html'}")
    return 0
