"""Stage 4 of METHOD.md: turn label proposals into crowd tasks, and the task file formats.

Which images. An image is sent to raters unless every model's top-1 equals its
original label (the paper kept 24,889 of 50,000 images). The top-1s come from
``top1`` ({model: DataFrame[file_name, label]}) or, if not given, from the ``sources``
of a stage-2 proposals table (an image is skipped when no label other than the
original has a ``"<model>:top1"`` source). With neither (e.g. the ReaL questions,
which have no models), every image with proposals is kept.

Grouping. An image with more than ``max_labels`` (8) proposals is split into tasks
of at most ``max_labels`` labels so that a rater compares similar classes side by
side: average-linkage clustering, capped at ``max_labels`` per group, on a class
affinity (the depth of the deepest common WordNet ancestor; classes sharing a lemma
up to a plural, such as sunglass / sunglasses or the two cranes, count as closest),
stopped at ceil(k / max_labels) groups or when no two groups fit together (see
``split_labels``). Within a task, labels are listed in WordNet depth-first order.

Task ids are deterministic: the first 16 hex digits of sha256("<file_name>\\t<sorted
label indices, comma separated>"), so the same question set gets the same id in every
run and re-audit.

Task files (``write_tasks_jsonl`` / ``write_tasks_csv``):

- JSONL, one task per line: ``{"task_id", "file_name", "image_uri", "labels": [{"index",
  "wnid", "name", "lemmas", "gloss"}, ...], "answer_options": [{"value": "yes", "text":
  "Yes (95% sure it is in the image)"}, {"value": "maybe", ...}, {"value": "no", ...}]}``
  (plus ``"examples_uri"`` per label when an example-image template is given).
- CSV, one task per row (crowd platforms' batch input): ``task_id, file_name,
  image_uri, n_labels`` then ``label_i, wnid_i, name_i, gloss_i`` for i = 1..(largest
  task), empty where a task has fewer labels.

Answers come back in the long vote format that ``auditing.votes`` reads (CSV, JSONL or
Parquet), one row per rater and label: ``task_id, file_name, label, rater_id, answer``
with ``label`` the class index of the task's label and ``answer`` one of ``yes``,
``maybe``, ``no``. They join the tasks on (``task_id``, ``label``); see
``read_tasks_jsonl`` for the tasks in that long shape.
"""
from __future__ import annotations

from auditing.errors import InputError
import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditing import atomic
from auditing.imagenet import ImageNetClasses, WordNetHierarchy, load_classes, load_hierarchy

DEFAULT_MAX_LABELS = 8
ANSWER_OPTIONS = (
    {"value": "yes", "text": "Yes (95% sure it is in the image)"},
    {"value": "maybe", "text": "Maybe"},
    {"value": "no", "text": "No (95% sure it is not in the image)"},
)
QUESTION_COLUMNS = ("task_id", "file_name", "label", "position")


class TaskFileError(InputError):
    """A task file that cannot be read; the message names file, line and field."""


# ---------------------------------------------------------------- class affinity

def _classes_sharing_a_lemma(classes: ImageNetClasses) -> list[tuple[int, int]]:
    """Pairs of classes with a lemma in common up to a plural ending (sunglass ~ sunglasses)."""
    owners: dict[str, set[int]] = {}
    lemmas = [{re.sub(r"\s+", " ", lemma.strip().lower()) for lemma in text.split(",") if lemma.strip()}
              for text in classes.lemmas]
    for i, names in enumerate(lemmas):
        for name in names:
            owners.setdefault(name, set()).add(i)
    pairs = set()
    for i, names in enumerate(lemmas):
        for name in names:
            for form in (name, name + "s", name + "es"):
                pairs.update((i, j) for j in owners.get(form, ()) if j != i)
    return sorted(pairs)


@dataclasses.dataclass(frozen=True)
class ClassAffinity:
    """How close two classes are, for grouping labels into tasks.

    ``matrix[i, j]`` = depth of the deepest common WordNet ancestor of classes i and j
    (their own depth if equal), raised to ``name_affinity`` for classes sharing a lemma
    up to a plural. ``dfs_position[i]``: class i's rank in a depth-first walk of the
    hierarchy (children in wnid order), the order labels are shown in.
    """

    matrix: np.ndarray
    dfs_position: np.ndarray

    @classmethod
    def from_wordnet(cls, classes: ImageNetClasses, hierarchy: WordNetHierarchy) -> ClassAffinity:
        # Each common ancestor (a class counting as its own) writes its depth over the
        # block of the classes at or under it, in ascending depth, so the deepest one a
        # pair shares is written last. Ancestors over the same classes write the same
        # block: only the deepest of them. A class is its own deepest ancestor (depth
        # = longest path), so the diagonal is its depth.
        under: dict[str, list[int]] = {}
        for i, wnid in enumerate(classes.wnids):
            for ancestor in hierarchy.ancestors(wnid) | {wnid}:
                under.setdefault(ancestor, []).append(i)
        deepest: dict[tuple[int, ...], int] = {}
        for ancestor, members in under.items():
            if len(members) > 1:
                block = tuple(members)
                deepest[block] = max(deepest.get(block, 0), hierarchy.depth(ancestor))
        n = len(classes.wnids)
        matrix = np.zeros((n, n), np.int64)
        for block, depth in sorted(deepest.items(), key=lambda item: item[1]):
            matrix[np.ix_(block, block)] = depth
        matrix[np.arange(n), np.arange(n)] = [hierarchy.depth(w) for w in classes.wnids]
        name_affinity = int(matrix.max())
        for i, j in _classes_sharing_a_lemma(classes):
            matrix[i, j] = matrix[j, i] = max(matrix[i, j], name_affinity)
        return cls(matrix, _dfs_positions(classes, hierarchy))


def _dfs_positions(classes: ImageNetClasses, hierarchy: WordNetHierarchy) -> np.ndarray:
    index = {w: i for i, w in enumerate(classes.wnids)}
    nodes = {w for w in classes.wnids} | set().union(*(hierarchy.ancestors(w) for w in classes.wnids))
    roots = sorted(n for n in nodes if not hierarchy.parents(n))
    # The walk stays among ``nodes``, which hold every parent of their members: their
    # children there come from their parents, without the whole hierarchy's child lists.
    children: dict[str, set[str]] = {}
    for node in nodes:
        for parent in hierarchy.parents(node):
            children.setdefault(parent, set()).add(node)
    position = np.full(len(classes.wnids), -1, np.int64)
    seen: set[str] = set()
    stack = roots[::-1]
    rank = 0
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in index and position[index[node]] < 0:
            position[index[node]] = rank
            rank += 1
        stack.extend(sorted(children.get(node, ()), reverse=True))
    missing = position < 0
    position[missing] = rank + np.arange(missing.sum())  # not in the hierarchy: last
    return position


@functools.lru_cache(maxsize=1)
def imagenet_affinity() -> ClassAffinity:
    return ClassAffinity.from_wordnet(load_classes(), load_hierarchy())


# ---------------------------------------------------------------- splitting one image's labels

def split_labels(labels: list[int] | np.ndarray, affinity: ClassAffinity,
                 max_labels: int = DEFAULT_MAX_LABELS) -> list[list[int]]:
    """One image's labels as tasks of <= ``max_labels`` similar labels (module docstring).

    Average-linkage agglomerative clustering with a size cap: repeatedly merge the two
    groups with the highest mean pairwise affinity whose union has <= ``max_labels``
    labels, until ceil(k / max_labels) groups remain or no merge fits (then a few
    more tasks than the minimum, each coherent).
    """
    labels = sorted({int(l) for l in labels}, key=lambda l: affinity.dfs_position[l])
    if len(labels) <= max_labels:
        return [labels]
    owner = cluster_labels(np.asarray([labels]), affinity, max_labels)[0]
    return [[l for l, o in zip(labels, owner) if o == head] for head in np.unique(owner)]


def cluster_labels(labels: np.ndarray, affinity: ClassAffinity, max_labels: int) -> np.ndarray:
    """``split_labels``' clustering for n images of k labels at once, in lockstep.

    ``labels``: (n, k), each row one image's distinct labels in depth-first order.
    Returns (n, k): the group of each label, named by its first member's column (so
    groups in the order of their first labels are the tasks in ``split_labels``' order).
    Each step merges, in every image still merging, the pair with the highest mean
    affinity that fits (argmax over the row-major (k, k) scores: ties go to the first
    pair, as for one image). A merge changes only row and column i of the scores and
    retires j, whose row and column become -inf and keep their place.
    """
    n, k = labels.shape
    total = affinity.matrix[labels[:, :, None], labels[:, None, :]].astype(np.float64)  # summed affinity
    sizes = np.ones((n, k))
    score = np.where(sizes[:, :, None] + sizes[:, None, :] <= max_labels,
                     total / (sizes[:, :, None] * sizes[:, None, :]), -np.inf)
    score[:, np.arange(k), np.arange(k)] = -np.inf
    owner = np.tile(np.arange(k), (n, 1))
    live = np.ones((n, k), dtype=bool)
    for _ in range(k - math.ceil(k / max_labels)):
        flat = np.argmax(score.reshape(n, k * k), axis=1)
        merging = np.flatnonzero(score.reshape(n, k * k)[np.arange(n), flat] > -np.inf)
        if not merging.size:
            break  # no two groups fit together in any image
        a, first, second = merging, *np.divmod(flat[merging], k)
        i, j = np.minimum(first, second), np.maximum(first, second)
        total[a, i, :] += total[a, j, :]
        total[a, :, i] += total[a, :, j]
        sizes[a, i] += sizes[a, j]
        live[a, j] = False
        owner[a] = np.where(owner[a] == j[:, None], i[:, None], owner[a])
        size_i, size_all = sizes[a, i][:, None], sizes[a]
        row = np.where(live[a] & (size_i + size_all <= max_labels), total[a, i, :] / (size_i * size_all), -np.inf)
        row[np.arange(len(a)), i] = -np.inf
        score[a, i, :] = row
        score[a, :, i] = row
        score[a, j, :] = -np.inf
        score[a, :, j] = -np.inf
    return owner


def task_id(file_name: str, labels: list[int]) -> str:
    return _task_digest(file_name, [str(label) for label in sorted(labels)])


def _task_digest(file_name: str, sorted_label_texts: Sequence[str]) -> str:
    """The id of the task of ``file_name`` with these labels (sorted, as text): what
    crowd answers join back on, so both makers of ids go through here."""
    return hashlib.sha256(f"{file_name}\t{','.join(sorted_label_texts)}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------- which images

def images_to_relabel(proposals: pd.DataFrame, original_labels: pd.DataFrame | None = None,
                      top1: Mapping[str, pd.DataFrame] | None = None) -> pd.Index:
    """File names that need raters: some model's top-1 differs from the original label.

    With ``top1`` ({model: DataFrame[file_name, label]}) and ``original_labels``;
    else from the proposals' ``sources``; else every image with proposals.
    """
    images = pd.Index(proposals["file_name"].astype(str).unique())
    if top1:
        if original_labels is None:
            raise ValueError("top1 given without original_labels")
        original = original_labels.set_index(original_labels["file_name"].astype(str))["label"]
        missing = images[~images.isin(original.index)]
        if len(missing):
            raise ValueError(f"no original label for {len(missing)} image(s) with proposals, e.g. "
                             f"{list(missing[:3])}")
        differs = pd.Series(False, index=images)
        for model, frame in top1.items():
            predicted = frame.set_index(frame["file_name"].astype(str))["label"]
            absent = images[~images.isin(predicted.index)]
            if len(absent):
                raise ValueError(f"model {model!r} has no top-1 for {len(absent)} image(s), e.g. "
                                 f"{list(absent[:3])}")
            differs |= predicted.reindex(images).to_numpy() != original.reindex(images).to_numpy()
        return images[differs.to_numpy()]
    if "sources" in proposals.columns:
        # One row per (proposal, source), then back to one flag per proposal.
        source = proposals["sources"].reset_index(drop=True).explode()
        text = source.dropna().astype(str)
        has_top1 = text.str.endswith(":top1").groupby(level=0).any().reindex(
            range(len(proposals)), fill_value=False).to_numpy()
        is_original = (source == "original").groupby(level=0).any().reindex(
            range(len(proposals)), fill_value=False).to_numpy()
        if has_top1.any():
            other_top1 = proposals.loc[has_top1 & ~is_original, "file_name"].astype(str)
            return images[images.isin(other_top1)]
    return images


# ---------------------------------------------------------------- building tasks

@dataclasses.dataclass(frozen=True)
class TaskSet:
    """Built tasks. ``questions``: long, one row per (task, label): task_id, file_name,
    label, position (0-based place in the task)."""

    questions: pd.DataFrame
    images_with_proposals: int
    images_skipped: int
    max_labels: int

    @property
    def num_tasks(self) -> int:
        return int(self.questions["task_id"].nunique())

    @functools.cached_property
    def in_file_order(self) -> tuple[pd.DataFrame, np.ndarray]:
        """``_sort_into_file_order``, once: the JSONL, the CSV and the long questions are
        all written in this order."""
        return _sort_into_file_order(self.questions)


def build_tasks(proposals: pd.DataFrame, original_labels: pd.DataFrame | None = None,
                top1: Mapping[str, pd.DataFrame] | None = None, max_labels: int = DEFAULT_MAX_LABELS,
                affinity: ClassAffinity | None = None) -> TaskSet:
    """Tasks for ``proposals`` (DataFrame[file_name, label, ...], one row per pair)."""
    if max_labels < 1:
        raise ValueError(f"max_labels must be >= 1, got {max_labels}")
    missing = [c for c in ("file_name", "label") if c not in proposals.columns]
    if missing:
        raise ValueError(f"proposals lack column(s) {missing}")
    affinity = affinity or imagenet_affinity()
    num_classes = affinity.matrix.shape[0]
    labels = proposals["label"].to_numpy()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"proposal labels must lie in [0, {num_classes})")
    keep = images_to_relabel(proposals, original_labels, top1)
    pairs = proposals.loc[proposals["file_name"].astype(str).isin(keep), ["file_name", "label"]]
    pairs = pairs.astype({"file_name": str, "label": np.int64}).drop_duplicates()
    questions, file_order = _grouped_questions(pairs, affinity, max_labels)
    n_images = int(proposals["file_name"].nunique())
    built = TaskSet(questions, n_images, n_images - len(keep), max_labels)
    # The grouping knows the file order of its rows: in_file_order's cache, primed (a
    # TaskSet made by dataclasses.replace sorts its own questions).
    built.__dict__["in_file_order"] = _in_file_order(questions, file_order)
    return built


def _grouped_questions(pairs: pd.DataFrame, affinity: ClassAffinity,
                       max_labels: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Questions (``QUESTION_COLUMNS``) of distinct (file_name, label) ``pairs``: images in
    file-name order, each image's tasks as ``split_labels`` orders them; and the rows
    in task-file order (``_sort_into_file_order``'s).

    Vectorised: an image with <= ``max_labels`` labels is one task in depth-first
    order (a sort); larger images are clustered together, all images with the same
    number of labels in one ``cluster_labels`` call.
    """
    if not len(pairs):  # every image skipped: no task
        return pd.DataFrame({"task_id": pd.Series(dtype=object), "file_name": pd.Series(dtype=object),
                             "label": pd.Series(dtype=np.int64), "position": pd.Series(dtype=np.int64)}), \
            np.zeros(0, np.int64)
    # Images by their rank in file-name order: integer keys sort and compare faster
    # than the names.
    image, names = pd.factorize(pairs["file_name"].to_numpy(dtype=object), sort=True)
    labels = pairs["label"].to_numpy(np.int64)
    by_image = np.lexsort((affinity.dfs_position[labels], image))  # stable, as the depth-first sort per image
    image, labels = image[by_image], labels[by_image]
    starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]])
    counts = np.diff(np.r_[starts, len(labels)])
    task = np.zeros(len(labels), np.int64)  # task number within the image
    position = np.arange(len(labels)) - np.repeat(starts, counts)
    for k in np.unique(counts[counts > max_labels]):
        rows = starts[counts == k][:, None] + np.arange(k)  # (images with k labels, k)
        owner = cluster_labels(labels[rows], affinity, max_labels)
        heads = owner == np.arange(k)  # a group's first label (depth-first) names it
        task[rows] = np.take_along_axis(np.cumsum(heads, axis=1) - 1, owner, axis=1)
        earlier = np.tril(np.ones((k, k), dtype=bool), -1)  # column q before column p
        position[rows] = ((owner[:, :, None] == owner[:, None, :]) & earlier).sum(axis=2)
    order = np.lexsort((position, task, image))
    image, labels, task, position = image[order], labels[order], task[order], position[order]
    new_task = np.r_[True, (task[1:] != task[:-1]) | (image[1:] != image[:-1])]
    bounds = np.r_[np.flatnonzero(new_task), len(labels)]
    ids = np.asarray(_task_ids(names[image[bounds[:-1]]], labels, bounds), dtype=object)
    questions = pd.DataFrame({"task_id": np.repeat(ids, np.diff(bounds)),
                              "file_name": names[image], "label": labels, "position": position})
    # File order: the tasks by image (names in order), then task id; a task's rows by position, as here.
    by_id = np.lexsort((ids.astype(str), image[bounds[:-1]]))
    sizes = np.diff(bounds)[by_id]
    file_order = np.repeat(bounds[:-1][by_id] - (np.cumsum(sizes) - sizes), sizes) + np.arange(len(labels))
    return questions, file_order


def _task_ids(file_names: np.ndarray, labels: np.ndarray, bounds: np.ndarray) -> list[str]:
    """``task_id`` of each task: ``file_names[t]`` and ``labels[bounds[t]:bounds[t + 1]]``,
    with each task's labels sorted in one lexsort and each class's text made once."""
    task = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    label_text = [str(label) for label in range(int(labels.max(initial=0)) + 1)]  # labels are >= 0 (build_tasks)
    texts = [label_text[l] for l in labels[np.lexsort((labels, task))].tolist()]
    return [_task_digest(name, texts[b:e])
            for name, b, e in zip(file_names.tolist(), bounds[:-1].tolist(), bounds[1:].tolist())]


def summarize_tasks(tasks: TaskSet) -> dict[str, Any]:
    """Counts for reports: images kept and skipped, tasks, proposals per image and task."""
    q, bounds = tasks.in_file_order  # images in name order, a task's rows together
    names = q["file_name"].to_numpy(dtype=object)
    image_of_row = np.cumsum(np.r_[True, names[1:] != names[:-1]]) - 1 if len(q) else np.zeros(0, np.int64)
    tasks_per_image = np.bincount(image_of_row[bounds[:-1]])
    images, num_tasks = len(tasks_per_image), len(bounds) - 1  # a task id digests its image: one image each
    return {
        "images_with_proposals": tasks.images_with_proposals,
        "images_skipped_all_top1_agree": tasks.images_skipped,
        "images_to_relabel": images,
        "tasks": num_tasks,
        "questions": int(len(q)),
        "proposals_per_image": round(len(q) / max(images, 1), 3),
        "labels_per_task": round(len(q) / num_tasks, 3) if num_tasks else 0.0,
        "images_split_into_several_tasks": int(np.count_nonzero(tasks_per_image > 1)),
        "max_labels_per_task": tasks.max_labels,
    }


# ---------------------------------------------------------------- task files

def _atomic_write_text(path: Path, write) -> Path:
    """``write(f)`` into a text file that appears whole or not at all."""
    with atomic.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        write(f)
    return Path(path)

def label_entry(classes: ImageNetClasses, label: int, example_uri_template: str | None = None) -> dict[str, Any]:
    """One label of a task record: index, wnid, name, lemmas, gloss (+ examples_uri)."""
    entry = {"index": label, "wnid": classes.wnids[label], "name": classes.names[label],
             "lemmas": classes.lemmas[label], "gloss": classes.glosses[label]}
    if example_uri_template:
        entry["examples_uri"] = example_uri_template.format(wnid=classes.wnids[label], index=label)
    return entry


def task_records(tasks: TaskSet, image_uri_template: str = "{file_name}",
                 classes: ImageNetClasses | None = None,
                 example_uri_template: str | None = None) -> list[dict[str, Any]]:
    """One JSON-able dict per task (the JSONL format of the module docstring), by task order."""
    classes = classes or load_classes()
    records = []
    q = tasks.questions.sort_values(["file_name", "task_id", "position"], kind="stable")
    for (file_name, tid), task in q.groupby(["file_name", "task_id"], sort=False):
        labels = [label_entry(classes, label, example_uri_template) for label in task["label"].tolist()]
        records.append({"task_id": tid, "file_name": file_name,
                        "image_uri": image_uri_template.format(file_name=file_name),
                        "labels": labels, "answer_options": list(ANSWER_OPTIONS)})
    return records


def _sort_into_file_order(questions: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Questions in task-file order (file_name, task_id, position) and the row where
    each task starts (plus the end): the order of ``task_records``."""
    return _in_file_order(questions, None)


def _in_file_order(questions: pd.DataFrame, order: np.ndarray | None) -> tuple[pd.DataFrame, np.ndarray]:
    """``_sort_into_file_order`` with the sorting permutation ``order`` if known."""
    q = (questions.sort_values(["file_name", "task_id", "position"], kind="stable") if order is None
         else questions.take(order))
    file_names, ids = q["file_name"].to_numpy(dtype=object), q["task_id"].to_numpy(dtype=object)
    if not len(q):
        return q, np.zeros(1, np.int64)  # no task: no start, one end
    starts = np.flatnonzero(np.r_[True, (file_names[1:] != file_names[:-1]) | (ids[1:] != ids[:-1])])
    return q, np.r_[starts, len(q)]


def write_tasks_jsonl(tasks: TaskSet, path: str | os.PathLike, image_uri_template: str = "{file_name}",
                      classes: ImageNetClasses | None = None,
                      example_uri_template: str | None = None) -> Path:
    """``task_records`` as JSON lines. Each class's label entry, each image's name and
    URI and each task id are serialised once and the lines are put together from the
    pieces: the same text as ``json.dumps`` of each record (default separators,
    ``ensure_ascii=False``), without a dict per task."""
    classes = classes or load_classes()
    encode = json.JSONEncoder(ensure_ascii=False).encode
    entries = [encode(label_entry(classes, label, example_uri_template)) for label in range(len(classes.wnids))]
    options = encode(list(ANSWER_OPTIONS))
    q, bounds = tasks.in_file_order
    starts = bounds[:-1]
    images = _image_texts(q["file_name"].to_numpy(dtype=object)[starts],
                          lambda name: f'"file_name": {encode(name)}, '
                                       f'"image_uri": {encode(image_uri_template.format(file_name=name))}')
    ids, labels = q["task_id"].to_numpy(dtype=object)[starts].tolist(), q["label"].tolist()
    lines = (f'{{"task_id": {encode(tid)}, {image}, "labels": [{", ".join(map(entries.__getitem__, labels[b:e]))}], '
             f'"answer_options": {options}}}\n'
             for tid, image, b, e in zip(ids, images, starts.tolist(), bounds[1:].tolist()))
    return _atomic_write_text(Path(path), lambda f: f.writelines(lines))


def _image_texts(file_names: np.ndarray, text: Callable[[str], str]) -> list[str]:
    """``text(file_name)`` for each of ``file_names``, computed once per image."""
    codes, uniques = pd.factorize(file_names)
    return np.asarray([text(name) for name in uniques], dtype=object)[codes].tolist()


def write_tasks_csv(tasks: TaskSet, path: str | os.PathLike, image_uri_template: str = "{file_name}",
                    classes: ImageNetClasses | None = None) -> Path:
    """One task per row: task_id, file_name, image_uri, n_labels, then label_i, wnid_i,
    name_i, gloss_i for each label (empty cells where a task has fewer): pandas'
    to_csv text (the csv module's minimal quoting, os.linesep). Each class's four
    cells are quoted once and the rows put together from the pieces."""
    classes = classes or load_classes()
    q, bounds = tasks.in_file_order
    starts, n_labels = bounds[:-1], np.diff(bounds)
    width = int(n_labels.max()) if len(n_labels) else 0
    fields = ("label", "wnid", "name", "gloss")
    per_class = _csv_rows(zip(range(len(classes.wnids)), classes.wnids, classes.names, classes.glosses))
    names = q["file_name"].to_numpy(dtype=object)[starts]
    heads = _csv_rows(zip(q["task_id"].to_numpy(dtype=object)[starts].tolist(), names.tolist(),
                          _image_texts(names, lambda name: image_uri_template.format(file_name=name)),
                          n_labels.tolist()))
    header = _csv_rows([["task_id", "file_name", "image_uri", "n_labels",
                         *(f"{field}_{i + 1}" for i in range(width) for field in fields)]])[0]
    no_label = ",".join([""] * len(fields))  # a label's empty cells
    labels = q["label"].tolist()
    rows = (",".join([head, *map(per_class.__getitem__, labels[b:e]), *[no_label] * (width - (e - b))]) + os.linesep
            for head, b, e in zip(heads, starts.tolist(), bounds[1:].tolist()))
    return _atomic_write_text(Path(path), lambda f: f.writelines(itertools.chain([header + os.linesep], rows)))


def _csv_rows(rows: Iterable[Sequence[Any]]) -> list[str]:
    """Each row as the csv module writes it (minimal quoting), without its line end."""
    texts: list[str] = []
    csv.writer(types.SimpleNamespace(write=texts.append), lineterminator="").writerows(rows)
    return texts


def task_questions_table(tasks: TaskSet, image_uri_template: str = "{file_name}") -> pa.Table:
    """The tasks in ``read_tasks_jsonl``'s long shape (task_id, file_name, image_uri,
    label, position), in task-file order, as the Arrow table ``Table.from_pandas`` makes
    of that frame (same schema and pandas metadata), built without converting 185k Python strings a
    column: each distinct file name, URI and task id becomes Arrow once and the rows
    take from those."""
    import pyarrow as pa
    import pyarrow.compute as pc

    q, bounds = tasks.in_file_order
    name_codes, names = pd.factorize(q["file_name"].to_numpy(dtype=object))
    id_codes, ids = pd.factorize(q["task_id"].to_numpy(dtype=object))
    uris = [image_uri_template.format(file_name=name) for name in names]

    labels = q["label"].to_numpy(np.int64)
    positions = np.arange(len(q)) - np.repeat(bounds[:-1], np.diff(bounds))
    head = pd.DataFrame({"task_id": pd.Series(ids[:1], dtype=object), "file_name": pd.Series(names[:1], dtype=object),
                         "image_uri": pd.Series(uris[:1], dtype=object), "label": labels[:1],
                         "position": positions[:1]})
    schema = pa.Schema.from_pandas(head, preserve_index=False)

    def taken(column: str, distinct, codes: np.ndarray) -> pa.Array:  # no tasks: null columns, as from_pandas
        return pc.take(pa.array(distinct, schema.field(column).type), pa.array(codes))

    return pa.Table.from_arrays([taken("task_id", ids, id_codes), taken("file_name", names, name_codes),
                                 taken("image_uri", uris, name_codes),
                                 pa.array(labels), pa.array(positions)], schema=schema)


def task_record(path: str | os.PathLike, number: int, line: str) -> dict[str, Any]:
    """One JSONL line of a tasks file, checked; errors name the file, line and field."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskFileError(f"{path}: line {number}: not JSON: {e}") from None
    missing = [f for f in ("task_id", "file_name", "labels") if not isinstance(record, dict) or f not in record]
    if missing:
        raise TaskFileError(f"{path}: line {number}: missing field {missing[0]!r}")
    for position, label in enumerate(record["labels"]):
        if not isinstance(label, dict) or not isinstance(label.get("index"), int):
            raise TaskFileError(f"{path}: line {number}, field 'labels[{position}].index': "
                                "expected an integer class index")
    return record


def read_tasks_jsonl(path: str | os.PathLike) -> pd.DataFrame:
    """A tasks JSONL as long questions: task_id, file_name, image_uri, label, position."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = [task_record(path, n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    rows = [(r["task_id"], r["file_name"], r.get("image_uri", ""), label["index"], position)
            for r in records for position, label in enumerate(r["labels"])]
    return pd.DataFrame(rows, columns=["task_id", "file_name", "image_uri", "label", "position"]).astype(
        {"label": np.int64, "position": np.int64})


def write_summary(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    return _atomic_write_text(Path(path), lambda f: f.write(json.dumps(summary, indent=2) + "\n"))
