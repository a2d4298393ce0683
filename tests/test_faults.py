"""Crashes at the worst moment: `label-audit run` SIGKILLed while it writes a release or a
stored stage output, and the predict stage killed between shards. Nothing partial may
become visible, and a re-run must finish with the same result as a run never killed.

The kills are not timed by sleeps: a poller (every 2 ms) watches for the on-disk sign
of the moment to hit (a staging folder, a log line, a shard file) and kills the whole
process group then. A run that finishes before the poller sees its moment makes the
test retry on a bigger input, then fail; it never passes without having killed.
"""
from __future__ import annotations

import filecmp
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds

from auditing import labelsets
from auditing.predictions import load_predictions
from pipelines import cli, reaudit, release, run
from pipelines.config import load_config
from tests.conftest import N_RATED, N_UNRATED

REPO = Path(__file__).resolve().parents[1]
NAME, VERSION = "real_slice_audit", "1.0.0"
POLL_S = 0.002
BIG_TABLE_IMAGES = 10_000


def quiet(*args, **kwargs) -> None:
    pass


# ----------------------------------------------------------------- subprocess + poller


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    """``python ARGS`` from the repo root, in its own process group (killed as a whole)."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_when(proc: subprocess.Popen, moment: Callable[[], bool], timeout_s: float = 120) -> bool:
    """SIGKILL ``proc``'s process group as soon as ``moment()`` holds. False if the
    process ended first (nothing was killed)."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if moment():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"the moment to kill never came within {timeout_s} s")
        time.sleep(POLL_S)
    return False


def spawn_run(config: Path, out: Path) -> subprocess.Popen:
    return spawn(["-m", "pipelines.cli", "run", str(config), "--out", str(out)], out.parent / "run.log")


def hidden_dirs(folder: Path, pattern: str = ".*") -> list[Path]:
    return [p for p in folder.glob(pattern) if p.is_dir()] if folder.is_dir() else []


# ----------------------------------------------------------------- configs and references


def slice_config(real_slice: Path, folder: Path, labels: Path | None = None, writer: str = "auto") -> Path:
    """The real_slice audit with absolute input paths (optionally another labels file,
    another release writer: stages.release.writer)."""
    text = (real_slice / "audit.yaml").read_text()
    text = text.replace("labels.tsv", str(labels or real_slice / "labels.tsv"))
    text = text.replace("release: {name:", f"release: {{writer: {writer}, name:")
    text = text.replace("votes_first.csv", str(real_slice / "votes_first.csv"))
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "audit.yaml"
    config.write_text(text)
    return config


def big_config(real_slice: Path, folder: Path, writer: str = "auto") -> Path:
    """The same votes on BIG_TABLE_IMAGES images (the rest unrated): a slower release."""
    originals = labelsets.original_val_labels()
    small = labelsets.read_label_tsv(real_slice / "labels.tsv")
    extra = originals[~originals["file_name"].isin(small["file_name"])].head(BIG_TABLE_IMAGES - len(small))
    labels = folder / "labels_big.tsv"
    folder.mkdir(parents=True, exist_ok=True)
    pd.concat([small, extra]).sort_values("file_name").to_csv(labels, sep="\t", index=False)
    return slice_config(real_slice, folder, labels, writer)


def version_dir(out: Path) -> Path:
    return release.release_dir(out, NAME, VERSION)


def clean_release(config: Path, out: Path) -> Path:
    """The release of a run never killed."""
    assert cli.main(["run", str(config), "--out", str(out)]) == 0
    return version_dir(out)


def assert_same_release(got: Path, expected: Path) -> None:
    """The same files, the same records; TFDS's own metadata and ours byte-identical.

    The array_record bytes are compared by content only: tf.Example serialization writes
    the feature map in a per-process order (see test_dataflow's cross-process test).
    """
    files = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in got.iterdir()) == files
    metadata = [f for f in files if ".array_record-" not in f]
    _, mismatch, errors = filecmp.cmpfiles(got, expected, metadata, shallow=False)
    assert mismatch == [] and errors == [], mismatch
    pd.testing.assert_frame_equal(release.read_release(got), release.read_release(expected))


def assert_store_complete(store: Path) -> None:
    """Every visible ``<stage>/<key>`` folder is a finished output: it has its _key.json."""
    if not store.exists():
        return
    for stage in (p for p in store.iterdir() if p.is_dir()):
        for folder in (p for p in stage.iterdir() if not p.name.startswith(".")):
            key_file = folder / "_key.json"
            assert key_file.is_file(), f"{folder} is visible without its _key.json"
            assert json.loads(key_file.read_text())["key"] == folder.name
            assert json.loads(key_file.read_text())["stage"] == stage.name


def rerun(config: Path, out: Path) -> run.RunResult:
    return run.execute(load_config(config, output_dir=str(out)), echo=quiet)


# ----------------------------------------------------------------- 1. kill during the release write


def _uncommitted(root: Path, inside: str) -> bool:
    version = root / VERSION
    return (version / inside).is_dir() and not (version / "_COMMITTED.json").exists()


def _shards_placed(root: Path) -> bool:
    version = root / VERSION
    return (version.is_dir() and any(".array_record-" in p.name for p in version.iterdir())
            and not (version / "_COMMITTED.json").exists())


RELEASE_MOMENTS = {
    # write_release has claimed the version prefix (pipelines/commit.py), nothing else yet.
    "version claimed": ("auto", lambda root: _uncommitted(root, "_claims")),
    # The row chunks are written and TFDS's Beam job is making the array_record shards.
    "tfds beam writing": ("beam", lambda root: _uncommitted(root, "_rows") and any((root / VERSION / "_rows").iterdir())),
    # TFDS's in-process writer has finished a shard and it is in the version prefix; the
    # metadata and the marker are not.
    "local shards placed": ("local", _shards_placed),
}


@pytest.mark.parametrize("moment", RELEASE_MOMENTS)
def test_kill_during_release_write_leaves_no_version_and_a_rerun_completes(real_slice, tmp_path, moment):
    writer, reached = RELEASE_MOMENTS[moment]
    attempts = [("slice", lambda d: slice_config(real_slice, d, writer=writer)),
                ("big", lambda d: big_config(real_slice, d, writer=writer))]
    for size, make_config in attempts:
        config = make_config(tmp_path / size)
        out = tmp_path / size / "out"
        root = out / "tfds" / NAME
        proc = spawn_run(config, out)
        if kill_when(proc, lambda: reached(root)):
            break
        assert proc.returncode == 0, (tmp_path / size / "run.log").read_text()[-3000:]
    else:
        pytest.fail(f"the run finished before the poller saw '{moment}', even with "
                    f"{BIG_TABLE_IMAGES} images; the kill moment cannot be hit on this machine")

    # Killed during the write: what it wrote is there, but no commit marker, so no version.
    assert version_dir(out).exists() and not (version_dir(out) / "_COMMITTED.json").exists()
    assert release.released_versions(out, NAME) == []

    state = rerun(config, out)
    assert state.release_status == "written"
    # The votes and aggregate outputs finished before the kill are reused as they are.
    assert not {stage for stage, _ in state.store.computed} & {"votes", "aggregate"}
    assert release.released_versions(out, NAME) == [VERSION]
    images = N_RATED + N_UNRATED if size == "slice" else BIG_TABLE_IMAGES
    assert len(tfds.builder_from_directory(str(version_dir(out))).as_data_source("validation")) == images
    # The crashed writer's leftovers were removed by the re-run, which committed the version.
    assert not (version_dir(out) / "_claims").exists() and not (version_dir(out) / "_rows").exists()
    assert str(tfds.builder(NAME, data_dir=str(out / "tfds")).info.version) == VERSION
    assert cli.main(["reaudit", str(config), "--out", str(out)]) == reaudit.EXIT_UNCHANGED
    assert release.released_versions(out, NAME) == [VERSION]
    assert_same_release(version_dir(out), clean_release(config, tmp_path / "reference"))


# ----------------------------------------------------------------- 2. kill during a store stage


def test_kill_during_aggregate_leaves_no_unfinished_store_folder(real_slice, tmp_path):
    config = slice_config(real_slice, tmp_path)
    out = tmp_path / "out"
    aggregate = out / "store" / "aggregate"
    proc = spawn_run(config, out)
    assert kill_when(proc, lambda: bool(hidden_dirs(aggregate))), \
        "the run finished before the aggregate stage's staging folder was seen"

    assert hidden_dirs(aggregate), "the staging folder of the killed stage is left, hidden"
    assert [p for p in aggregate.iterdir() if not p.name.startswith(".")] == []
    assert_store_complete(out / "store")
    assert not (out / "tfds").exists()

    state = rerun(config, out)
    assert state.computed == ["aggregate", "release", "report"]  # dataset and votes reused
    assert_store_complete(out / "store")
    assert len([p for p in aggregate.iterdir() if not p.name.startswith(".")]) == 1
    assert_same_release(version_dir(out), clean_release(config, tmp_path / "reference"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["votes", "aggregate", "release", "report"])
def test_kill_at_the_start_of_each_stage_then_rerun_gives_the_same_release(real_slice, tmp_path, stage):
    """SIGKILL as soon as `[i/n] STAGE ...` is logged; the re-run's release is byte-identical."""
    config = slice_config(real_slice, tmp_path)
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    proc = spawn_run(config, out)
    assert kill_when(proc, lambda: f"] {stage} ...".encode() in log.read_bytes()), \
        f"the run finished before it logged the start of {stage}"
    assert b"done in" not in log.read_bytes()
    assert_store_complete(out / "store")
    assert release.released_versions(out, NAME) in ([], [VERSION])
    state = rerun(config, out)
    assert state.release_status in ("written", "unchanged")
    assert_same_release(version_dir(out), clean_release(config, tmp_path / "reference"))


# ----------------------------------------------------------------- 5. predict: re-run reuses shards

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "china", "flower")
SHARD_SIZE = 2


class StandInPredictor:
    """A deterministic linear model over the real preprocessed images (no JAX): counts
    the images it is given, and can be slowed down so that a kill lands between shards."""

    images_seen = 0
    delay_s = 0.0

    def __init__(self, spec, batch_size: int, dtype: str):
        self.weights = np.random.default_rng(0).normal(size=(3, spec.num_classes)).astype(np.float32)

    def predict(self, images: np.ndarray):
        from models.predictor import PredictorOutput

        time.sleep(StandInPredictor.delay_s)
        StandInPredictor.images_seen += len(images)
        return PredictorOutput(images.mean(axis=(1, 2)) @ self.weights, None)


def write_photo_folder(folder: Path) -> Path:
    """Real photos (two JPEG copies each): 12 images, 6 shards of 2."""
    from models import sample_photos

    folder.mkdir(parents=True)
    for name, image in sample_photos.load_photos(list(PHOTOS)).items():
        for copy in range(2):
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=90 - copy)
            (folder / f"{name}_{copy}.jpg").write_bytes(buffer.getvalue())
    return folder


def predict_slowly(folder: str, out: str) -> None:
    """Run in a subprocess by the test below: the predict stage with a slow stand-in model."""
    from models.registry import get_model
    from pipelines import predict
    from pipelines.images import ImageFiles

    StandInPredictor.delay_s = 0.4
    predict.predict_source(get_model("efficientnet-lite0"), ImageFiles.from_folder(folder), out,
                           batch_size=SHARD_SIZE, shard_size=SHARD_SIZE, predictor_factory=StandInPredictor)


def test_predict_killed_between_shards_reruns_only_the_missing_shards(tmp_path, caplog):
    from models.registry import get_model
    from pipelines import predict
    from pipelines.images import ImageFiles

    folder = write_photo_folder(tmp_path / "photos")
    source = ImageFiles.from_folder(folder)
    shard_count = -(-len(source) // SHARD_SIZE)
    out = tmp_path / "pred.npz"
    shard_files = lambda: sorted((tmp_path / "pred.shards").glob("*/shard-*.npz"))  # noqa: E731
    proc = spawn(["-c", f"from tests.test_faults import predict_slowly; "
                        f"predict_slowly({str(folder)!r}, {str(out)!r})"], tmp_path / "predict.log")
    assert kill_when(proc, lambda: len(shard_files()) >= 2), \
        "predict finished before two shards were written: " + (tmp_path / "predict.log").read_text()[-2000:]

    done = shard_files()
    assert 2 <= len(done) < shard_count and not out.exists()
    # Shard files are written atomically: every visible one is whole and loadable.
    finished = [load_predictions(p) for p in done]
    assert all(p.num_read == SHARD_SIZE for p in finished)

    spec = get_model("efficientnet-lite0")
    StandInPredictor.delay_s, StandInPredictor.images_seen = 0.0, 0
    with caplog.at_level(logging.INFO, logger="pipelines.predict"):
        result = predict.predict_source(spec, source, out, batch_size=SHARD_SIZE, shard_size=SHARD_SIZE,
                                        predictor_factory=StandInPredictor)
    assert StandInPredictor.images_seen == len(source) - SHARD_SIZE * len(done)
    assert f"{shard_count - len(done)} of {shard_count} shards to predict" in caplog.text
    assert not (tmp_path / "pred.shards").exists()

    StandInPredictor.images_seen = 0
    never_killed = predict.predict_source(spec, source, tmp_path / "clean.npz", batch_size=SHARD_SIZE,
                                          shard_size=SHARD_SIZE, predictor_factory=StandInPredictor)
    assert StandInPredictor.images_seen == len(source)
    assert result.file_names.tolist() == never_killed.file_names.tolist() == sorted(source.file_names)
    np.testing.assert_array_equal(result.logits, never_killed.logits)
    np.testing.assert_array_equal(result.image_index, never_killed.image_index)
