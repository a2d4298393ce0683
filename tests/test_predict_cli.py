"""The predictions NPZ format, the prediction store (reuse, crash resume) and ``label-audit predict``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditing.predictions import (Predictions, PredictionsFormatError, concatenate_sorted,
                                  load_predictions, save_predictions)
from models.predictor import PredictorOutput
from pipelines import predict
from pipelines.images import TfdsImages
# tfds_dir is a fixture: imported so that pytest finds it here too.
from tests.test_images import tfds_dir, tfds_photos, tiny_photos_label  # noqa: F401

# ----------------------------------------------------------------------------- NPZ format


def test_save_load_round_trip(tmp_path):
    logits = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)
    original = Predictions(file_names=np.array(["b.jpg", "a.jpg", "c.jpg"]), logits=logits,
                           image_index=np.array([1, 0, 2]), labels=np.array([4, -1, 9]),
                           quarantined_file_names=np.array(["d.jpg"]),
                           quarantine_reasons=np.array(["not an image format PIL recognises"]))
    loaded = load_predictions(save_predictions(tmp_path / "p.npz", original))
    for key in ("file_names", "logits", "image_index", "labels", "quarantined_file_names",
                "quarantine_reasons"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(original, key))
    assert loaded.top1 is None and loaded.features is None and loaded.num_read == 4
    np.testing.assert_allclose(loaded.probabilities().sum(axis=1), 1, rtol=1e-6)
    assert loaded.top1_labels().tolist() == np.argmax(logits, axis=1).tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]  # no temp file left behind


def test_features_are_stored_as_float16(tmp_path):
    features = np.random.default_rng(1).uniform(0, 6, size=(2, 1280)).astype(np.float32)
    original = Predictions(file_names=np.array(["a.jpg", "b.jpg"]), logits=np.zeros((2, 4), np.float32),
                           features=features)
    loaded = load_predictions(save_predictions(tmp_path / "p.npz", original))
    assert loaded.features.dtype == np.float16
    np.testing.assert_allclose(loaded.features, features, rtol=1e-3, atol=1e-3)
    with pytest.raises(PredictionsFormatError, match=r"'features' must be a float array of shape \(2, D\)"):
        Predictions(file_names=original.file_names, logits=original.logits, features=features[:1])
    with pytest.raises(PredictionsFormatError, match=r"'features' row 1 \(b.jpg\) has a NaN"):
        Predictions(file_names=original.file_names, logits=original.logits,
                    features=np.array([[0.0], [np.inf]]))


# ImageNet-X (SOURCES.md): top-1 accuracy against the original labels, computed from the CSVs.
IMAGENETX_ORIGINAL_ACCURACY = {"ResNet50": 0.7613, "ViT": 0.7801, "DINO": 0.7675, "SimCLR": 0.6814}


@pytest.mark.parametrize("model", sorted(IMAGENETX_ORIGINAL_ACCURACY))
def test_published_top1_csv_is_read_directly(shared_data, model):
    from auditing import labelsets

    loaded = load_predictions(shared_data / "imagenetx_predictions" / f"{model}.csv")
    assert loaded.num_images == 50_000 and loaded.logits is None and loaded.top1.dtype == np.int64
    original = labelsets.read_label_tsv(shared_data / "derived" / "imagenet_val_labels_by_filename.tsv")
    labels = original.set_index("file_name")["label"].loc[loaded.file_names].to_numpy()
    assert round(float(np.mean(loaded.top1_labels() == labels)), 4) == IMAGENETX_ORIGINAL_ACCURACY[model]


@pytest.mark.parametrize("rows, message", [
    ("file_name,predicted_class\na.jpg,1\n", "header must be file_name,predicted_class,predicted_probability"),
    ("file_name,predicted_class,predicted_probability\na.jpg,1,0.5\nb.jpg,x,0.5\n",
     "line 3, field 'predicted_class': 'x' is not a class index"),
    ("file_name,predicted_class,predicted_probability\na.jpg,1000,0.5\n", "line 2, field 'predicted_class'"),
    ("file_name,predicted_class,predicted_probability\na.jpg,2.5,0.5\n", "line 2, field 'predicted_class'"),
    ("file_name,predicted_class,predicted_probability\na.jpg,1,1.5\n",
     "line 2, field 'predicted_probability': '1.5' is not a probability"),
    ("file_name,predicted_class,predicted_probability\na.jpg,1,\n", "line 2, field 'predicted_probability'"),
    ("file_name,predicted_class,predicted_probability\n,1,0.5\n", "line 2, field 'file_name': '' is empty"),
    ("file_name,predicted_class,predicted_probability\na.jpg,1,0.5\nb.jpg,2,0.5\na.jpg,3,0.1\n",
     r"line 4, field 'file_name': 'a.jpg' appears again \(first on line 2\)"),
])
def test_bad_csv_rows_are_refused_naming_file_and_line(tmp_path, rows, message):
    path = tmp_path / "bad.csv"
    path.write_text(rows)
    with pytest.raises(PredictionsFormatError, match=message) as error:
        load_predictions(path)
    assert str(path) in str(error.value)


def test_top1_only_predictions(tmp_path):
    np.savez(tmp_path / "top1.npz", file_names=np.array(["a.jpg", "b.jpg"]), top1=np.array([3, 7]))
    loaded = load_predictions(tmp_path / "top1.npz")
    assert loaded.top1_labels().tolist() == [3, 7] and loaded.num_classes is None
    with pytest.raises(PredictionsFormatError, match="top-1 predictions only"):
        loaded.probabilities()


@pytest.mark.parametrize("arrays, message", [
    ({"logits": np.zeros((2, 3))}, "missing key 'file_names'"),
    ({"file_names": np.array(["a", "b"])}, "exactly one of 'logits'"),
    ({"file_names": np.array(["a", "b"]), "logits": np.zeros((3, 4))}, r"shape \(2, C\)"),
    ({"file_names": np.array(["a", "b"]), "logits": np.array([[0.0, 1.0], [np.nan, 0.0]])},
     r"row 1 \(b\) has a NaN"),
    ({"file_names": np.array(["a", "b", "a"]), "logits": np.zeros((3, 2))},
     r"duplicates, e.g. 'a' at rows \[0, 2\]"),
    ({"file_names": np.array(["a"]), "logits": np.zeros((1, 2)), "top1": np.array([0])}, "got both"),
    ({"file_names": np.array(["a"]), "top1": np.array([0.5])}, "'top1' must be an integer"),
    ({"file_names": np.array(["a"]), "logits": np.zeros((1, 2)), "scores": np.zeros(1)},
     r"unknown key\(s\) \['scores'\]"),
    ({"file_names": np.array(["a", None], dtype=object), "logits": np.zeros((2, 2))}, "unreadable"),
])
def test_bad_files_are_refused_with_a_reason(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(PredictionsFormatError, match=message) as error:
        load_predictions(path)
    assert str(path) in str(error.value)


def test_external_top1_predictions_from_real_data(tmp_path, shared_data):
    """The cross-validated model of Northcutt et al., written in the external format."""
    errors = shared_data / "label_errors"
    paths = json.loads((errors / "imagenet_val_set_index_to_filepath.json").read_text())
    top1 = np.load(errors / "imagenet_val_set_pyx_argmax_predicted_labels.npy").astype(np.int64)
    original = np.load(errors / "imagenet_val_set_original_labels.npy").astype(np.int64)
    np.savez(tmp_path / "cv.npz", file_names=np.array([p.rsplit("/", 1)[1] for p in paths]), top1=top1)
    loaded = load_predictions(tmp_path / "cv.npz")
    assert loaded.num_images == 50_000
    # SOURCES.md: top-1 accuracy 0.7273 against the original labels.
    assert round(float(np.mean(loaded.top1_labels() == original)), 4) == 0.7273


def test_concatenate_sorted_ranks_every_read_image():
    part_a = Predictions(file_names=np.array(["c.jpg", "a.jpg"]), logits=np.eye(2, 3, dtype=np.float32),
                         quarantined_file_names=np.array(["b.jpg"]), quarantine_reasons=np.array(["x"]))
    part_b = Predictions(file_names=np.array(["d.jpg"]), logits=np.ones((1, 3), np.float32))
    merged = concatenate_sorted([part_b, part_a])
    assert merged.file_names.tolist() == ["a.jpg", "c.jpg", "d.jpg"]
    assert merged.image_index.tolist() == [0, 2, 3]  # b.jpg (quarantined) keeps rank 1
    np.testing.assert_array_equal(merged.logits, [[0, 1, 0], [1, 0, 0], [1, 1, 1]])
    with pytest.raises(PredictionsFormatError, match="duplicates"):
        concatenate_sorted([part_a, part_a])


# ----------------------------------------------------------------------------- store


class StandInPredictor:
    """A fast stand-in for JitPredictor (same API): logits = mean colour @ fixed weights.

    Class attributes log the batch sizes and simulate a crash, because the instance
    used by the pipeline is built inside Beam.
    """

    batch_sizes: list[int] = []
    fail_from_call: int | None = None

    def __init__(self, spec, batch_size: int, dtype: str):
        self.weights = np.random.default_rng(0).normal(size=(3, spec.num_classes)).astype(np.float32)

    def predict(self, images: np.ndarray) -> PredictorOutput:
        if self.fail_from_call is not None and len(self.batch_sizes) >= self.fail_from_call:
            raise RuntimeError("simulated crash")
        StandInPredictor.batch_sizes.append(len(images))
        features = images.mean(axis=(1, 2))  # (n, 3): the mean colour
        return PredictorOutput(features @ self.weights, features)


@pytest.fixture
def stand_in():
    StandInPredictor.batch_sizes = []
    StandInPredictor.fail_from_call = None
    yield StandInPredictor
    StandInPredictor.fail_from_call = None


def _expected_features(spec, source, file_names):
    paths = dict(zip(source.file_names, source.paths))
    return np.stack([spec.preprocess(Image.open(paths[n])).mean(axis=(0, 1)) for n in file_names])


def _expected_logits(spec, source, file_names):
    return _expected_features(spec, source, file_names) @ StandInPredictor(spec, 1, "float32").weights


def test_run_predictions_writes_the_store_and_reuses_it(tmp_path, spec, photo_source, stand_in):
    source, bad = photo_source
    paths = predict.run_predictions([spec], source, tmp_path, batch_size=2, shard_size=4,
                                    predictor_factory=stand_in)
    path = paths["efficientnet-lite0"]
    assert path == str(tmp_path / "predictions" / f"efficientnet-lite0-{spec.checkpoint_sha256()[:12]}"
                       / source.dataset_id / "all.npz")
    result = load_predictions(path)
    good = [n for n in source.file_names if n not in bad]
    assert result.file_names.tolist() == good
    assert result.image_index.tolist() == [source.file_names.index(n) for n in good]
    assert sorted(result.quarantined_file_names.tolist()) == sorted(bad)
    assert result.num_read == len(source)
    np.testing.assert_allclose(result.logits, _expected_logits(spec, source, good), rtol=1e-4, atol=1e-5)
    # The features of the same call, beside the logits, as float16.
    assert result.features.dtype == np.float16
    np.testing.assert_allclose(result.features, _expected_features(spec, source, good), atol=2e-3)
    assert sorted(p.name for p in (tmp_path / "predictions").rglob("*")) == sorted(
        [f"efficientnet-lite0-{spec.checkpoint_sha256()[:12]}", source.dataset_id, "all.npz"])

    stand_in.fail_from_call = 0  # any model call would now fail
    assert predict.run_predictions([spec], source, tmp_path, predictor_factory=stand_in) == paths


def test_a_rerun_after_a_crash_predicts_only_the_missing_shards(tmp_path, spec, photo_source, stand_in):
    source, bad = photo_source
    out = tmp_path / "pred.npz"
    stand_in.fail_from_call = 2
    with pytest.raises(Exception, match="simulated crash"):
        predict.predict_source(spec, source, out, batch_size=2, shard_size=2, predictor_factory=stand_in)
    assert not out.exists()
    shard_files = sorted((tmp_path / "pred.shards").glob("*/shard-*.npz"))
    done = [load_predictions(p) for p in shard_files]
    assert 1 <= len(done) < 5
    assert all(p.name.endswith("-of-00005.npz") for p in shard_files)

    stand_in.fail_from_call = None
    stand_in.batch_sizes = []
    result = predict.predict_source(spec, source, out, batch_size=2, shard_size=2,
                                    predictor_factory=stand_in)
    assert sum(stand_in.batch_sizes) == len(source) - len(bad) - sum(p.num_images for p in done)
    good = [n for n in source.file_names if n not in bad]
    assert result.file_names.tolist() == good and result.num_read == len(source)
    np.testing.assert_allclose(result.logits, _expected_logits(spec, source, good), rtol=1e-4, atol=1e-5)


def test_tfds_predictions_are_sorted_by_file_name(tmp_path, spec, tfds_dir, stand_in):  # noqa: F811
    source = TfdsImages("label_audit_tiny_photos", "validation", data_dir=tfds_dir)
    path = predict.run_predictions([spec], source, tmp_path, batch_size=4, shard_size=3,
                                   predictor_factory=stand_in)["efficientnet-lite0"]
    assert Path(path).parent.name == "label_audit_tiny_photos-1.0.0" and Path(path).name == "validation.npz"
    result = load_predictions(path)
    good = sorted(n for n in tfds_photos() if n != "photo_07.jpg")
    assert result.file_names.tolist() == good
    assert result.image_index.tolist() == list(range(7))  # rank in sorted file order
    assert result.labels.tolist() == [tiny_photos_label(n) for n in good]
    assert result.quarantined_file_names.tolist() == ["photo_07.jpg"]


# ----------------------------------------------------------------------------- CLI


def test_predict_command_on_real_photos(tmp_path, photo_source, capsys, shared_data):  # class names
    source, bad = photo_source
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    folder = source.paths[0].rsplit("/", 1)[0]
    args = parser.parse_args(["--model", "efficientnet-lite0", "--images", folder,
                              "--out", str(tmp_path / "pred.npz"), "--batch-size", "4", "--top-k", "3"])
    assert predict.main(args) == 0
    printed = capsys.readouterr().out
    result = load_predictions(tmp_path / "pred.npz")
    assert result.num_images == 6 and result.num_classes == 1000
    block = printed.split("coffee_cmyk.jpg\n", 1)[1].split("\n")[:3]
    assert block[0].startswith("  1.") and "espresso (n07920052)" in block[0]
    assert all(f"{name}\n  quarantined: " in printed for name in bad)
    assert "9 images read = 6 predicted + 3 quarantined" in printed


def test_shard_progress_logs_counts_and_an_eta(tmp_path, caplog):
    import logging
    import time

    caplog.set_level(logging.INFO, logger="label-audit.predict")
    caplog.set_level(logging.INFO)
    def progress_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "shards predicted" in r.getMessage()]

    with predict._shard_progress(tmp_path, "lite0", todo=4, every_s=0.05):
        (tmp_path / "shard-00000-of-00004.npz").write_bytes(b"")
        deadline = time.monotonic() + 30  # a loaded machine may delay the reporter thread
        while not any("ETA" in m for m in progress_lines()) and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = progress_lines()
    assert any(m.startswith("lite0: 1/4 shards predicted") and "ETA" in m for m in lines)
    assert lines[-1].startswith("lite0: 1/4 shards predicted") and "ETA" not in lines[-1]  # the final line


def test_store_paths_of_different_splits_never_collide():
    names = ["validation[:1000]", "validation[1000:]", "validation[:50]", "validation[:50%]", "validation"]
    assert len({predict._path_safe(n) for n in names}) == len(names)


# ----------------------------------------------------------------------------- object storage


@pytest.fixture(scope="module")
def gcs_emulator():
    """A local GCS emulator (gcp-storage-emulator, loopback, in memory) with a bucket
    ``audits``, reached by Beam's own GCS filesystem through STORAGE_EMULATOR_HOST."""
    import os
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("apache_beam.io.gcp.gcsio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--default-bucket", "audits"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        yield "gs://audits"
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        proc.terminate()
        proc.wait(timeout=30)


def test_store_on_object_storage_with_crash_resume(gcs_emulator, spec, photo_source, stand_in, tmp_path,
                                                   monkeypatch):
    from apache_beam.io.filesystems import FileSystems

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory either
    source, bad = photo_source
    store = f"{gcs_emulator}/store-{tmp_path.name}"
    path = predict.predictions_path(store, spec, source)
    assert path.startswith("gs://audits/")
    stand_in.fail_from_call = 2
    with pytest.raises(Exception, match="simulated crash"):
        predict.run_predictions([spec], source, store, batch_size=2, shard_size=2, predictor_factory=stand_in)
    shards = FileSystems.match([f"{store}/**/shard-*.npz"])[0].metadata_list
    assert 1 <= len(shards) < 5 and not FileSystems.exists(path)
    done = sum(predict.read_predictions(m.path).num_read for m in shards)  # read back from the bucket

    stand_in.fail_from_call = None
    stand_in.batch_sizes = []
    assert predict.run_predictions([spec], source, store, batch_size=2, shard_size=2,
                                   predictor_factory=stand_in) == {"efficientnet-lite0": path}
    # Only the missing shards ran (quarantined images take no model call).
    assert sum(stand_in.batch_sizes) < len(source) - len(bad)
    assert sum(stand_in.batch_sizes) + done >= len(source) - len(bad)
    objects = [m.path for m in FileSystems.match([f"{store}/**"])[0].metadata_list]
    assert objects == [path]  # the shards and every temporary object are gone
    result = predict.read_predictions(path)
    good = [n for n in source.file_names if n not in bad]
    assert result.file_names.tolist() == good and result.num_read == len(source)
    np.testing.assert_allclose(result.logits, _expected_logits(spec, source, good), rtol=1e-4, atol=1e-5)
    assert result.features.dtype == np.float16
    assert not any(tmp_path.iterdir())
