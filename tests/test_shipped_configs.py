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
def test_imagenet_config_reproduces_real_json_and_scores_npz_exactly(shared_data, tmp_path):
    """The demo: the ReaL votes and golden questions -> the published labels, bit for bit."""
    import numpy as np

    from auditing import labelsets, sources

    out = tmp_path / "out"
    assert cli.main(["run", str(REPO / "configs" / "imagenet_real.yaml"), "--out", str(out)]) == 0
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
