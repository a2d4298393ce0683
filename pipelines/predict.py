"""Stage 1: predict an image set with each model, once per (model checkpoint, data set, split).

    label-audit predict --model efficientnet-lite0 --images photos/ cat.jpg --out pred.npz

writes a predictions NPZ (format: ``auditing.predictions``: logits, and the penultimate
features as float16) and prints each image's top-k classes. ``run_predictions`` is the
same code behind ``label-audit run``; it keeps one file per model checkpoint and image
set in a store::

    <store>/predictions/<model>-<sha256(weights)[:12]>[-<dtype>]/<dataset_id>/<split>.npz

and a model whose file exists is not run again. While a model runs, each finished
shard is written at once to ``<split>.shards/<run>/shard-00003-of-00010.npz``, so a
re-run after a crash predicts only the missing shards; the shards are then merged
(sorted by file name) into the final file and removed.

Every file (shards, the merged file) is written and read through Beam's
``FileSystems``, so the store may be a local folder or an object-store URI
(``gs://...``): a worker writes its shards where the launcher reads them back, never
to its own disk. Each write goes to a temporary name first and is renamed into place
(atomic on a local disk; on an object store the final object appears only whole), so
a visible shard is always complete.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import posixpath
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from auditing.predictions import (Predictions, concatenate_sorted, predictions_npz_bytes,
                                  read_predictions_npz)
from pipelines.beam_options import make_options
from pipelines.images import ImageFiles, ImageSource, ReadImageShards, Shard, plan_shards
from pipelines.inference import ImagePrediction, PredictImages, PredictorFactory, jit_predictor

if TYPE_CHECKING:
    from models.registry import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1000


class ShardIncompleteError(RuntimeError):
    """A shard's images did not all come back (predicted or quarantined) in one bundle."""


# ----------------------------------------------------------------------------- files


def write_file(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` (local or URI) through FileSystems: a temporary name in
    the same folder, then a rename, so nobody sees a partial file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    # UNCOMPRESSED: AUTO would pick a codec from the temporary name's suffix.
    with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    if FileSystems.exists(path):  # a rename onto an existing object is refused on some stores
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])
    return path


def read_predictions(path: str) -> Predictions:
    """A predictions NPZ read through FileSystems (local path or URI)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return read_predictions_npz(f, path)


def delete_tree(folder: str) -> None:
    """Delete a folder (local) or every object under a prefix (URI)."""
    # An object store deletes a prefix given with a trailing "/"; the local filesystem
    # would then delete only the folder's contents, so it gets the folder itself.
    FileSystems.delete([folder.rstrip("/") + "/" if "://" in folder else folder])


def _count_files(pattern: str) -> int:
    return len(FileSystems.match([pattern])[0].metadata_list)


# ----------------------------------------------------------------------------- store layout


def _path_safe(text: str) -> str:
    """A file-name-safe form of ``text``, one-to-one (``validation[:1000]`` and
    ``validation[1000:]`` must not share a store path)."""
    return urllib.parse.quote(text, safe="._-")


def model_key(spec: ModelSpec, dtype: str = "float32") -> str:
    """``<name>-<sha256 of the weights>[:12]``, plus the dtype when it is not float32."""
    if dtype == "auto":  # what it means on this machine: bfloat16 results are other results
        from models.predictor import default_dtype

        dtype = default_dtype()
    key = f"{spec.name}-{spec.checkpoint_sha256()[:12]}"
    return key if dtype == "float32" else f"{key}-{dtype}"


def predictions_path(store_dir: str | Path, spec: ModelSpec, source: ImageSource,
                     dtype: str = "float32") -> str:
    """The store file of ``spec`` on ``source`` (a local path or a URI, as ``store_dir``)."""
    return FileSystems.join(str(store_dir), "predictions", model_key(spec, dtype),
                            _path_safe(source.dataset_id), f"{_path_safe(source.split)}.npz")


def shards_dir_for(out_path: str | Path, spec: ModelSpec, source: ImageSource, dtype: str) -> str:
    """Where the shards of ``out_path`` are kept until the merge: named by what they hold,
    so that a re-run with other images or another model never reuses them."""
    folder, name = FileSystems.split(str(out_path))
    run = _path_safe(f"{model_key(spec, dtype)}_{source.dataset_id}_{source.split}")
    return FileSystems.join(folder, posixpath.splitext(name)[0] + ".shards", run)


def _shard_path(shards_dir: str, shard: Shard) -> str:
    return FileSystems.join(shards_dir, f"{shard.name}.npz")


# ----------------------------------------------------------------------------- pipeline


class _WriteShardFn(beam.DoFn):
    """Collects each shard's results and writes the shard file (through FileSystems) as
    soon as it is complete; yields its path.

    A shard is read by one ``process`` call upstream and nothing in between regroups
    elements (BatchElements flushes at the end of the bundle; quarantined images come
    in the same PCollection), so all of a shard's images reach this DoFn within the
    bundle that read it. A GroupByKey (or a Flatten on local runners) would instead
    hold every shard back until the whole data set was predicted.
    """

    def __init__(self, shards_dir: str, shards: Sequence[Shard], num_classes: int,
                 num_features: int | None):
        self._shards_dir = shards_dir
        self._shards = {shard.index: shard for shard in shards}
        self._num_classes = num_classes
        self._num_features = num_features

    def start_bundle(self) -> None:
        self._pending: dict[int, list[ImagePrediction]] = collections.defaultdict(list)

    def process(self, item: ImagePrediction) -> Iterator[str]:
        rows = self._pending[item.shard_index]
        rows.append(item)
        shard = self._shards[item.shard_index]
        if len(rows) == shard.size:
            del self._pending[item.shard_index]
            predictions = shard_predictions(rows, self._num_classes, self._num_features, shard.name)
            yield write_file(_shard_path(self._shards_dir, shard), predictions_npz_bytes(predictions))

    def finish_bundle(self) -> None:
        if self._pending:
            counts = {self._shards[i].name: f"{len(rows)}/{self._shards[i].size}"
                      for i, rows in self._pending.items()}
            raise ShardIncompleteError(f"shards incomplete at the end of a bundle (images back/expected): "
                                       f"{counts}")


@contextlib.contextmanager
def _shard_progress(shards_dir: str | Path, name: str, todo: int, every_s: float = 10.0) -> Iterator[None]:
    """Logs finished shards and an ETA every ``every_s`` seconds while a pipeline runs
    (shard files are the progress: they appear as workers finish them)."""
    pattern = FileSystems.join(str(shards_dir), "*.npz")
    done_before = _count_files(pattern)
    stop = threading.Event()
    started = time.monotonic()

    def report() -> None:
        while not stop.wait(every_s):
            done = _count_files(pattern) - done_before
            elapsed = time.monotonic() - started
            eta = f", ETA {elapsed / done * (todo - done):.0f} s" if 0 < done < todo else ""
            log.info("%s: %d/%d shards predicted in %.0f s%s", name, done, todo, elapsed, eta)

    thread = threading.Thread(target=report, name="shard-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        done = _count_files(pattern) - done_before
        log.info("%s: %d/%d shards predicted in %.0f s", name, done, todo, time.monotonic() - started)


def shard_predictions(rows: list[ImagePrediction], num_classes: int, num_features: int | None,
                      name: str) -> Predictions:
    """One shard's rows as ``Predictions``; features are kept when every predicted row
    has them (``num_features`` sizes them for a shard whose every image was quarantined)."""
    predicted = [r for r in rows if r.scores is not None]
    quarantined = [r for r in rows if r.scores is None]
    logits = (np.stack([r.scores.logits for r in predicted]) if predicted
              else np.zeros((0, num_classes), np.float32))
    features = None
    if predicted and all(r.scores.features is not None for r in predicted):
        features = np.stack([r.scores.features for r in predicted])
    elif not predicted and num_features is not None:
        features = np.zeros((0, num_features), np.float32)
    return Predictions(
        file_names=np.array([r.file_name for r in predicted], dtype=str),
        logits=logits,
        features=features,
        # In a shard file image_index is the position in the source; the merge re-ranks.
        image_index=np.array([r.source_index for r in predicted], dtype=np.int64),
        labels=np.array([r.label for r in predicted], dtype=np.int64),
        quarantined_file_names=np.array([q.file_name for q in quarantined], dtype=str),
        quarantine_reasons=np.array([q.quarantine_reason for q in quarantined], dtype=str),
        source=name)


def predict_source(spec: ModelSpec, source: ImageSource, out_path: str | Path, *, batch_size: int = 32,
                   dtype: str = "float32", shard_size: int = DEFAULT_SHARD_SIZE,
                   runner: str = "direct", num_workers: int = 1, beam_args: Sequence[str] = (),
                   predictor_factory: PredictorFactory = jit_predictor) -> Predictions:
    """Predict every image of ``source`` with ``spec`` and write ``out_path`` (NPZ; a local
    path or a URI). Shards already in ``<out>.shards/`` (from an interrupted run) are reused.
    """
    out_path = str(out_path)
    num_images = len(source)
    if num_images == 0:
        raise ValueError(f"{source.dataset_id}/{source.split}: no images to predict")
    shards = plan_shards(num_images, shard_size)
    shards_dir = shards_dir_for(out_path, spec, source, dtype)
    pending = [s for s in shards if not FileSystems.exists(_shard_path(shards_dir, s))]
    log.info("%s on %s/%s: %d images, %d of %d shards to predict", spec.name, source.dataset_id,
             source.split, num_images, len(pending), len(shards))
    if pending:
        options = make_options(runner, num_workers, beam_args)
        with _shard_progress(shards_dir, spec.name, len(pending)), beam.Pipeline(options=options) as pipeline:
            _ = (pipeline
                 | "PlanShards" >> beam.Create(pending)
                 | "ReadImages" >> ReadImageShards(source)
                 | "PredictImages" >> PredictImages(spec, batch_size, dtype, predictor_factory)
                 | "WriteShards" >> beam.ParDo(_WriteShardFn(shards_dir, pending, spec.num_classes,
                                                             spec.num_features)))
    merged = concatenate_sorted([read_predictions(_shard_path(shards_dir, s)) for s in shards],
                                source=out_path)
    if merged.num_read != num_images:
        raise RuntimeError(f"{out_path}: read {merged.num_read} images, expected {num_images}")
    write_file(out_path, predictions_npz_bytes(merged))
    # The whole .shards folder, with the shards of any other, abandoned, run.
    delete_tree(FileSystems.split(shards_dir)[0])
    if len(merged.quarantined_file_names):
        log.warning("%s: %d of %d images quarantined (undecodable), e.g. %s: %s", out_path,
                    len(merged.quarantined_file_names), num_images,
                    merged.quarantined_file_names[0], merged.quarantine_reasons[0])
    return merged


def run_predictions(models: Sequence[str | ModelSpec], source: ImageSource, store_dir: str | Path, *,
                    batch_size: int = 32, dtype: str = "float32",
                    shard_size: int = DEFAULT_SHARD_SIZE, runner: str = "direct",
                    num_workers: int = 1, beam_args: Sequence[str] = (),
                    predictor_factory: PredictorFactory = jit_predictor) -> dict[str, str]:
    """Predictions of each model (registry name or ModelSpec) on ``source``: {name: NPZ path
    or URI under ``store_dir``}. A model whose NPZ is already in the store is not run again.
    """
    paths = {}
    for model in models:
        spec = _resolve_model(model)
        path = predictions_path(store_dir, spec, source, dtype)
        if FileSystems.exists(path):
            log.info("%s: reusing %s", spec.name, path)
        else:
            predict_source(spec, source, path, batch_size=batch_size, dtype=dtype,
                           shard_size=shard_size, runner=runner, num_workers=num_workers,
                           beam_args=beam_args, predictor_factory=predictor_factory)
        paths[spec.name] = path
    return paths


def _resolve_model(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, str):
        from models.registry import get_model

        return get_model(model)
    return model


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model registry name, e.g. efficientnet-lite0")
    parser.add_argument("--images", required=True, nargs="+", metavar="PATH",
                        help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", required=True, type=Path, help="predictions NPZ to write")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=5, help="classes printed per image")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--runner", default="direct", help="direct, direct-multiprocess or dataflow")
    parser.add_argument("--num-workers", type=int, default=1)


def main(args: argparse.Namespace) -> int:
    spec = _resolve_model(args.model)
    source = ImageFiles.from_paths(args.images)
    predictions = predict_source(spec, source, args.out, batch_size=args.batch_size,
                                 dtype=args.dtype, runner=args.runner,
                                 num_workers=args.num_workers)
    print(format_top_k(predictions, args.top_k, class_names(predictions.num_classes)))
    print(f"wrote {args.out}: {predictions.num_read} images read = {predictions.num_images} "
          f"predicted + {len(predictions.quarantined_file_names)} quarantined")
    return 0


def class_names(num_classes: int | None) -> list[str] | None:
    """'name (wnid)' per ImageNet class, or None when the model is not a 1000-class one."""
    from auditing import imagenet, sources

    if num_classes != imagenet.NUM_CLASSES:
        return None
    try:
        classes = imagenet.load_classes()
    except sources.SourceError:  # no lemma table offline: wnids still name the classes
        return list(imagenet.imagenet_wnids())
    return [f"{name} ({wnid})" for name, wnid in zip(classes.names, classes.wnids)]


def format_top_k(predictions: Predictions, k: int, names: list[str] | None = None) -> str:
    lines = []
    best = predictions.top_k_labels(k)
    probs = np.take_along_axis(predictions.probabilities(), best, axis=1)
    for file_name, labels, p in zip(predictions.file_names, best, probs):
        lines.append(file_name)
        for rank, (label, prob) in enumerate(zip(labels, p), start=1):
            lines.append(f"  {rank}. {prob:6.1%}  {names[label] if names else label}")
    for file_name, reason in zip(predictions.quarantined_file_names, predictions.quarantine_reasons):
        lines.append(f"{file_name}\n  quarantined: {reason}")
    return "\n".join(lines)
