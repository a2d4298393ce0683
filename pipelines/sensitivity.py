"""The transform-sensitivity audit in Beam: decode once, predict under every transform, test.

    result = run_sensitivity(config_section, source, output_dir, label_sets=real_sets)

Images come from the sharded sources of ``pipelines.images``; each image is decoded once
and cropped once per model resolution (``DecodeImages`` with
``models.transformed_predictor.crops_for``), then ``RunInference`` with
``TransformedHandler`` runs every model under every transform in one jitted call per
batch. Each (model, transform) pair is stored like stage-1 predictions, content-addressed::

    <output_dir>/store/sensitivity/<model>-<sha256(weights)[:12]>[-<dtype>]/<transform key>/<dataset_id>/<split>.npz
                                                                           /<transform key>/transform.json

where the transform key is the sha256 of the transform's ops, parameters and seed
(``transform.json`` records them and the display name). A pair whose file exists is not
computed again, so adding a transform to the config runs only that transform (and adding
a model, only that model). While a run goes, each finished shard is written to
``<split>.shards/`` of each pair, so a crash loses at most the shards in flight.
Every read and write goes through ``apache_beam.io.filesystems.FileSystems`` (a file is
written under a temporary name and renamed), so ``output_dir`` may be a ``gs://`` URI.
"""
from __future__ import annotations

from auditing.errors import InputError
import collections
import dataclasses
import functools
import hashlib
import json
import logging
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from auditing.predictions import Predictions, concatenate_sorted, load_predictions, save_predictions, softmax
from pipelines.beam_options import make_options
from pipelines.images import (UNKNOWN_LABEL, DecodeImages, ImageKey, ImageSource, ReadImageShards, Shard,
                              plan_shards)
from pipelines.predict import _path_safe, model_key

if TYPE_CHECKING:
    from models.registry import ModelSpec
    from models.transforms import Transform

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 250
DEFAULT_ACCIDENTAL = ("vflip", "rotate(180)")
_SECTION_KEYS = {"models", "transforms", "alpha", "class_test", "seed", "batch_size", "dtype", "shard_size",
                 "accidental", "min_gain", "example_classes", "min_models", "min_images_per_class"}


class SensitivityConfigError(InputError):
    """A ``stages.sensitivity`` key with a wrong value; the message names the key."""


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class SensitivityConfig:
    """The ``stages.sensitivity`` section; ``transforms[0]`` is the identity (the baseline)."""

    models: tuple[str, ...]
    transforms: tuple[Transform, ...]
    # Model name -> a user checkpoint (registry weights where absent), as in stages.predict.models.
    checkpoints: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    alpha: float = 0.05
    class_test: str = "independent"
    seed: int = 0
    batch_size: int = 32
    dtype: str = "float32"
    shard_size: int = DEFAULT_SHARD_SIZE
    accidental: tuple[str, ...] = DEFAULT_ACCIDENTAL
    min_gain: float = 0.5
    example_classes: int = 3
    min_models: int = 10
    min_images_per_class: int = 10

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any], where: str = "stages.sensitivity") -> "SensitivityConfig":
        from models.transforms import parse_transforms

        if not isinstance(section, Mapping):
            raise SensitivityConfigError(f"{where}: expected a mapping, got {section!r}")
        unknown = sorted(set(section) - _SECTION_KEYS)
        if unknown:
            raise SensitivityConfigError(f"{where}.{unknown[0]}: unknown key; known: {sorted(_SECTION_KEYS)}")
        for key in ("models", "transforms"):
            if key not in section:
                raise SensitivityConfigError(f"{where}.{key}: required")
        models = section["models"]
        if not isinstance(models, list) or not models:
            raise SensitivityConfigError(f"{where}.models: expected a non-empty list of model names")
        checkpoints = {}
        for index, model in enumerate(models):
            if isinstance(model, Mapping):
                if "name" not in model or not set(model) <= {"name", "checkpoint"}:
                    raise SensitivityConfigError(f"{where}.models[{index}]: expected {{name: .., checkpoint: ..}}, "
                                                 f"got {dict(model)!r}")
                checkpoints[model["name"]] = model.get("checkpoint")
        models = tuple(m["name"] if isinstance(m, Mapping) else m for m in models)
        if not all(isinstance(m, str) for m in models):
            raise SensitivityConfigError(f"{where}.models: expected model names, got {list(models)!r}")
        seed = _int(section, "seed", 0, where, low=0)
        transforms = tuple(parse_transforms(section["transforms"], seed=seed, where=f"{where}.transforms"))
        names = [t.name for t in transforms]
        accidental = section.get("accidental", [n for n in DEFAULT_ACCIDENTAL if n in names])
        if not isinstance(accidental, list) or not all(isinstance(n, str) and n in names for n in accidental):
            raise SensitivityConfigError(f"{where}.accidental: expected names among the transforms {names}, "
                                         f"got {accidental!r}")
        alpha = section.get("alpha", 0.05)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise SensitivityConfigError(f"{where}.alpha: expected a number in (0, 1), got {alpha!r}")
        min_gain = section.get("min_gain", 0.5)
        if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 < min_gain <= 1:
            raise SensitivityConfigError(f"{where}.min_gain: expected a number in (0, 1], got {min_gain!r}")
        class_test = section.get("class_test", "independent")
        if class_test not in ("independent", "paired"):
            raise SensitivityConfigError(f"{where}.class_test: expected 'independent' or 'paired', "
                                         f"got {class_test!r}")
        dtype = section.get("dtype", "float32")
        if dtype not in ("float32", "bfloat16", "auto"):
            raise SensitivityConfigError(f"{where}.dtype: expected float32, bfloat16 or auto, got {dtype!r}")
        return cls(models=models, transforms=transforms, checkpoints=checkpoints, alpha=float(alpha), class_test=class_test, seed=seed,
                   batch_size=_int(section, "batch_size", 32, where), dtype=dtype,
                   shard_size=_int(section, "shard_size", DEFAULT_SHARD_SIZE, where),
                   accidental=tuple(accidental), min_gain=float(min_gain),
                   example_classes=_int(section, "example_classes", 3, where, low=0),
                   min_models=_int(section, "min_models", 10, where),
                   min_images_per_class=_int(section, "min_images_per_class", 10, where))


def _int(section: Mapping[str, Any], key: str, default: int, where: str, low: int = 1) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SensitivityConfigError(f"{where}.{key}: expected an integer >= {low}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- store layout


def transform_key(transform: Transform) -> str:
    """16 hex of the sha256 of the transform's ops, parameters and seed."""
    return hashlib.sha256(transform.content_key().encode()).hexdigest()[:16]


def pair_uri(store_dir: str, spec: ModelSpec, transform: Transform, source: ImageSource, dtype: str) -> str:
    """Where the predictions of ``spec`` under ``transform`` on ``source`` are stored."""
    return FileSystems.join(store_dir, "sensitivity", model_key(spec, dtype), transform_key(transform),
                            _path_safe(source.dataset_id), f"{_path_safe(source.split)}.npz")


def _shards_uri(final: str, shard: Shard) -> str:
    return f"{final[:-len('.npz')]}.shards/{shard.name}.npz"


def write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri`` via a temporary name and a rename (never a half-written file)."""
    temporary = f"{uri}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(temporary, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    FileSystems.rename([temporary], [uri])
    return uri


def read_bytes(uri: str) -> bytes:
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def write_predictions(uri: str, predictions: Predictions) -> str:
    """``auditing.predictions``' NPZ format at any FileSystems URI."""
    with tempfile.TemporaryDirectory() as tmp:
        local = save_predictions(Path(tmp) / "predictions.npz", predictions)
        return write_bytes(uri, local.read_bytes())


def read_predictions(uri: str) -> Predictions:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "predictions.npz"
        local.write_bytes(read_bytes(uri))
        predictions = load_predictions(local)
    return dataclasses.replace(predictions, source=uri)


# ----------------------------------------------------------------------------- Beam steps


# Compiled predictors of this process, so that a second run in the same process reuses them.
_PREDICTORS: dict[tuple[Any, ...], Any] = {}


def shared_transformed_predictor(specs: Sequence[ModelSpec], transforms: Sequence[Transform], batch_size: int,
                                 dtype: str) -> Any:
    from models.transformed_predictor import TransformedPredictor

    key = (tuple(specs), tuple(transforms), batch_size, dtype)
    if key not in _PREDICTORS:
        _PREDICTORS.clear()  # one set of compiled models at a time: they are large
        _PREDICTORS[key] = TransformedPredictor(specs, transforms, batch_size=batch_size, dtype=dtype)
    return _PREDICTORS[key]


class TransformedHandler(ModelHandler[Any, Any, Any]):
    """RunInference handler: ``(image_id, {Resolution: uint8 crop})`` -> logits (M, T, C);
    a None example (a quarantined image) takes no model time and gives None."""

    def __init__(self, specs: Sequence[ModelSpec], transforms: Sequence[Transform], batch_size: int = 32,
                 dtype: str = "float32"):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._specs, self._transforms = tuple(specs), tuple(transforms)
        self._batch_size, self._dtype = batch_size, dtype

    def load_model(self) -> Any:
        return shared_transformed_predictor(self._specs, self._transforms, self._batch_size, self._dtype)

    def run_inference(self, batch: Sequence[Any], model: Any,
                      inference_args: dict[str, Any] | None = None) -> Iterable[np.ndarray | None]:
        decoded = [example for example in batch if example is not None]
        if not decoded:
            return [None] * len(batch)
        ids = np.array([image_id for image_id, _ in decoded], dtype=np.uint32)
        crops = {r: np.stack([c[r] for _, c in decoded]) for r in model.resolutions}
        logits = iter(np.moveaxis(model.predict(crops, ids), 2, 0))  # (n, M, T, C)
        return [None if example is None else next(logits) for example in batch]

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(c.nbytes for example in batch if example is not None for c in example[1].values())

    def get_metrics_namespace(self) -> str:
        return "label_audit.sensitivity"


def _with_image_id(key: ImageKey, crops: dict | None) -> tuple[ImageKey, Any]:
    from models.transforms import image_ids

    return key, None if crops is None else (int(image_ids([key.file_name])[0]), crops)


class PredictTransformed(beam.PTransform):
    """PCollection[ImageRecord] -> PCollection[(ImageKey, logits (M, T, C) float32 | None)].

    Decodes each image once (None + ``quarantine_reason`` when it cannot be), crops it
    once per model resolution, and runs every model under every transform.
    """

    def __init__(self, specs: Sequence[ModelSpec], transforms: Sequence[Transform], batch_size: int = 32,
                 dtype: str = "float32"):
        super().__init__()
        from models.transformed_predictor import crops_for, resolution_of

        self._resolutions = tuple(dict.fromkeys(resolution_of(s) for s in specs))
        self._crops = functools.partial(crops_for, resolutions=self._resolutions)
        self._handler = TransformedHandler(specs, transforms, batch_size, dtype)

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return (records
                | "DecodeOnce" >> DecodeImages(self._crops)
                | "AddImageId" >> beam.MapTuple(_with_image_id)
                | "RunInference" >> RunInference(KeyedModelHandler(self._handler)))


class _WriteShardsFn(beam.DoFn):
    """Writes each shard's predictions, one file per (model, transform) pair to store, as
    soon as all of the shard's images are back (they arrive within the bundle that read
    the shard: see ``pipelines.predict._WriteShardFn``)."""

    def __init__(self, shards: Sequence[Shard], outputs: Mapping[tuple[int, int], str], num_classes: int):
        self._shards = {shard.index: shard for shard in shards}
        self._outputs = dict(outputs)  # (model position, transform position) -> final URI
        self._num_classes = num_classes

    def start_bundle(self) -> None:
        self._pending: dict[int, list[tuple[ImageKey, np.ndarray | None]]] = collections.defaultdict(list)

    def process(self, item: tuple[ImageKey, np.ndarray | None]) -> Iterator[str]:
        key = item[0]
        rows = self._pending[key.shard_index]
        rows.append(item)
        shard = self._shards[key.shard_index]
        if len(rows) == shard.size:
            del self._pending[key.shard_index]
            yield from self._write(shard, rows)

    def _write(self, shard: Shard, rows: list[tuple[ImageKey, np.ndarray | None]]) -> Iterator[str]:
        predicted = [(k, logits) for k, logits in rows if logits is not None]
        quarantined = [k for k, logits in rows if logits is None]
        stacked = (np.stack([logits for _, logits in predicted]) if predicted
                   else np.zeros((0, 1, 1, self._num_classes), np.float32))
        for (m, t), final in self._outputs.items():
            predictions = Predictions(
                file_names=np.array([k.file_name for k, _ in predicted], dtype=str),
                logits=stacked[:, m, t] if predicted else np.zeros((0, self._num_classes), np.float32),
                image_index=np.array([k.source_index for k, _ in predicted], dtype=np.int64),
                labels=np.array([k.label for k, _ in predicted], dtype=np.int64),
                quarantined_file_names=np.array([k.file_name for k in quarantined], dtype=str),
                quarantine_reasons=np.array([k.quarantine_reason for k in quarantined], dtype=str),
                source=shard.name)
            yield write_predictions(_shards_uri(final, shard), predictions)

    def finish_bundle(self) -> None:
        if self._pending:
            counts = {self._shards[i].name: f"{len(r)}/{self._shards[i].size}" for i, r in self._pending.items()}
            raise RuntimeError(f"shards incomplete at the end of a bundle (images back/expected): {counts}")


# ----------------------------------------------------------------------------- predictions


@dataclasses.dataclass(frozen=True)
class TransformedPredictions:
    """Where each (model, transform) pair's predictions are, and which were computed now."""

    uris: dict[tuple[str, str], str]  # (model name, transform name) -> NPZ URI
    computed: list[tuple[str, str]]
    num_images: int


def predict_under_transforms(specs: Sequence[ModelSpec], transforms: Sequence[Transform], source: ImageSource,
                             store_dir: str, *, batch_size: int = 32, dtype: str = "float32",
                             shard_size: int = DEFAULT_SHARD_SIZE, runner: str = "direct", num_workers: int = 1,
                             beam_args: Sequence[str] = ()) -> TransformedPredictions:
    """Predictions of every model under every transform on ``source``; pairs already in the
    store are reused, and only the models and transforms of missing pairs run."""
    num_images = len(source)
    if num_images == 0:
        raise ValueError(f"{source.dataset_id}/{source.split}: no images to audit")
    uris = {(s.name, t.name): pair_uri(store_dir, s, t, source, dtype) for s in specs for t in transforms}
    missing = [pair for pair, uri in uris.items() if not FileSystems.exists(uri)]
    todo_specs = [s for s in specs if any(m == s.name for m, _ in missing)]
    todo_transforms = [t for t in transforms if any(n == t.name for _, n in missing)]
    log.info("sensitivity on %s/%s: %d images, %d of %d (model, transform) pairs to compute", source.dataset_id,
             source.split, num_images, len(missing), len(uris))
    if missing:
        # Pairs of the grid todo_specs x todo_transforms that are stored already are not rewritten.
        outputs = {(m, t): uris[(s.name, tr.name)] for m, s in enumerate(todo_specs)
                   for t, tr in enumerate(todo_transforms) if (s.name, tr.name) in missing}
        for t in todo_transforms:
            for s in todo_specs:
                if (s.name, t.name) in missing:
                    _write_transform_record(uris[(s.name, t.name)], t)
        shards = plan_shards(num_images, shard_size)
        pending = [shard for shard in shards
                   if not all(FileSystems.exists(_shards_uri(uri, shard)) for uri in outputs.values())]
        if pending:
            with beam.Pipeline(options=make_options(runner, num_workers, beam_args)) as pipeline:
                _ = (pipeline
                     | "PlanShards" >> beam.Create(pending)
                     | "ReadImages" >> ReadImageShards(source)
                     | "PredictTransformed" >> PredictTransformed(todo_specs, todo_transforms, batch_size, dtype)
                     | "WriteShards" >> beam.ParDo(_WriteShardsFn(pending, outputs, todo_specs[0].num_classes)))
        for uri in outputs.values():
            parts = [_shards_uri(uri, shard) for shard in shards]
            merged = concatenate_sorted([read_predictions(p) for p in parts], source=uri)
            if merged.num_read != num_images:
                raise RuntimeError(f"{uri}: read {merged.num_read} images, expected {num_images}")
            write_predictions(uri, merged)
            FileSystems.delete(parts)
            folder = f"{uri[:-len('.npz')]}.shards"
            if FileSystems.exists(folder):  # a local folder; object stores have no empty folders
                FileSystems.delete([folder])
    return TransformedPredictions(uris=uris, computed=missing, num_images=num_images)


def _write_transform_record(pair: str, transform: Transform) -> None:
    """``<transform key>/transform.json`` beside the pair's data: the ops, parameters, seed."""
    record = FileSystems.join(FileSystems.split(FileSystems.split(pair)[0])[0], "transform.json")
    if not FileSystems.exists(record):
        write_bytes(record, (json.dumps(transform.describe(), indent=2, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------- summaries


@dataclasses.dataclass(frozen=True)
class PredictionSummary:
    """What the audit needs of every pair, over the images with a known original label."""

    file_names: np.ndarray  # (N,)
    labels: np.ndarray  # (N,)
    source_index: np.ndarray  # (N,) position in the source
    top1: np.ndarray  # (M, T, N)
    label_probability: np.ndarray  # (M, T, N) softmax probability of the original label
    num_unlabelled: int
    num_quarantined: int


def summarise(uris: Mapping[tuple[str, str], str], models: Sequence[str], transforms: Sequence[str]
              ) -> PredictionSummary:
    """Top-1 and probability of the original label per pair, one file in memory at a time."""
    top1 = label_probability = None
    reference: Predictions | None = None
    for m, model in enumerate(models):
        for t, transform in enumerate(transforms):
            predictions = read_predictions(uris[(model, transform)])
            if reference is None:
                reference = predictions
                if predictions.labels is None:
                    raise ValueError(f"{predictions.source}: no original labels")
                keep = predictions.labels != UNKNOWN_LABEL
                top1 = np.zeros((len(models), len(transforms), int(keep.sum())), np.int64)
                label_probability = np.zeros_like(top1, dtype=np.float32)
            elif not np.array_equal(predictions.file_names, reference.file_names):
                raise ValueError(f"{predictions.source}: other images than {reference.source}")
            logits = predictions.logits[keep]
            labels = predictions.labels[keep]
            top1[m, t] = logits.argmax(axis=1)
            label_probability[m, t] = np.take_along_axis(softmax(logits), labels[:, None], axis=1)[:, 0]
    return PredictionSummary(file_names=reference.file_names[keep], labels=reference.labels[keep],
                             source_index=reference.image_index[keep], top1=top1,
                             label_probability=label_probability, num_unlabelled=int((~keep).sum()),
                             num_quarantined=len(reference.quarantined_file_names))


# ----------------------------------------------------------------------------- the stage


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    """What the stage produced: the report files, the per-pair predictions and the counts."""

    report_json: str
    report_html: str
    predictions: dict[tuple[str, str], str]
    counts: dict[str, int]
    class_counts: list[dict[str, Any]]


def run_sensitivity(section: Mapping[str, Any] | SensitivityConfig, source: ImageSource, output_dir: str, *,
                    specs: Mapping[str, ModelSpec] | None = None,
                    label_sets: Mapping[str, Iterable[int]] | None = None, store_dir: str | None = None,
                    runner: str = "direct", num_workers: int = 1, beam_args: Sequence[str] = ()
                    ) -> SensitivityResult:
    """The whole stage: predictions under every transform (stored, reused), the tests, the report.

    ``section``: the ``stages.sensitivity`` mapping (or its parsed config). ``specs``:
    model specs by name where the stage has them already (e.g. those of stages.predict);
    other models come from the registry, with the section's checkpoint where it gives one. ``label_sets``: ReaL sets {file_name: classes} (images not
    listed count as unrated). The report goes to ``<output_dir>/sensitivity/`` and the
    predictions to ``<store_dir or output_dir/store>/sensitivity/``.
    """
    from auditing.metrics import LabelSetArray
    from auditing.sensitivity import SensitivityAudit, accidental_transform_candidates
    from models.registry import get_model
    from models.transformed_predictor import resolution_of
    from pipelines.sensitivity_report import write_sensitivity_report

    config = section if isinstance(section, SensitivityConfig) else SensitivityConfig.from_mapping(section)
    specs = dict(specs or {})
    model_specs = [specs.get(name) or get_model(name, config.checkpoints.get(name)) for name in config.models]
    store_dir = store_dir or FileSystems.join(output_dir, "store")
    predicted = predict_under_transforms(model_specs, config.transforms, source, store_dir,
                                         batch_size=config.batch_size, dtype=config.dtype,
                                         shard_size=config.shard_size, runner=runner, num_workers=num_workers,
                                         beam_args=beam_args)
    names = [t.name for t in config.transforms]
    summary = summarise(predicted.uris, config.models, names)
    accounted = len(summary.file_names) + summary.num_unlabelled + summary.num_quarantined
    if accounted != predicted.num_images:
        raise RuntimeError(f"{source.dataset_id}/{source.split}: {predicted.num_images} images read but "
                           f"{accounted} accounted for (audited + unlabelled + quarantined)")
    if not len(summary.file_names):
        raise ValueError(f"{source.dataset_id}/{source.split}: no image has an original label to audit against")
    num_classes = model_specs[0].num_classes
    sets = None
    if label_sets is not None:
        sets = LabelSetArray.from_sets([label_sets.get(name, ()) for name in summary.file_names], num_classes)
    audit = SensitivityAudit(alpha=config.alpha, class_test=config.class_test, min_models=config.min_models,
                             min_images_per_class=config.min_images_per_class).fit(
        summary.top1, summary.labels, config.models, names, label_sets=sets, num_classes=num_classes)
    candidates = accidental_transform_candidates(summary.label_probability, summary.file_names, summary.labels,
                                                 names, config.accidental, min_gain=config.min_gain)
    counts = {"images_read": predicted.num_images, "images_audited": len(summary.file_names),
              "images_unlabelled": summary.num_unlabelled, "images_quarantined": summary.num_quarantined,
              "pairs": len(predicted.uris), "pairs_computed": len(predicted.computed),
              "pairs_reused": len(predicted.uris) - len(predicted.computed),
              "accidental_candidates": len(candidates)}
    report_json, report_html = write_sensitivity_report(
        FileSystems.join(output_dir, "sensitivity"), audit, candidates, config, source, summary,
        counts=counts, predictions=predicted.uris, real_labels=sets is not None,
        resolution=resolution_of(model_specs[0]))
    return SensitivityResult(report_json=report_json, report_html=report_html, predictions=predicted.uris,
                             counts=counts, class_counts=audit.class_counts_.to_dict("records"))
