"""Releases on object storage (a GCS emulator): written through Beam, committed, pulled,
verified, and read with TFDS; a writer killed mid-write leaves nothing released."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds

from pipelines import commit, release, release_pull
from pipelines.beam_options import make_options

REPO = Path(__file__).resolve().parents[1]
NAME = "pull_audit"


@pytest.fixture(scope="module")
def real_table(shared_data) -> pd.DataFrame:
    """The published ReaL release of the first 400 validation images: real.json's label
    sets, scores.npz's float64 scores (which must survive to 1e-12) and the original labels."""
    from auditing import labelsets

    reassessed = shared_data / "reassessed_imagenet"
    names = labelsets.imagenet_val_file_names()[:400]
    sets = labelsets.read_real_json(reassessed / "real.json")
    published = np.load(reassessed / "scores.npz")
    scores = pd.DataFrame({"file_name": published["info"][:, 0], "label": published["info"][:, 1].astype(int),
                           "score": published["tensor"]})
    original = labelsets.original_val_labels().set_index("file_name").loc[names, "label"].to_numpy()
    return release.release_table(names, original, {n: sets[n] for n in names},
                                 scores[scores["file_name"].isin(names)])


def _write(out_dir: str, table: pd.DataFrame, version: str = "1.0.0"):
    return release.write_release(out_dir, NAME, version, table, release_notes={version: "First audit."},
                                 manifest={"content_key": "k"}, counts={"images": len(table)},
                                 options=make_options("direct"))


def _records(builder) -> list[dict]:
    source = builder.as_data_source(split=release.SPLIT)
    return sorted(({"file_name": ex["file_name"], "original_label": int(ex["original_label"]),
                    "real_label": np.asarray(ex["real_label"]).tolist(),
                    "labels": np.asarray(ex["label_scores"]["label"]).tolist(),
                    "scores": np.asarray(ex["label_scores"]["score"], np.float64).tolist()} for ex in source),
                  key=lambda r: r["file_name"])


def test_release_on_gcs_is_committed_pulled_and_equal_to_the_local_one(gcs_prefix, tmp_path, real_table):
    table = real_table
    assert table["scores"].map(len).sum() > 1000  # the images' published scores are in it
    local = _write(str(tmp_path / "local"), table)
    remote = _write(gcs_prefix, table)
    assert remote == f"{gcs_prefix}/tfds/{NAME}/1.0.0"
    assert release.released_versions(gcs_prefix, NAME) == ["1.0.0"]
    # The same bytes in both places: every file, by the markers' sha256.
    assert commit.verify(remote)["files"] == commit.verify(local)["files"]
    builder = release_pull.load_release(remote, cache_dir=tmp_path / "cache")
    assert Path(builder.data_dir) == tmp_path / "cache" / NAME / "1.0.0"
    pulled = _records(builder)
    assert pulled == _records(tfds.builder_from_directory(str(local)))
    assert len(pulled) == len(table)
    expected = table.set_index("file_name")
    for record in pulled:
        assert record["scores"] == expected.loc[record["file_name"].decode(), "scores"]  # float64, exact
    assert release.read_release(remote, cache_dir=tmp_path / "cache").equals(release.read_release(local))
    # The CLI pulls it too.
    code = release_pull.main(argparse.Namespace(uri=remote, to=str(tmp_path / "cli")))
    assert code == 0 and (tmp_path / "cli" / "dataset_info.json").is_file()


def test_a_tampered_release_is_refused(gcs_prefix, tmp_path, capsys, real_table):
    remote = _write(gcs_prefix, real_table.iloc[:20])
    shard = next(rel for rel in commit.read_marker(remote)["files"] if ".array_record-" in rel)
    data = bytearray(commit.read_bytes(commit.join(remote, shard)))
    data[-1] ^= 0xFF
    commit.write_bytes(commit.join(remote, shard), bytes(data))
    with pytest.raises(commit.VerifyError, match=f"{shard}.*changed after the release was committed"):
        release_pull.load_release(remote, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / NAME / "1.0.0").exists()  # nothing half-pulled looks complete
    assert release_pull.main(argparse.Namespace(uri=remote, to=str(tmp_path / "cli"))) == 2
    assert "refusing it" in capsys.readouterr().out


def test_uncommitted_version_is_not_released_nor_pullable(gcs_prefix, tmp_path):
    version_dir = release.release_dir(gcs_prefix, NAME, "1.0.0")
    commit.write_text(commit.join(version_dir, "dataset_info.json"), "{}")  # no marker
    assert release.released_versions(gcs_prefix, NAME) == []
    with pytest.raises(commit.NotCommittedError, match="not committed"):
        release_pull.load_release(version_dir, cache_dir=tmp_path)


def test_sigkill_during_the_release_write_leaves_no_version_and_a_rerun_completes(gcs_prefix, tmp_path, real_table):
    table = pd.concat([real_table] * 10, ignore_index=True)  # 4,000 rows: a write that takes a while
    table["file_name"] = [f"{i:05d}-{name}" for i, name in enumerate(table["file_name"])]
    table_path = tmp_path / "table.pkl"
    table.to_pickle(table_path)
    code = f"""
        import pandas as pd
        from tests.test_release_pull import _write
        _write({gcs_prefix!r}, pd.read_pickle({str(table_path)!r}))
        """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    version_dir = release.release_dir(gcs_prefix, NAME, "1.0.0")
    deadline = time.monotonic() + 240
    # Killed once the writer has put files of this version in the bucket.
    while not commit.data_files(commit.list_files(version_dir)) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert commit.list_files(version_dir)  # the killed writer's leftovers...
    assert release.released_versions(gcs_prefix, NAME) == []  # ...are not a release
    assert not commit.is_committed(version_dir)
    rerun = _write(gcs_prefix, table)  # removes the leftovers, writes the version whole
    reference = _write(str(tmp_path / "uninterrupted"), table)
    assert release.released_versions(gcs_prefix, NAME) == ["1.0.0"]
    assert commit.verify(rerun)["files"] == commit.verify(reference)["files"]
