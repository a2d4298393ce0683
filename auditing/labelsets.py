"""Readers for label files: original labels, label sets (real.json) and gold sets.

Formats:
- label TSV: ``file_name<TAB>label`` per row, an optional header row, extra columns
  ignored (e.g. ``../shared/data/derived/imagenet_val_labels_by_filename.tsv``).
  ``label`` is a class index or a wnid.
- real.json: a JSON list of label lists, one per image in file order.
- gold sets: the label TSV with several rows per image, or JSON
  ``{file_name: [label, ...]}``.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
from collections import defaultdict
from pathlib import Path

import pandas as pd

from auditing.errors import InputError
from auditing.imagenet import NUM_CLASSES, imagenet_wnids, _tfds_resource

# The one name of the built-in original labels: the 50k ILSVRC-2012 validation labels
# that ship inside the tensorflow-datasets wheel (``dataset.original_labels`` and the
# ``--original-labels`` flags accept it instead of a file).
TFDS_WHEEL = "tfds-wheel"


class LabelFileError(InputError):
    """A label file that cannot be read; the message names file, row and field."""


def imagenet_val_file_names(n: int = 50_000) -> list[str]:
    """ILSVRC-2012 validation file names in file order (index k -> file k+1)."""
    return [f"ILSVRC2012_val_{k + 1:08d}.JPEG" for k in range(n)]


def _parse_label(value: str, path: os.PathLike | str, row: int, wnid_index: dict[str, int],
                 num_classes: int) -> int:
    value = value.strip()
    if value in wnid_index:
        return wnid_index[value]
    try:
        label = int(value)
    except ValueError:
        raise LabelFileError(f"{path}: row {row}, field 'label': {value!r} is neither a class index "
                             "nor an ImageNet wnid") from None
    if not 0 <= label < num_classes:
        raise LabelFileError(f"{path}: row {row}, field 'label': {label} is outside [0, {num_classes})")
    return label


def _label_tsv_rows(path: os.PathLike | str, num_classes: int) -> list[tuple[str, int]]:
    wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
    rows: list[tuple[str, int]] = []
    with open(path, newline="", encoding="utf-8") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            line = e.object[:e.start].count(b"\n") + 1
            raise LabelFileError(f"{path}: row {line}: not UTF-8 text ({e.reason})") from None
        for row_number, fields in enumerate(csv.reader(lines, delimiter="\t"), start=1):
            if not fields or not "".join(fields).strip():
                continue
            if len(fields) < 2:
                raise LabelFileError(f"{path}: row {row_number}: expected file_name<TAB>label, "
                                     f"got {len(fields)} field(s)")
            file_name, label = fields[0].strip(), fields[1]
            if row_number == 1 and file_name.lower() in ("file_name", "filename", "image", "file"):
                continue  # header row
            if not file_name:
                raise LabelFileError(f"{path}: row {row_number}, field 'file_name': empty")
            rows.append((file_name, _parse_label(label, path, row_number, wnid_index, num_classes)))
    return rows


def read_label_tsv(path: os.PathLike | str, num_classes: int = NUM_CLASSES) -> pd.DataFrame:
    """One original label per image: DataFrame[file_name: str, label: int]."""
    rows = _label_tsv_rows(path, num_classes)
    frame = pd.DataFrame(rows, columns=["file_name", "label"])
    duplicated = frame["file_name"].duplicated()
    if duplicated.any():
        first = frame.loc[duplicated, "file_name"].iloc[0]
        raise LabelFileError(f"{path}: file_name {first!r} appears on more than one row; "
                             "an original-labels file has one label per image")
    return frame.astype({"label": "int64"})


def read_gold_label_sets(path: os.PathLike | str,
                         num_classes: int = NUM_CLASSES) -> dict[str, frozenset[int]]:
    """Gold label sets: TSV with several rows per image, or JSON {file_name: [labels]}."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LabelFileError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise LabelFileError(f"{path}: expected a JSON object {{file_name: [labels]}}")
        wnid_index = {w: i for i, w in enumerate(imagenet_wnids())}
        gold = {}
        for file_name, labels in data.items():
            if not isinstance(labels, list):
                raise LabelFileError(f"{path}: entry {file_name!r}: expected a list of labels")
            gold[file_name] = frozenset(_parse_label(str(v), path, file_name, wnid_index, num_classes)
                                        for v in labels)
        return gold
    sets: dict[str, set[int]] = defaultdict(set)
    for file_name, label in _label_tsv_rows(path, num_classes):
        sets[file_name].add(label)
    return {k: frozenset(v) for k, v in sets.items()}


def read_real_json(path: os.PathLike | str, file_names: list[str] | None = None,
                   num_classes: int = NUM_CLASSES) -> dict[str, frozenset[int]]:
    """real.json (a list of label lists in file order) as {file_name: label set}.

    ``file_names`` gives the file order; by default the ImageNet validation names.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise LabelFileError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise LabelFileError(f"{path}: expected a JSON list of label lists")
    if file_names is None:
        file_names = imagenet_val_file_names(len(data))
    if len(file_names) != len(data):
        raise LabelFileError(f"{path}: {len(data)} label lists but {len(file_names)} file names")
    # Checked in bulk (every entry a list, every label an int in range); only a file that
    # fails it is walked entry by entry, for the first bad one.
    if set(map(type, data)) <= {list}:
        flat = list(itertools.chain.from_iterable(data))
        if set(map(type, flat)) <= {int} and (not flat or (min(flat) >= 0 and max(flat) < num_classes)):
            return dict(zip(file_names, map(frozenset, data)))
    sets = {}
    for row, (file_name, labels) in enumerate(zip(file_names, data)):
        if not isinstance(labels, list) or not all(isinstance(v, int) and 0 <= v < num_classes
                                                   for v in labels):
            raise LabelFileError(f"{path}: entry {row} ({file_name}): expected a list of class "
                                 f"indices in [0, {num_classes}), got {labels!r}")
        sets[file_name] = frozenset(labels)
    return sets


def original_val_labels() -> pd.DataFrame:
    """The 50k ILSVRC-2012 validation labels shipped in the tensorflow-datasets wheel."""
    path = _tfds_resource("datasets/imagenet2012/validation_labels.txt")
    wnids = path.read_text().split()
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    return pd.DataFrame({"file_name": imagenet_val_file_names(len(wnids)),
                         "label": [index[w] for w in wnids]}).astype({"label": "int64"})


def load_original_labels(ref: str | os.PathLike) -> pd.DataFrame:
    """Original labels (file_name, label): a label TSV, or ``TFDS_WHEEL``."""
    return original_val_labels() if str(ref) == TFDS_WHEEL else read_label_tsv(ref)


def label_set_counts(label_sets: dict[str, frozenset[int]]) -> dict[str, int]:
    """How many images, labels, empty sets and multi-label images a set of label sets has."""
    sizes = [len(s) for s in label_sets.values()]
    return {"images": len(sizes), "labels": sum(sizes), "empty_sets": sizes.count(0),
            "multi_label_images": sum(1 for n in sizes if n > 1)}
