"""The portable runner (job service + SDK workers over the Fn API, as Dataflow Runner v2,
Flink and Spark run Python) with a worker pool in its own folder, output on a GCS emulator."""
from __future__ import annotations

import json
import os

import apache_beam as beam
import pytest

from pipelines import commit, release
from pipelines.beam_options import make_options, runner_options
from pipelines.portable import worker_pool
from tests.test_release_pull import NAME, _write, real_table  # noqa: F401 (fixture)


def _where(x: int) -> str:
    return json.dumps({"x": x, "pid": os.getpid(), "cwd": os.getcwd(), "tmp": os.environ.get("TMPDIR"),
                       "home": os.environ.get("HOME")})


def _word_counts(options, out: str) -> None:
    with beam.Pipeline(options=options) as p:
        words = p | "Words" >> beam.Create("the cat and the hat and the bat".split())
        counts = (words | "Pair" >> beam.Map(lambda w: (w, 1)) | "Count" >> beam.CombinePerKey(sum)
                  | "Format" >> beam.MapTuple(lambda w, n: f"{w}\t{n}"))
        counts | "Write" >> beam.io.WriteToText(f"{out}/counts", num_shards=1)
        p | "Probe" >> beam.Create([1]) | "Where" >> beam.Map(_where) | "WriteWhere" >> beam.io.WriteToText(
            f"{out}/where", num_shards=1)


def _lines(prefix: str, stem: str) -> list[str]:
    files = [rel for rel in commit.list_files(prefix) if rel.startswith(stem)]
    return sorted(line for rel in files for line in commit.read_text(commit.join(prefix, rel)).splitlines())


def test_pipeline_on_portable_workers_in_an_isolated_folder_equals_direct(gcs_prefix, tmp_path):
    pool_root = tmp_path / "pool"
    with worker_pool(pool_root) as address:
        _word_counts(make_options("portable", environment_config=address), f"{gcs_prefix}/portable")
    _word_counts(make_options("direct"), f"{gcs_prefix}/direct")
    assert _lines(f"{gcs_prefix}/portable", "counts") == _lines(f"{gcs_prefix}/direct", "counts") == [
        "and\t2", "bat\t1", "cat\t1", "hat\t1", "the\t3"]
    where = json.loads(_lines(f"{gcs_prefix}/portable", "where")[0])
    # Run by a worker process of the pool, in the pool's folder with its own TMPDIR and HOME.
    assert where["pid"] != os.getpid()
    assert where["cwd"] == str(pool_root / "work")
    assert (where["tmp"], where["home"]) == (str(pool_root / "tmp"), str(pool_root / "home"))


def test_portable_needs_a_pool_address_and_unknown_runners_are_refused():
    with pytest.raises(ValueError, match="environment_config"):
        make_options("portable")
    with pytest.raises(ValueError, match="unknown runner 'dask'"):
        make_options("dask")


def test_tfds_release_written_by_portable_workers_to_gcs_equals_direct(gcs_prefix, tmp_path, real_table):
    table = real_table
    with runner_options("portable", num_workers=2) as options:
        remote = release.write_release(gcs_prefix, NAME, "1.0.0", table, release_notes={"1.0.0": "First audit."},
                                       manifest={"content_key": "k"}, counts={"images": len(table)},
                                       options=options)
    local = _write(str(tmp_path / "direct"), table)
    assert commit.verify(remote)["files"] == commit.verify(local)["files"]
    assert release.read_release(remote, cache_dir=tmp_path / "cache").equals(release.read_release(local))
