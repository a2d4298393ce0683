"""Adding a model and re-auditing: only the new model predicts; the next version
with a diff comes out. Real photos, the real EfficientNet-Lite weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import cli, release

REPO = Path(__file__).resolve().parents[1]


def _config(models: list[str]) -> str:
    sample = (REPO / "configs" / "sample_photos.yaml").read_text()
    head, _, rest = sample.partition("stages:")
    model_lines = "".join(f"      - name: {m}\n" for m in models)
    return head.replace("sample_photos/", f"{REPO}/configs/sample_photos/") + f"""stages:
  predict:
    models:
{model_lines}    batch_size: 8
  propose: {{top_n: 27}}
  tasks: {{max_labels: 8}}
  votes:
    simulate: {{truth: {REPO}/configs/sample_photos/truth.json, raters_per_task: 5, seed: 0}}
  aggregate:
    rater_history: source:real_raters
  release: {{name: photos_reaudit, version: 1.0.0, release_notes: Two models.}}
  report: {{}}
"""


@pytest.mark.slow
def test_adding_a_model_predicts_only_that_model_and_releases_the_next_version(shared_data, tmp_path, monkeypatch,
                                                                             model_runs):
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    two = tmp_path / "two.yaml"
    two.write_text(_config(["efficientnet-lite0", "efficientnet-lite1"]))
    assert cli.main(["run", str(two), "--out", str(out)]) == 0
    assert model_runs == {"efficientnet-lite0": 1, "efficientnet-lite1": 1}
    first_tasks = {json.loads(line)["task_id"] for path in (out / "store" / "tasks").glob("*/tasks.jsonl")
                   for line in path.read_text().splitlines()}

    three = tmp_path / "three.yaml"
    three.write_text(_config(["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]))
    model_runs.clear()
    assert cli.main(["reaudit", str(three), "--out", str(out)]) == 0
    assert model_runs == {"efficientnet-lite2": 1}  # the two earlier models were not run again
    # The new model's proposals got votes: existing records changed, so a MAJOR version.
    assert release.released_versions(out, "photos_reaudit") == ["1.0.0", "2.0.0"]
    new = out / "tfds" / "photos_reaudit" / "2.0.0"
    diff = json.loads((new / "diff.json").read_text())
    assert diff["from_version"] == "1.0.0" and diff["to_version"] == "2.0.0"
    notes = (new / "RELEASE_NOTES.md").read_text()
    assert "added model(s) efficientnet-lite2" in notes
    manifest = json.loads((new / "manifest.json").read_text())
    assert sorted(manifest["stage_keys"]["predictions"]) == ["efficientnet-lite0", "efficientnet-lite1",
                                                              "efficientnet-lite2"]
    # Only pairs never asked became tasks in the re-audit.
    all_task_files = sorted((out / "store" / "tasks").glob("*/tasks.jsonl"))
    assert len(all_task_files) == 2
    second_tasks = [json.loads(line) for path in all_task_files for line in path.read_text().splitlines()
                    if json.loads(line)["task_id"] not in first_tasks]
    assert second_tasks, "the third model proposed pairs never asked before"
    asked_before = set()
    for row in release.read_release(out / "tfds" / "photos_reaudit" / "1.0.0").itertuples():
        asked_before |= {(row.file_name, label) for label in row.score_labels}
    for task in second_tasks:
        for label in task["labels"]:
            assert (task["file_name"], label["index"]) not in asked_before
    # Nothing new the second time.
    model_runs.clear()
    assert cli.main(["reaudit", str(three), "--out", str(out)]) == 3
    assert model_runs == {}
