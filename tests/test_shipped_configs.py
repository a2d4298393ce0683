"""Both shipped configs run end to end and give their documented figures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import cli, release

REPO = Path(__file__).resolve().parents[1]
ESPRESSO, CUP, MOTOR_SCOOTER = 967, 968, 670


@pytest.mark.slow
def test_sample_photos_config_adds_espresso_and_removes_the_scooter(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert cli.main(["run", str(REPO / "configs" / "sample_photos.yaml"), "--out", str(out)]) == 0
    table = release.read_release(out / "tfds" / "sample_photos_audit" / "1.0.0").set_index("file_name")
    assert len(table) == 9
    coffee, motorcycle = table.loc["coffee.png"], table.loc["motorcycle_left.png"]
    assert coffee["original_label"] == CUP and ESPRESSO in coffee["real_label"]
    assert motorcycle["original_label"] == MOTOR_SCOOTER and MOTOR_SCOOTER not in motorcycle["real_label"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["models"]) == {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"}
    # A second run recomputes nothing.
    assert cli.main(["run", str(REPO / "configs" / "sample_photos.yaml"), "--out", str(out)]) == 0
    assert release.released_versions(out, "sample_photos_audit") == ["1.0.0"]


@pytest.mark.slow
@pytest.mark.parametrize("engines", [
    {},  # as shipped: the in-memory aggregation, TFDS's in-process writer
    # At scale: gold-confusion in one Beam pass over vote shards, the scores kept as
    # shards, and the release written by TFDS's Beam job from those shards.
    {"aggregate": {"engine": "beam"}, "release": {"writer": "beam"}},
], ids=["as-shipped", "beam-aggregation-and-release"])
def test_imagenet_config_reproduces_real_json_and_scores_npz_exactly(shared_data, tmp_path, engines):
    """The demo: the ReaL votes and golden questions -> the published labels, bit for bit."""
    import numpy as np
    import yaml

    from auditing import labelsets, sources

    out = tmp_path / "out"
    config = REPO / "configs" / "imagenet_real.yaml"
    if engines:
        spec = yaml.safe_load(config.read_text())
        for stage, settings in engines.items():
            spec["stages"][stage] |= settings
        config = tmp_path / "imagenet_real_beam.yaml"  # its file references are all source:NAME
        config.write_text(yaml.safe_dump(spec))
    assert cli.main(["run", str(config), "--out", str(out)]) == 0
    if engines:
        aggregate = next((out / "store" / "aggregate").iterdir())
        assert json.loads((aggregate / "summary.json").read_text())["engine"] == "beam"
        assert len(list((aggregate / "scores").glob("scores-*-of-*.parquet"))) > 1
    version = out / "tfds" / "imagenet2012_real_audit" / "1.0.0"
    table = release.read_release(version)
    published = labelsets.read_real_json(sources.fetch("real_labels", download=False))
    assert len(table) == 50_000
    assert {f: frozenset(s) for f, s in zip(table["file_name"], table["real_label"])} == published
    counts = json.loads((version / "counts.json").read_text())
    assert (counts["labels"], counts["empty_sets"]) == (57_553, 3_163)  # the paper's figures
    with np.load(sources.fetch("real_scores", download=False)) as f:
        info, expected = f["info"], f["tensor"]
    ours = {(name, int(label)): score for name, labels, scores in
            zip(table["file_name"], table["score_labels"], table["scores"]) for label, score in zip(labels, scores)}
    got = np.array([ours[(name, int(label))] for name, label in info])
    assert np.abs(got - expected).max() <= 1e-12
    report = json.loads((out / "report" / "report.json").read_text())
    agreement = report["run"]["agreement_with_published"]
    assert agreement["question_agreement"] == 1.0
    assert {s["id"] for s in report["sections"]} >= {"rater-quality", "expert-evaluation"}
    # The published models against the unbiased oracle (the paper's Figure 6).
    assert {"ResNet50", "ViT", "DINO", "SimCLR", "label_errors"} <= set(report["oracle_comparison"]["models"])
