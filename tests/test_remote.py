"""URI inputs go through Beam's FileSystems: a config can name gs:// files.

The test registers a Beam filesystem for a made-up scheme that serves a local folder,
as gs:// would serve a bucket (Beam picks a filesystem by scheme among its subclasses).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from apache_beam.io.filesystem import MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

from pipelines import cli, release
from pipelines.config import ConfigError, load_config
from pipelines.remote import localize

BUCKET = Path("/tmp/label-audit-fake-bucket")


class FakeBucketFileSystem(LocalFileSystem):
    """``fakebucket://a/b`` is ``BUCKET/a/b``."""

    @classmethod
    def scheme(cls):
        return "fakebucket"

    @staticmethod
    def _local(uri: str) -> str:
        return str(BUCKET / uri.removeprefix("fakebucket://"))

    def match(self, patterns, limits=None):
        results = super().match([self._local(p) for p in patterns], limits)
        return [MatchResult(p, r.metadata_list) for p, r in zip(patterns, results)]

    def open(self, path, *args, **kwargs):
        return super().open(self._local(path), *args, **kwargs)


@pytest.fixture
def bucket():
    shutil.rmtree(BUCKET, ignore_errors=True)
    BUCKET.mkdir(parents=True)
    yield BUCKET
    shutil.rmtree(BUCKET, ignore_errors=True)


def test_localize_fetches_once_and_again_when_the_remote_file_changes(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    (bucket / "votes.csv").write_text("a")
    first = localize("fakebucket://votes.csv")
    assert first.read_text() == "a" and localize("fakebucket://votes.csv") == first
    (bucket / "votes.csv").write_text("bb")  # another size: another version
    second = localize("fakebucket://votes.csv")
    assert second != first and second.read_text() == "bb"


def test_missing_uri_is_a_config_error_naming_key_and_uri(bucket, tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text("output_dir: out\nstages: {votes: {paths: ['fakebucket://nope.csv']}}\n")
    with pytest.raises(ConfigError, match=r"stages\.votes\.paths\[0\]: fakebucket://nope\.csv: no such file"):
        load_config(config)


def test_run_reads_votes_and_labels_from_uris(real_slice, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    for name in ("votes_first.csv", "labels.tsv"):
        shutil.copy(real_slice / name, bucket / name)
    text = (real_slice / "audit.yaml").read_text()
    text = text.replace("original_labels: labels.tsv", "original_labels: fakebucket://labels.tsv")
    text = text.replace("paths: [votes_first.csv]", "paths: ['fakebucket://votes_first.csv']")
    text = text.replace('report: {published_labels: "source:real_labels"}', "report: {}")
    config = tmp_path / "remote.yaml"
    config.write_text(text)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out")]) == 0
    local = tmp_path / "local"
    assert cli.main(["run", str(real_slice / "audit.yaml"), "--out", str(local)]) == 0
    remote_table = release.read_release(tmp_path / "out" / "tfds" / "real_slice_audit" / "1.0.0")
    local_table = release.read_release(local / "tfds" / "real_slice_audit" / "1.0.0")
    assert remote_table["real_label"].tolist() == local_table["real_label"].tolist()


def test_compressed_remote_files_arrive_as_stored(bucket, tmp_path, monkeypatch):
    import gzip

    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    packed = gzip.compress(b"file_name\tlabel\na.JPEG\t1\n")
    (bucket / "labels.tsv.gz").write_bytes(packed)
    assert localize("fakebucket://labels.tsv.gz").read_bytes() == packed
