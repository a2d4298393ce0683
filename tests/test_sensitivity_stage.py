"""stages.sensitivity in the stage graph, on real validation images and the real Lite0."""
from __future__ import annotations

import json
import os

import pytest

from pipelines import cli
from pipelines.config import load_config
from pipelines import run


@pytest.mark.slow
def test_sensitivity_stage_runs_publishes_and_computes_only_an_added_transform(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "images"
    images.mkdir()
    folder = shared_data / "imagenet_val_sample" / "images"
    for name in sorted(os.listdir(folder))[:12]:
        (images / name).symlink_to(folder / name)
    config = tmp_path / "audit.yaml"
    text = f"""output_dir: out
dataset: {{original_labels: tfds-wheel, images: {{type: folder, path: {images}}}}}
stages:
  sensitivity:
    models: [efficientnet-lite0]
    transforms: [vflip]
    batch_size: 12
"""
    config.write_text(text)
    assert cli.main(["run", str(config)]) == 0
    page = tmp_path / "out" / "sensitivity" / "index.html"
    assert page.is_file() and "vflip" in page.read_text()
    report = json.loads((tmp_path / "out" / "sensitivity" / "sensitivity.json").read_text())
    assert report["transforms"][1]["name"] == "vflip"
    # Adding a transform computes only that (model, transform) pair.
    config.write_text(text.replace("transforms: [vflip]", "transforms: [vflip, hflip]"))
    result = run.execute(load_config(config), echo=lambda *a, **k: None)
    counts = result.artifacts["sensitivity"].counts
    assert counts["images_audited"] == 12 and counts["pairs"] == 3 and counts["pairs_computed"] == 1
