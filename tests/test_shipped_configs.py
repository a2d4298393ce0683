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
