"""Stage 1 in Beam: decoded images through a Flax classifier with RunInference.

``PredictImages(spec)`` is the composite step: ImageRecord -> decode + the model's
preprocess on the workers (``pipelines.images.DecodeImages``) -> ``RunInference`` with
``FlaxClassifierHandler`` -> one ``ImagePrediction`` per image read: full logits and the
penultimate features of the same forward pass, or, for an image that could not be
decoded, ``scores=None`` and its ``quarantine_reason``. Top-k classes and probabilities
are derived from the stored logits by whoever reads them (``auditing.predictions``),
so softmax is computed by no step here. Quarantined images ride
through RunInference as ``None`` (skipped by the handler) rather than in a second
PCollection, so downstream steps see every image of a shard in one stream.

Why RunInference (not a DoFn with ``setup()``): it gives batching (``BatchElements``
with min = max = the predictor's fixed batch, so XLA compiles one shape; the last
partial batch is padded by the predictor), loads the model once per worker process
(``shared.Shared``) and reports load/inference metrics, which is all we need.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from pipelines.images import DecodeImages, ImageKey

if TYPE_CHECKING:
    from models.registry import ModelSpec

# (spec, batch_size, dtype) -> a predictor like models.predictor.JitPredictor, whose
# predict(images (n, H, W, 3) float32) gives a models.predictor.PredictorOutput:
# .logits (n, C) and .features (n, D) or None.
PredictorFactory = Callable[["ModelSpec", int, str], Any]


class ClassScores(NamedTuple):
    """One image's model output: full logits and, where the model gives them, its
    penultimate features."""

    logits: np.ndarray  # (C,) float32
    features: np.ndarray | None = None  # (D,) float32


class ImagePrediction(NamedTuple):
    """The per-image output of ``PredictImages``; ``scores`` is None for a quarantined image."""

    file_name: str
    source_index: int
    label: int
    shard_index: int
    scores: ClassScores | None
    quarantine_reason: str | None = None


def jit_predictor(spec: ModelSpec, batch_size: int, dtype: str) -> Any:
    from models.predictor import JitPredictor

    return JitPredictor(spec, batch_size=batch_size, dtype=dtype)


# Compiled predictors of this process, so that a second pipeline in the same process
# (the CLI after ``run``, the benchmark, tests) neither reloads weights nor recompiles.
_PREDICTORS: dict[tuple[Any, ModelSpec, int, str], Any] = {}
_PREDICTORS_LOCK = threading.RLock()  # a factory may itself call shared_predictor
_MAX_CACHED_PREDICTORS = 4


def shared_predictor(spec: ModelSpec, batch_size: int, dtype: str,
                     factory: PredictorFactory = jit_predictor) -> Any:
    # Keyed by the factory itself (two factories may share a name) and the whole spec
    # (two resnet50 specs may load different checkpoints).
    key = (factory, spec, batch_size, dtype)  # spec includes its checkpoint
    with _PREDICTORS_LOCK:
        if key not in _PREDICTORS:
            if len(_PREDICTORS) >= _MAX_CACHED_PREDICTORS:
                _PREDICTORS.pop(next(iter(_PREDICTORS)))
            _PREDICTORS[key] = factory(spec, batch_size, dtype)
        return _PREDICTORS[key]


class FlaxClassifierHandler(ModelHandler[np.ndarray | None, ClassScores | None, Any]):
    """RunInference handler: preprocessed (H, W, 3) float32 images -> ``ClassScores``.

    A None example (a quarantined image) takes no model time and gives None.
    """

    def __init__(self, spec: ModelSpec, batch_size: int = 32, dtype: str = "float32",
                 predictor_factory: PredictorFactory = jit_predictor):
        # min = max = batch: every batch but a bundle's last has the compiled shape.
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._spec = spec
        self._batch_size = batch_size
        self._dtype = dtype
        self._predictor_factory = predictor_factory

    def load_model(self) -> Any:
        return shared_predictor(self._spec, self._batch_size, self._dtype, self._predictor_factory)

    def run_inference(self, batch: Sequence[np.ndarray | None], model: Any,
                      inference_args: dict[str, Any] | None = None) -> Iterable[ClassScores | None]:
        images = [image for image in batch if image is not None]
        scores = iter(self._score(images, model) if images else [])
        return [None if image is None else next(scores) for image in batch]

    def _score(self, images: list[np.ndarray], model: Any) -> list[ClassScores]:
        output = model.predict(np.stack(images))
        logits = np.asarray(output.logits, dtype=np.float32)
        features = None if output.features is None else np.asarray(output.features, dtype=np.float32)
        return [ClassScores(logits[i], None if features is None else features[i])
                for i in range(len(images))]

    def get_num_bytes(self, batch: Sequence[np.ndarray | None]) -> int:
        # The default pickles the whole batch just to measure it (~20 MB at 224 px).
        return sum(image.nbytes for image in batch if image is not None)

    def get_metrics_namespace(self) -> str:
        return f"label_audit.inference.{self._spec.name}"

    # share_model_across_processes stays False: on CPU one process already uses every
    # core through XLA's thread pool, and a model served from another process would
    # pickle each 20 MB batch across; only a model too big for one copy per process
    # would be worth it.


def _to_image_prediction(key: ImageKey, scores: ClassScores | None) -> ImagePrediction:
    return ImagePrediction(key.file_name, key.source_index, key.label, key.shard_index, scores,
                           key.quarantine_reason)


class PredictImages(beam.PTransform):
    """PCollection[ImageRecord] -> PCollection[ImagePrediction], one per image read.

    ``spec`` is a ``models.registry.ModelSpec`` (its ``preprocess`` runs on the workers).
    """

    def __init__(self, spec: ModelSpec, batch_size: int = 32, dtype: str = "float32",
                 predictor_factory: PredictorFactory = jit_predictor):
        super().__init__()
        self._spec = spec
        self._handler = FlaxClassifierHandler(spec, batch_size, dtype, predictor_factory)

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return (records
                | "DecodeImages" >> DecodeImages(self._spec.preprocess)
                | "RunInference" >> RunInference(KeyedModelHandler(self._handler))
                | "ToImagePrediction" >> beam.MapTuple(_to_image_prediction))
