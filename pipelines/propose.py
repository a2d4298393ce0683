"""``label-audit propose``: label-proposal pooling and model-subset selection in Beam.

    label-audit propose --predictions A.npz B.npz ... --original-labels LABELS.tsv \\
        [--top-n N] [--gold GOLD.tsv|json [--recall-target 0.97]] [--models A B] --out DIR

Predictions are NPZ files in ``auditing.predictions``' format (``file_names`` and
``logits``, or ``top1`` only for a model without logits; optional ``image_index``).
A model is named by its file stem, or by ``NAME=PATH``. Every file must cover the
same images. Image order (which breaks ties at the N-th value) is sorted file name
order, or the order of ``image_index`` where a file has one.

The pipeline streams each file's ``logits`` in row shards straight out of the NPZ
(an uncompressed member is read shard by shard in parallel, a compressed one
sequentially within one worker), so no step holds more than one shard of logits:

    ListPredictionFiles -> SelectModelProposals [ListShards -> Reshuffle -> TopNPerShard
      -> MergeShardsPerModel (exact top-N) -> FinishModels] -> CollectModels -> AttachImages
      -> WriteSelections | [SelectModelSubset] -> PoolProposals -> WriteProposals

Outputs in DIR (each written to a temporary file, then renamed):
- ``proposals.parquet``: one row per proposed (image, label) pair, sorted by image
  order then label: ``file_name`` (str), ``label`` (int64), ``count`` (int64, the
  number of (model, criterion) top-N selections holding the pair), ``sources``
  (list<string>: ``"<model>:logits"``, ``"<model>:probs"``, ``"<model>:top1"``,
  ``"original"``). See ``auditing.proposals`` for the rule.
- ``selections.npz``: each model's exact selections, for the subset selection without recomputing
  them: ``model_names`` (M,), ``file_names`` (images,), ``num_classes``,
  ``logits_keys`` / ``probs_keys`` int64 keys ``image * num_classes + label`` of all
  models end to end (model m's are ``[offsets[m]:offsets[m + 1]]`` of ``logits_offsets`` /
  ``probs_offsets``; empty for a top-1-only model), ``top1`` (M, images).
- ``summary.json``: counts.
- with ``--gold``: ``subsets.csv`` (every subset tried) and ``selection.json``
  (chosen models, precision, recall); the proposals are then those of the chosen subset.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from auditing import atomic
from auditing import labelsets
from auditing.imagenet import NUM_CLASSES
from auditing.predictions import PredictionsFormatError, load_predictions
from auditing.proposals import (ModelSelections, ModelTopN, NonFiniteLogitsError, ProposalPool, TopN,
                                candidate_pool, check_model_name, default_top_n)
from auditing.subset_selection import ModelSubsetSelector
from pipelines.beam_options import make_options

log = logging.getLogger(__name__)

# Values per shard: 5,000 ImageNet rows (20 MB of float32 logits, 40 MB as float64).
DEFAULT_SHARD_VALUES = 5_000_000


# ---------------------------------------------------------------- reading NPZ shards

@dataclasses.dataclass(frozen=True)
class _Member:
    """One array of an NPZ: its header, and where its data starts in the file if uncompressed."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int | None  # byte offset of the array data in the NPZ file; None if compressed


def _read_npy_header(f, path: str, key: str, data_offset: bool = False) -> _Member:
    """Parse the .npy header at ``f``'s position; ``data_offset``: note where the data starts."""
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(f)
    if dtype.hasobject:
        raise PredictionsFormatError(f"{path}: {key!r} holds Python objects; refused")
    return _Member(shape, dtype, fortran_order, f.tell() if data_offset else None)


def _member_header(path: str, key: str) -> _Member | None:
    """The header of ``key``.npy in the NPZ at ``path``, or None if it has no such key."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(f"{key}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as f:
                return _read_npy_header(f, path, key)
    # Uncompressed: find the data in the file itself, so shards are read straight from
    # disk (zipfile would re-read, and CRC, everything before a shard to seek to it).
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local_header = f.read(30)
        name_length, extra_length = struct.unpack("<HH", local_header[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        return _read_npy_header(f, path, key, data_offset=True)


def _read_rows(path: str, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (start, stop, logits[start:stop]) for increasing ``ranges``, one shard in memory."""
    member = _member_header(path, "logits")
    if member is None:
        raise PredictionsFormatError(f"{path}: no key 'logits'")
    if member.fortran_order:  # rows are not contiguous: read the whole array once
        with np.load(path, allow_pickle=False) as npz:
            whole = npz["logits"]
        for start, stop in ranges:
            yield start, stop, np.ascontiguousarray(whole[start:stop])
        return
    num_classes = member.shape[1]
    row_bytes = num_classes * member.dtype.itemsize

    def checked(start: int, stop: int, rows: np.ndarray) -> np.ndarray:
        if rows.size != (stop - start) * num_classes:
            raise PredictionsFormatError(f"{path}: 'logits' is truncated before row {stop}")
        return rows.reshape(stop - start, num_classes)

    if member.data_offset is not None:
        for start, stop in ranges:
            rows = np.fromfile(path, member.dtype, count=(stop - start) * num_classes,
                               offset=member.data_offset + start * row_bytes)
            yield start, stop, checked(start, stop, rows)
        return
    with zipfile.ZipFile(path) as archive, archive.open("logits.npy") as f:
        _read_npy_header(f, path, "logits")
        offset = f.tell()
        for start, stop in ranges:  # forward seeks only: one decompression pass
            f.seek(offset + start * row_bytes)
            yield start, stop, checked(start, stop, np.frombuffer(f.read((stop - start) * row_bytes),
                                                                  member.dtype))


@dataclasses.dataclass(frozen=True)
class PredictionFile:
    """One model's predictions NPZ, with the image index of each of its rows."""

    model: str
    path: str
    num_rows: int
    # Row r is image row_images[r] in the shared image order; None: row r is image r.
    row_images: np.ndarray | None
    num_classes: int | None  # None: a top-1-only file
    compressed: bool = False
    fortran_order: bool = False


@dataclasses.dataclass(frozen=True)
class ShardWork:
    """Rows of one file for one worker: ``ranges`` (contiguous) are read in order, one at a time."""

    file: PredictionFile  # without its row_images: this item carries its own below
    ranges: tuple[tuple[int, int], ...]
    row_images: np.ndarray | None  # images of rows ranges[0][0]:ranges[-1][1]; None: row r is image r

    def images_of_rows(self, start: int, stop: int) -> np.ndarray:
        if self.row_images is None:
            return np.arange(start, stop)
        first = self.ranges[0][0]
        return self.row_images[start - first:stop - first]


def _image_order(path: str, file_names: np.ndarray, image_index: np.ndarray | None) -> np.ndarray:
    """File names in image order: sorted, or by ``image_index``."""
    if image_index is None:
        return np.sort(file_names)
    if not pd.Index(image_index).is_unique:
        raise PredictionsFormatError(f"{path}: 'image_index' has duplicate values")
    return file_names[np.argsort(image_index, kind="stable")]


def plan_prediction_files(prediction_paths: Mapping[str, str | os.PathLike]
                          ) -> tuple[list[PredictionFile], np.ndarray]:
    """Check the files agree on their images; return them and the file names in image order.

    Reads only ``file_names``, ``image_index`` and the ``logits`` header.
    """
    files, order = [], None
    first_path = None
    for model, path in prediction_paths.items():
        check_model_name(model)
        path = str(path)
        logits = _member_header(path, "logits") if path.lower().endswith(".npz") else None
        if logits is None:
            # A top-1-only file (NPZ or the published CSV format) is small: it is read and
            # validated whole by auditing.predictions, the one validator of the format.
            pred = load_predictions(path)
            if pred.top1 is None:
                raise PredictionsFormatError(f"{path}: needs 'logits' (N, C) or 'top1' (N,)")
            names, image_index = pred.file_names.astype(str), pred.image_index
        else:
            # Logits are streamed in row shards: only what the stream needs is checked
            # here (names, shape, dtype); the values are checked shard by shard.
            try:
                with np.load(path, allow_pickle=False) as npz:
                    names = npz["file_names"]
                    image_index = npz["image_index"] if "image_index" in npz.files else None
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
                raise PredictionsFormatError(f"{path}: cannot read 'file_names' of model {model!r}: {e}") from e
            if names.dtype.kind == "S":
                names = np.char.decode(names, "utf-8")
        this_order = _image_order(path, names.astype(str), image_index)
        if not pd.Index(this_order).is_unique:
            raise PredictionsFormatError(f"{path}: 'file_names' has duplicates")
        if order is None:
            order, first_path = this_order, path
        elif this_order.shape != order.shape or (this_order != order).any():
            extra = np.setdiff1d(this_order, order)
            missing = np.setdiff1d(order, this_order)
            raise PredictionsFormatError(
                f"{path}: its images differ from those of {first_path} "
                f"({extra.size} extra, e.g. {extra[:2].tolist()}; {missing.size} missing, e.g. "
                f"{missing[:2].tolist()})" + ("" if extra.size or missing.size else
                                               "; same names in another image order"))
        row_images = pd.Index(order).get_indexer(names).astype(np.int64)
        if (row_images == np.arange(row_images.size)).all():
            row_images = None  # the common case: rows already in image order
        if logits is None:
            files.append(PredictionFile(model, path, names.size, row_images, None))
            continue
        if len(logits.shape) != 2 or logits.shape[0] != names.size or logits.dtype.kind != "f":
            raise PredictionsFormatError(f"{path}: 'logits' must be float ({names.size}, C), got "
                                         f"{logits.dtype} {logits.shape}")
        files.append(PredictionFile(model, path, names.size, row_images, logits.shape[1],
                                    logits.data_offset is None, logits.fortran_order))
    if order is None:
        raise ValueError("no predictions given")
    classes = {f.num_classes for f in files if f.num_classes is not None}
    if len(classes) > 1:
        raise PredictionsFormatError(f"the models disagree on the number of classes: "
                                     f"{ {f.model: f.num_classes for f in files} }")
    return files, order


def split_into_shards(file: PredictionFile, rows_per_shard: int) -> list[ShardWork]:
    """Work items for one file: a shard each where seekable, else all shards in one item."""
    if file.num_classes is None:
        groups = [((0, file.num_rows),)]
    else:
        ranges = tuple((start, min(start + rows_per_shard, file.num_rows))
                       for start in range(0, file.num_rows, rows_per_shard))
        groups = [ranges] if file.compressed or file.fortran_order else [(r,) for r in ranges]
    light = dataclasses.replace(file, row_images=None)
    return [ShardWork(light, group, None if file.row_images is None
                      else file.row_images[group[0][0]:group[-1][1]]) for group in groups]


def summarize_work(work: ShardWork, n: int) -> tuple[str, ModelTopN]:
    """Exact top-``n`` candidates and top-1 of the rows of one work item."""
    file = work.file
    if file.num_classes is None:
        top1 = load_predictions(file.path).top1.astype(np.int64)
        return file.model, ModelTopN(TopN.empty(), TopN.empty(), work.images_of_rows(0, file.num_rows),
                                     top1)
    parts = []
    for start, stop, logits in _read_rows(file.path, work.ranges):
        try:
            parts.append(ModelTopN.of_rows(logits, work.images_of_rows(start, stop), n))
        except NonFiniteLogitsError as e:
            raise PredictionsFormatError(f"{file.path}: 'logits' row {start + e.row} has a NaN or "
                                         "infinite value") from None
        if len(parts) > 1:  # keep at most the running top-n and one shard
            parts = [ModelTopN.merge(parts, n)]
    return file.model, parts[0]


# ---------------------------------------------------------------- Beam transforms

class _MergeModelTopN(beam.CombineFn):
    """Exact merge of per-shard top-n: the global top-n lies in the union of the shards'."""

    def __init__(self, n: int):
        self._n = n

    def create_accumulator(self) -> ModelTopN | None:
        return None

    def add_input(self, accumulator: ModelTopN | None, summary: ModelTopN) -> ModelTopN:
        return summary if accumulator is None else ModelTopN.merge([accumulator, summary], self._n)

    def merge_accumulators(self, accumulators) -> ModelTopN | None:
        parts = [a for a in accumulators if a is not None]
        return ModelTopN.merge(parts, self._n) if parts else None

    def extract_output(self, accumulator: ModelTopN | None) -> ModelTopN | None:
        return accumulator


class SelectModelProposals(beam.PTransform):
    """PCollection[PredictionFile] -> PCollection[ModelSelections], one per model, exact top-n."""

    def __init__(self, n: int, num_images: int, num_classes: int, rows_per_shard: int):
        super().__init__()
        self._n, self._num_images, self._num_classes = n, num_images, num_classes
        self._rows_per_shard = rows_per_shard

    def expand(self, files):
        return (files
                | "ListShards" >> beam.FlatMap(split_into_shards, self._rows_per_shard)
                | "Reshuffle" >> beam.Reshuffle()
                | "TopNPerShard" >> beam.Map(summarize_work, self._n)
                | "MergeShardsPerModel" >> beam.CombinePerKey(_MergeModelTopN(self._n))
                | "FinishModels" >> beam.Map(_finish_model, self._num_images, self._num_classes))


def _finish_model(model_summary: tuple[str, ModelTopN], num_images: int,
                  num_classes: int) -> ModelSelections:
    model, summary = model_summary
    return ModelSelections.from_top_n(model, summary, num_images, num_classes)


# ---------------------------------------------------------------- writing outputs

def _offsets(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int64)


def write_selections(selections: Sequence[ModelSelections], file_names: np.ndarray, path: Path) -> Path:
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, model_names=np.array([s.name for s in selections]), file_names=file_names,
                 num_classes=np.int64(selections[0].num_classes),
                 logits_keys=np.concatenate([s.logits for s in selections]),
                 logits_offsets=_offsets([s.logits for s in selections]),
                 probs_keys=np.concatenate([s.probs for s in selections]),
                 probs_offsets=_offsets([s.probs for s in selections]),
                 top1=np.stack([s.top1 for s in selections]))
    return path


def read_selections(path: str | os.PathLike) -> tuple[list[ModelSelections], np.ndarray]:
    """The per-model selections and file names written by :func:`write_selections`."""
    with np.load(path, allow_pickle=False) as npz:
        num_classes = int(npz["num_classes"])
        logits = np.split(npz["logits_keys"], npz["logits_offsets"][1:-1])
        probs = np.split(npz["probs_keys"], npz["probs_offsets"][1:-1])
        selections = [ModelSelections(str(name), num_classes, logits[m], probs[m], npz["top1"][m])
                      for m, name in enumerate(npz["model_names"])]
        return selections, npz["file_names"]


def write_proposals(pool: ProposalPool, path: Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        pq.write_table(pool.to_arrow(), tmp)
    return path


def _write_json(payload: Mapping[str, Any], path: Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def proposal_summary(pool: ProposalPool) -> dict[str, Any]:
    per_image = pool.proposals_per_image()
    return {"models": list(pool.model_names), "images": pool.num_images, "proposals": len(pool),
            "proposals_per_image": round(float(per_image.mean()), 4),
            "max_proposals_per_image": int(per_image.max()),
            "images_with_a_non_original_proposal": int(np.unique(pool.image[~pool.is_original]).size)}


def selection_summary(selector: ModelSubsetSelector, top: int = 20) -> dict[str, Any]:
    """What the subset selection chose, and the best feasible subsets (the whole table is subsets.csv)."""
    best = selector.best_
    table = selector.table_
    feasible = table[table["recall"] >= selector.recall_target]
    return {"selected_models": list(selector.best_models_), "precision": float(best["precision"]),
            "recall": float(best["recall"]), "proposals_per_image": float(best["proposals_per_image"]),
            "recall_target": selector.recall_target, "target_met": bool(selector.target_met_),
            "gold_images": int(selector.gold_images_), "subsets_tried": len(table),
            "search": selector.search_,
            "top_subsets": feasible.sort_values(["precision", "n_models"], ascending=[False, True])
                           .head(top)[["models", "precision", "recall", "proposals_per_image"]]
                           .to_dict(orient="records")}


# ---------------------------------------------------------------- running

def _originals_in_image_order(original_labels: pd.DataFrame | str | os.PathLike,
                              file_names: np.ndarray) -> np.ndarray:
    if not isinstance(original_labels, pd.DataFrame):
        original_labels = labelsets.load_original_labels(original_labels)
    by_name = pd.Series(original_labels["label"].to_numpy(np.int64),
                        index=original_labels["file_name"].astype(str))
    missing = ~pd.Index(file_names).isin(by_name.index)
    if missing.any():
        raise labelsets.LabelFileError(
            f"original labels: no label for {int(missing.sum())} predicted image(s), e.g. "
            f"{file_names[missing][:3].tolist()}")
    return by_name.reindex(file_names).to_numpy(np.int64)


def _model_paths(prediction_paths: Mapping[str, Any] | Sequence[Any]) -> dict[str, str]:
    if isinstance(prediction_paths, Mapping):
        return {str(k): str(v) for k, v in prediction_paths.items()}
    paths: dict[str, str] = {}
    for item in prediction_paths:
        item = str(item)
        name, sep, path = item.partition("=")
        if not sep or os.path.exists(item):
            name, path = Path(item).stem, item
        if name in paths:
            raise ValueError(f"two prediction files name model {name!r}; name them NAME=PATH")
        paths[name] = path
    return paths


@dataclasses.dataclass(frozen=True)
class SplitImages:
    """The split's file names in image order and their original labels."""

    file_names: np.ndarray
    originals: np.ndarray

    def __reduce__(self):
        # Pickled into the pipeline (which Beam bz2-compresses): one string, not UTF-32 cells.
        return _split_images, ("\n".join(self.file_names.tolist()), self.originals.astype(np.int32))


def _split_images(joined_names: str, originals: np.ndarray) -> SplitImages:
    return SplitImages(np.array(joined_names.split("\n")), originals.astype(np.int64))


# What the pooling steps pass on: the models (in the order given) and the images.
PoolInput = tuple[list[ModelSelections], SplitImages]


def _attach_images(selections: list[ModelSelections], names: Sequence[str],
                   images: SplitImages) -> PoolInput:
    by_name = {s.name: s for s in selections}
    return [by_name[n] for n in names], images


def _write_selections(item: PoolInput, path: Path) -> None:
    models, images = item
    write_selections(models, images.file_names, path)


def _choose_subset(item: PoolInput, gold: Mapping[str, frozenset[int]], recall_target: float,
                   out: Path) -> PoolInput:
    models, images = item
    selector = ModelSubsetSelector(recall_target=recall_target).fit(
        candidate_pool(models, images.originals, images.file_names), gold)
    with atomic.atomic_path(out / "subsets.csv") as tmp:
        selector.table_.to_csv(tmp, index=False)
    _write_json(selection_summary(selector), out / "selection.json")
    return [m for m in models if m.name in selector.best_models_], images


def _pool(item: PoolInput, subset: Sequence[str] | None) -> ProposalPool:
    models, images = item
    pool = candidate_pool(models, images.originals, images.file_names)
    return pool.restrict(None if subset is None else pool.mask_of(subset))


def _write_pool(pool: ProposalPool, out: Path) -> None:
    write_proposals(pool, out / "proposals.parquet")
    _write_json(proposal_summary(pool), out / "summary.json")


def build_propose_pipeline(pipeline: beam.Pipeline, files: list[PredictionFile], images: SplitImages,
                           out: Path, n: int, rows_per_shard: int,
                           gold: Mapping[str, frozenset[int]] | None = None,
                           recall_target: float = 0.97, subset: Sequence[str] | None = None) -> None:
    """Stage 2 (and 3 with ``gold``) into ``out``; see the module docstring."""
    num_classes = next((f.num_classes for f in files if f.num_classes), NUM_CLASSES)
    models = (pipeline
              | "ListPredictionFiles" >> beam.Create(files)
              | "SelectModelProposals" >> SelectModelProposals(n, images.file_names.size, num_classes,
                                                               rows_per_shard)
              | "CollectModels" >> beam.combiners.ToList()
              | "AttachImages" >> beam.Map(_attach_images, [f.model for f in files], images))
    _ = models | "WriteSelections" >> beam.Map(_write_selections, out / "selections.npz")
    if gold is not None:
        models = models | "SelectModelSubset" >> beam.Map(_choose_subset, gold, recall_target, out)
    _ = (models
         | "PoolProposals" >> beam.Map(_pool, subset)
         | "WriteProposals" >> beam.Map(_write_pool, out))


def propose(prediction_paths: Mapping[str, Any] | Sequence[Any],
            original_labels: pd.DataFrame | str | os.PathLike, out_dir: str | os.PathLike,
            top_n: int | None = None, options: PipelineOptions | None = None,
            gold: Mapping[str, frozenset[int]] | None = None, recall_target: float = 0.97,
            models: Sequence[str] | None = None, rows_per_shard: int | None = None) -> Path:
    """Run the pipeline; write proposals.parquet etc. into ``out_dir`` and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, file_names = plan_prediction_files(_model_paths(prediction_paths))
    images = SplitImages(file_names, _originals_in_image_order(original_labels, file_names))
    num_classes = next((f.num_classes for f in files if f.num_classes), NUM_CLASSES)
    n = default_top_n(file_names.size) if top_n is None else int(top_n)
    rows = rows_per_shard or max(1, DEFAULT_SHARD_VALUES // num_classes)
    log.info("pooling: %d model(s) x %d images x %d classes, N = %d per model and criterion, "
             "%d rows per shard", len(files), file_names.size, num_classes, n, rows)
    with beam.Pipeline(options=options or make_options("direct", 1)) as pipeline:
        build_propose_pipeline(pipeline, files, images, out, n, rows, gold, recall_target, models)
    return out


def run_proposals(prediction_paths: Mapping[str, Any] | Sequence[Any],
                  original_labels: pd.DataFrame | str | os.PathLike, top_n: int | None = None,
                  options: PipelineOptions | None = None, out_dir: str | os.PathLike | None = None,
                  rows_per_shard: int | None = None) -> pd.DataFrame:
    """Stage 2 over every model given: the proposals table (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="propose-") as tmp:
        out = Path(out_dir or tmp)
        propose(prediction_paths, original_labels, out, top_n, options, rows_per_shard=rows_per_shard)
        return pd.read_parquet(out / "proposals.parquet")


def run_subset_selection(prediction_paths: Mapping[str, Any] | Sequence[Any],
                         original_labels: pd.DataFrame | str | os.PathLike,
                         gold: Mapping[str, frozenset[int]], recall_target: float = 0.97,
                         top_n: int | None = None, options: PipelineOptions | None = None,
                         out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Stage 3: selection.json's content (``selected_models``, ``precision``, ``recall``...)."""
    with tempfile.TemporaryDirectory(prefix="select-") as tmp:
        out = Path(out_dir or tmp)
        propose(prediction_paths, original_labels, out, top_n, options, gold=gold,
                recall_target=recall_target)
        return json.loads((out / "selection.json").read_text())


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", nargs="+", required=True, metavar="[NAME=]NPZ",
                        help="one predictions NPZ per model (model name = file stem, or NAME=PATH)")
    parser.add_argument("--original-labels", required=True, metavar="TSV",
                        help="file_name<TAB>label (header optional), or 'tfds-wheel' for ImageNet val")
    parser.add_argument("--top-n", type=int, default=None,
                        help="N per model and criterion (default: 3 x number of images)")
    parser.add_argument("--gold", default=None, metavar="TSV|JSON",
                        help="gold label sets: choose the model subset and pool only it")
    parser.add_argument("--recall-target", type=float, default=0.97,
                        help="the most precise subset with at least this recall (default 0.97)")
    parser.add_argument("--models", nargs="+", default=None, help="pool only these models")
    parser.add_argument("--rows-per-shard", type=int, default=None,
                        help=f"rows per shard (default {DEFAULT_SHARD_VALUES:,} values / classes)")
    parser.add_argument("--runner", default="direct", choices=["direct", "direct-multiprocess", "dataflow"])
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--out", required=True, metavar="DIR")


def main(args: argparse.Namespace) -> int:
    """The propose stage of the graph (and select_subset with ``--gold``) on the given
    prediction files; their outputs are copied to ``--out``."""
    import shutil

    from pipelines import run as run_lib
    from pipelines.config import AuditConfig

    if args.gold and args.models:
        raise labelsets.LabelFileError("--gold chooses the models itself; do not also give --models")
    paths = _model_paths(args.predictions)
    if args.models:
        unknown = sorted(set(args.models) - set(paths))
        if unknown:
            raise PredictionsFormatError(f"--models {unknown}: no such model among {sorted(paths)}")
        paths = {m: paths[m] for m in args.models}
    out = Path(args.out)
    original = args.original_labels
    stages: dict[str, Any] = {"predict": {"predictions": {m: str(Path(p).resolve()) for m, p in paths.items()}},
                              "propose": {"top_n": args.top_n, "rows_per_shard": args.rows_per_shard}}
    if args.gold:
        stages["select_subset"] = {"gold": str(Path(args.gold).resolve()), "recall_target": args.recall_target}
    config = AuditConfig.model_validate({
        "output_dir": str((out / ".label-audit").resolve()),
        "runner": {"name": args.runner, "num_workers": args.num_workers},
        "dataset": {"original_labels": original if original == labelsets.TFDS_WHEEL
                    else str(Path(original).resolve())},
        "stages": stages})
    result = run_lib.execute(config, target="propose", echo=lambda *a, **k: log.info(" ".join(map(str, a))))
    for artifact, names in (("proposals", ("proposals.parquet", "selections.npz", "summary.json")),
                            ("selection", ("selection.json", "subsets.csv"))):
        for name in names:
            if artifact in result.artifacts and result.artifacts[artifact].file(name).is_file():
                with atomic.atomic_path(out / name) as tmp:
                    shutil.copyfile(result.artifacts[artifact].file(name), tmp)
    summary = json.loads((out / "summary.json").read_text())
    if args.gold:
        chosen = json.loads((out / "selection.json").read_text())
        print(f"chose {chosen['selected_models']} of {chosen['subsets_tried']:,} subsets: "
              f"precision {chosen['precision']:.4f}, recall {chosen['recall']:.4f} "
              f"(target {chosen['recall_target']}{'' if chosen['target_met'] else ', NOT met'}) "
              f"on {chosen['gold_images']:,} gold images")
    print(f"{summary['proposals']:,} proposals on {summary['images']:,} images "
          f"({summary['proposals_per_image']:.2f} per image) from {len(summary['models'])} model(s) "
          f"-> {out / 'proposals.parquet'}")
    return 0
