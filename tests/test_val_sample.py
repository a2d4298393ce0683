"""The whole loop on real ImageNet validation images (configs/imagenet_val_sample.yaml,
on a slice of its images so that it fits the test budget): real JPEGs, the real Lite
weights, the published top-1 CSVs, the real ReaL votes and golden questions."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines import cli, release
from pipelines.store import Store

REPO = Path(__file__).resolve().parents[1]
N_RATED, N_UNRATED = 48, 16


def _slice_config(shared_data: Path, tmp_path: Path, models: list[str]) -> Path:
    images = tmp_path / "images"
    if not images.exists():
        images.mkdir()
        folder = shared_data / "imagenet_val_sample" / "images"
        with np.load(shared_data / "reassessed_imagenet" / "raters.npz") as f:
            rated = set(f["info"][:, 0])
        names = sorted(os.listdir(folder))
        chosen = [n for n in names if n in rated][:N_RATED] + [n for n in names if n not in rated][:N_UNRATED]
        for name in chosen:
            (images / name).symlink_to(folder / name)
    config = yaml.safe_load((REPO / "configs" / "imagenet_val_sample.yaml").read_text())
    config["output_dir"] = str(tmp_path / "out")
    config["dataset"]["images"]["path"] = str(images)
    stages = config["stages"]
    stages["predict"]["models"] = [{"name": m} for m in models]
    stages["propose"]["top_n"] = 3 * (N_RATED + N_UNRATED)
    stages["propose"]["centroid"] = {"model": models[0], "reference": "audited"}
    # Every model pools (the subset selection could leave the added model out, and
    # then the re-audit rightly finds nothing new; tests/test_stages.py covers it).
    del stages["select_subset"]
    path = tmp_path / f"audit-{len(models)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_real_images_audit_then_a_reaudit_with_a_third_model(shared_data, tmp_path, model_runs):
    two = _slice_config(shared_data, tmp_path, ["efficientnet-lite0", "efficientnet-lite1"])
    out = tmp_path / "out"
    assert cli.main(["run", str(two)]) == 0
    assert model_runs == {"efficientnet-lite0": 1, "efficientnet-lite1": 1}
    version = out / "tfds" / "imagenet_val_sample_audit" / "1.0.0"
    table = release.read_release(version)
    assert len(table) == N_RATED + N_UNRATED

    # Every proposed pair that became a question is answered (scored) or awaiting votes.
    manifest = json.loads((version / "manifest.json").read_text())
    store = Store(out / "store")
    tasks = pd.read_json(store.path("tasks", manifest["stage_keys"]["tasks"]) / "tasks.jsonl", lines=True)
    asked = {(t.file_name, label["index"]) for t in tasks.itertuples() for label in t.labels}
    sets_folder = store.path("aggregate", manifest["stage_keys"]["label_sets"])
    scored = set(zip(*pd.read_parquet(sets_folder / "scores.parquet")[["file_name", "label"]].T.values))
    awaiting = set(zip(*pd.read_parquet(sets_folder / "awaiting.parquet")[["file_name", "label"]].T.values))
    assert asked == (asked & scored) | awaiting and not awaiting & scored
    assert awaiting, "the pool proposes pairs the paper never asked"
    flagged = set(table.loc[table["awaiting_votes"], "file_name"])
    assert flagged == {f for f, _ in awaiting}
    # Each label comes with an example image of its class.
    assert all(label["example_image"] for t in tasks.itertuples() for label in t.labels)
    report = json.loads((out / "report" / "report.json").read_text())
    assert f"{len(awaiting):,} pairs awaiting votes" in report["run"]["awaiting_votes"]
    assert {"efficientnet-lite0", "efficientnet-lite1", "ResNet50", "ViT", "DINO", "SimCLR"} <= set(report["models"])
    assert {s["id"] for s in report["sections"]} >= {"rater-quality", "sample-accuracy",
                                                      "proposal-quality"}
    # The questions the paper asked got the published scores: the sets agree with real.json.
    assert report["run"]["agreement_with_published"]["question_agreement"] == 1.0

    three = _slice_config(shared_data, tmp_path, ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
    model_runs.clear()
    assert cli.main(["reaudit", str(three)]) == 0
    assert model_runs == {"efficientnet-lite2": 1}
    versions = release.released_versions(out, "imagenet_val_sample_audit")
    assert versions[0] == "1.0.0" and len(versions) == 2
    new = out / "tfds" / "imagenet_val_sample_audit" / versions[1]
    assert "added model(s) efficientnet-lite2" in (new / "RELEASE_NOTES.md").read_text()
    assert json.loads((new / "diff.json").read_text())["from_version"] == "1.0.0"
    manifest = json.loads((new / "manifest.json").read_text())
    second = pd.read_json(store.path("tasks", manifest["stage_keys"]["tasks"]) / "tasks.jsonl", lines=True)
    asked_again = {(t.file_name, label["index"]) for t in second.itertuples() for label in t.labels}
    # No answered pair is asked again; pairs still awaiting votes stay in the tasks.
    assert not asked_again & scored and asked_again - asked, "the new model proposed new pairs"
