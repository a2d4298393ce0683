"""`label-audit run` with output_dir on object storage (a GCS emulator on 127.0.0.1):
every artifact through Beam's FileSystems, committed by marker; a re-run recomputes
nothing; a re-audit writes the next version; the release pulls back and loads; the
portable runner (SDK workers in their own folders) gives the same release."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import cli, commit, release, run
from pipelines.config import load_config
from pipelines.release_pull import load_release

QUIET = dict(echo=lambda *a, **k: None)


def _records(builder) -> list[dict]:
    source = builder.as_data_source(split="validation")
    return sorted(({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in source[i].items()}
                   for i in range(len(source))), key=lambda r: r["file_name"])


@pytest.mark.slow
def test_a_run_on_object_storage_commits_reuses_and_reaudits(real_slice, gcs_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    out = f"{gcs_prefix}/audit"
    config = load_config(real_slice / "audit.yaml", output_dir=out)
    first = run.execute(config, **QUIET)
    assert first.computed == ["dataset", "votes", "aggregate", "release", "report"]
    version = f"{out}/tfds/real_slice_audit/1.0.0"
    assert commit.is_committed(version) and release.released_versions(out, "real_slice_audit") == ["1.0.0"]
    for stage in ("dataset", "votes", "aggregate", "report"):
        key = first.artifacts[{"aggregate": "label_sets"}.get(stage, stage)].key
        assert commit.is_committed(f"{out}/store/{stage}/{key}"), stage
    assert commit.exists(f"{out}/report/index.html")
    # Nothing of the run is on the local disk but the caches.
    assert not any(p.name == "tfds" for p in tmp_path.rglob("tfds"))

    # The same release written locally: every record equal.
    local = run.execute(load_config(real_slice / "audit.yaml", output_dir=str(tmp_path / "local")), **QUIET)
    pulled = load_release(version, cache_dir=tmp_path / "pulled")
    assert _records(pulled) == _records(__import__("tensorflow_datasets").builder_from_directory(
        str(local.artifacts["release"].folder)))
    # A re-run recomputes nothing and writes no version, also from another machine (an
    # empty local cache: the stored outputs are read back from the bucket, verified).
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "another-machine"))
    assert run.execute(config, **QUIET).computed == []
    # More votes: the re-audit writes the next version, on the bucket.
    more = (real_slice / "audit.yaml").read_text().replace("paths: [votes_first.csv]",
                                                          "paths: [votes_first.csv, votes_later.csv]")
    (real_slice / "audit_more_on_gcs.yaml").write_text(more)
    assert cli.main(["reaudit", str(real_slice / "audit_more_on_gcs.yaml"), "--out", out]) == 0
    assert release.released_versions(out, "real_slice_audit") == ["1.0.0", "2.0.0"]
    diff = commit.read_json(f"{out}/tfds/real_slice_audit/2.0.0/diff.json")
    assert diff["from_version"] == "1.0.0" and diff["images_changed"] > 0
    # explain reads the keys' records from the bucket.
    from pipelines.explain import explain

    lines = explain(out, "votes")
    assert lines[0] == "2 stored output(s) of votes, oldest first:" and any("re-ran because" in l for l in lines)


@pytest.mark.slow
def test_the_portable_runner_with_beam_aggregation_gives_the_direct_runners_release(real_slice, gcs_prefix,
                                                                                   tmp_path, monkeypatch):
    """SDK workers in their own folders (no shared disk but the bucket), Dawid-Skene over
    vote shards on them: the same label sets as the in-memory run, scores within the EM
    tolerance."""
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    (real_slice / "audit_portable.yaml").write_text((real_slice / "audit.yaml").read_text().replace(
        "aggregate: {method: dawid-skene, threshold: 0.8}",
        "aggregate: {method: dawid-skene, threshold: 0.8, engine: beam, votes_per_shard: 2000}"))
    out = f"{gcs_prefix}/portable"
    assert cli.main(["run", str(real_slice / "audit_portable.yaml"), "--out", out, "--runner", "portable"]) == 0
    direct = run.execute(load_config(real_slice / "audit.yaml", output_dir=str(tmp_path / "direct")), **QUIET)
    import tensorflow_datasets as tfds

    portable = _records(load_release(f"{out}/tfds/real_slice_audit/1.0.0", cache_dir=tmp_path / "pulled"))
    expected = _records(tfds.builder_from_directory(str(direct.artifacts["release"].folder)))
    assert [r["real_label"] for r in portable] == [r["real_label"] for r in expected]
    for got, want in zip(portable, expected):
        assert got["label_scores"]["label"] == want["label_scores"]["label"]
        assert max((abs(a - b) for a, b in zip(got["label_scores"]["score"], want["label_scores"]["score"])),
                   default=0) < 1e-4


REPO = Path(__file__).resolve().parents[1]


def _release_records(uri: str, cache: Path) -> list[dict]:
    return _records(load_release(uri, cache_dir=cache))


@pytest.mark.slow
def test_both_shipped_configs_on_the_bucket_direct_and_portable(shared_data, gcs_prefix, tmp_path, monkeypatch):
    """configs/sample_photos.yaml (every stage, the real Lite models) and
    configs/imagenet_real.yaml (votes -> release -> report) with output on the bucket; the
    portable runner's releases hold the same records as the DirectRunner's; a re-run
    recomputes nothing."""
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    for config, name in (("sample_photos.yaml", "sample_photos_audit"), ("imagenet_real.yaml", "imagenet2012_real_audit")):
        direct, portable = f"{gcs_prefix}/{name}/direct", f"{gcs_prefix}/{name}/portable"
        assert cli.main(["run", str(REPO / "configs" / config), "--out", direct]) == 0
        assert cli.main(["run", str(REPO / "configs" / config), "--out", portable, "--runner", "portable"]) == 0
        got = _release_records(f"{portable}/tfds/{name}/1.0.0", tmp_path / "pulled" / name / "p")
        want = _release_records(f"{direct}/tfds/{name}/1.0.0", tmp_path / "pulled" / name / "d")
        assert got == want, config
        assert commit.exists(f"{direct}/report/index.html")
        again = run.execute(load_config(REPO / "configs" / config, output_dir=direct), **QUIET)
        assert again.computed == [], config
        assert release.released_versions(direct, name) == ["1.0.0"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["aggregate", "release"])
def test_a_kill_during_a_stage_on_the_bucket_leaves_nothing_committed_and_a_rerun_completes(
        real_slice, gcs_prefix, tmp_path, monkeypatch, stage):
    """SIGKILL as soon as the stage starts, output on the bucket: no committed partial
    output of it; the re-run completes and its release holds the records of a clean run."""
    from tests.test_faults import kill_when, slice_config, spawn

    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    config = slice_config(real_slice, tmp_path)
    out = f"{gcs_prefix}/killed"
    log = tmp_path / "run.log"
    proc = spawn(["-m", "pipelines.cli", "run", str(config), "--out", out], log)
    assert kill_when(proc, lambda: f"] {stage} ...".encode() in log.read_bytes(), timeout_s=300), \
        f"the run finished before it logged the start of {stage}"
    store = f"{out}/store/aggregate"
    if stage == "aggregate":
        assert commit.committed_children(store) == []
    assert release.released_versions(out, "real_slice_audit") == []
    result = run.execute(load_config(config, output_dir=out), **QUIET)
    assert "release" in result.computed and release.released_versions(out, "real_slice_audit") == ["1.0.0"]
    assert len(commit.committed_children(store)) == 1
    clean = run.execute(load_config(config, output_dir=str(tmp_path / "clean")), **QUIET)
    import tensorflow_datasets as tfds

    assert _release_records(f"{out}/tfds/real_slice_audit/1.0.0", tmp_path / "pulled") == _records(
        tfds.builder_from_directory(str(clean.artifacts["release"].folder)))


@pytest.mark.slow
def test_a_reaudit_on_the_bucket_after_adding_a_model_writes_the_next_version(shared_data, gcs_prefix, tmp_path,
                                                                             monkeypatch, model_runs):
    from tests.test_reaudit_models import _config

    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    out = f"{gcs_prefix}/photos"
    two, three = tmp_path / "two.yaml", tmp_path / "three.yaml"
    two.write_text(_config(["efficientnet-lite0", "efficientnet-lite1"]))
    three.write_text(_config(["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]))
    assert cli.main(["run", str(two), "--out", out]) == 0
    model_runs.clear()
    assert cli.main(["reaudit", str(three), "--out", out]) == 0
    assert model_runs == {"efficientnet-lite2": 1}  # the earlier models' predictions are on the bucket
    assert release.released_versions(out, "photos_reaudit") == ["1.0.0", "2.0.0"]
    notes = commit.read_text(f"{out}/tfds/photos_reaudit/2.0.0/RELEASE_NOTES.md")
    assert "added model(s) efficientnet-lite2" in notes
    # Nothing new the second time.
    assert cli.main(["reaudit", str(three), "--out", out]) == 3
