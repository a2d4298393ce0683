"""RunInference wiring: PredictImages with the real EfficientNet-Lite0 on real photos."""
from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from models.predictor import JitPredictor
from pipelines.beam_options import make_options
from pipelines.images import ReadImageShards, plan_shards
from pipelines.inference import FlaxClassifierHandler, PredictImages, shared_predictor

BATCH = 4
ESPRESSO, TABBY, TIGER_CAT, EGYPTIAN_CAT = 967, 281, 282, 285


def test_handler_batches_at_the_predictor_batch_size(spec):
    handler = FlaxClassifierHandler(spec, batch_size=BATCH)
    assert handler.batch_elements_kwargs() == {"min_batch_size": BATCH, "max_batch_size": BATCH}
    assert not handler.share_model_across_processes()
    images = [np.zeros((224, 224, 3), np.float32)] * 3
    assert handler.get_num_bytes(images) == 3 * 224 * 224 * 3 * 4


def test_predict_images_matches_a_bare_predictor(spec, photo_source):
    source, bad = photo_source
    with BeamTestPipeline(options=make_options()) as pipeline:
        outputs = (pipeline | beam.Create(plan_shards(len(source), 4)) | ReadImageShards(source)
                   | PredictImages(spec, batch_size=BATCH))
        assert_that(outputs | beam.Filter(lambda r: r.scores is None)
                    | beam.Map(lambda r: (r.file_name, bool(r.quarantine_reason))),
                    equal_to([(n, True) for n in bad]), label="CheckQuarantined")
        assert_that(outputs | beam.Filter(lambda r: r.scores is not None) | beam.combiners.ToList(),
                    lambda lists: _check_predictions(lists[0], spec, source, bad),
                    label="CheckPredictions")


def _check_predictions(rows, spec, source, bad):
    rows = sorted(rows, key=lambda r: r.file_name)
    assert all(r.quarantine_reason is None for r in rows)
    assert [r.file_name for r in rows] == [n for n in source.file_names if n not in bad]
    # The same model outside Beam, on the same decoded images.
    images = np.stack([spec.preprocess(Image.open(source.paths[r.source_index])) for r in rows])
    logits, features = shared_predictor(spec, BATCH, "float32").predict(images)
    np.testing.assert_allclose(np.stack([r.scores.logits for r in rows]), logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.stack([r.scores.features for r in rows]), features, rtol=1e-4, atol=1e-4)
    for r in rows:
        assert r.source_index == source.file_names.index(r.file_name)
    top1 = {r.file_name: int(np.argmax(r.scores.logits)) for r in rows}
    # Real photos, real weights: the cat is a cat even in the Beam path, and the CMYK coffee is espresso.
    assert top1["chelsea.jpg"] in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert top1["coffee_cmyk.jpg"] == ESPRESSO


class RecordingPredictor:
    """The real predictor, remembering the batch sizes RunInference gives it."""

    def __init__(self, inner: JitPredictor):
        self.inner = inner
        self.batch_sizes: list[int] = []

    def predict(self, images: np.ndarray):
        self.batch_sizes.append(len(images))
        return self.inner.predict(images)


def recording_predictor(spec, batch_size: int, dtype: str) -> RecordingPredictor:
    return RecordingPredictor(shared_predictor(spec, batch_size, dtype))


def test_the_model_gets_full_batches_and_compiles_once(spec, photo_source):
    source, bad = photo_source
    # Shards of 2 images: batches must span shards, not stop at each shard's end.
    with BeamTestPipeline(options=make_options()) as pipeline:
        _ = (pipeline | beam.Create(plan_shards(len(source), 2)) | ReadImageShards(source)
             | PredictImages(spec, batch_size=BATCH, predictor_factory=recording_predictor))
    # The handler's load_model went through the process cache: the same object is returned here.
    recorder = shared_predictor(spec, BATCH, "float32", recording_predictor)
    assert sum(recorder.batch_sizes) == len(source) - len(bad)
    # RunInference batches of BATCH elements (a quarantined image holds a slot but is not
    # sent to the model): at most ceil(9 / 4) = 3 model calls, against 5 if batches
    # stopped at each shard's end.
    assert len(recorder.batch_sizes) <= -(-len(source) // BATCH)
    assert all(size <= BATCH for size in recorder.batch_sizes)
    assert recorder.inner.trace_count == 1
