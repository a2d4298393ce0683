"""The stage graph on hand-built tiny cases: each stage module, the runner's plan and
its re-use of stored outputs, and `label-audit explain`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import cli, run
from pipelines.config import load_config
from pipelines.stages import StageError
from pipelines.stages.aggregate import read_label_sets, read_scores
from pipelines.stages.dataset import original_labels
from pipelines.stages.propose import read_proposals
from pipelines.stages.tasks import read_tasks
from pipelines.stages.votes import read_votes

QUIET = dict(echo=lambda *a, **k: None)
# Four images; three raters. "a" clearly shows class 1 and class 7; "b" only class 2;
# "c" is unrated and keeps its original label; "d" gets only "no" answers.
LABELS = "file_name\tlabel\na.jpg\t1\nb.jpg\t2\nc.jpg\t3\nd.jpg\t4\n"
VOTES = [("a.jpg", 1, r, "yes") for r in "xyz"] + [("a.jpg", 7, r, "yes") for r in "xyz"] + \
        [("b.jpg", 2, r, "yes") for r in "xyz"] + [("b.jpg", 9, r, "no") for r in "xyz"] + \
        [("d.jpg", 4, r, "no") for r in "xyz"]


def write_case(root: Path, stages: str, votes=VOTES) -> Path:
    (root / "labels.tsv").write_text(LABELS)
    pd.DataFrame(votes, columns=["file_name", "label", "rater_id", "answer"]).to_csv(root / "votes.csv", index=False)
    (root / "audit.yaml").write_text(f"output_dir: out\ndataset: {{original_labels: labels.tsv}}\nstages:\n{stages}")
    return root / "audit.yaml"


VOTES_AND_AGGREGATE = """  votes: {paths: [votes.csv]}
  aggregate: {method: majority-vote, threshold: 0.5}
"""


def test_dataset_votes_and_aggregate_stages_on_a_hand_built_case(tmp_path):
    result = run.execute(load_config(write_case(tmp_path, VOTES_AND_AGGREGATE)), **QUIET)
    assert result.computed == ["dataset", "votes", "aggregate"]
    art = result.artifacts
    assert original_labels(art["dataset"])["label"].tolist() == [1, 2, 3, 4]
    assert len(read_votes(art["votes"])) == len(VOTES) == art["votes"].counts["votes_used"]
    assert read_label_sets(art["label_sets"]) == {"a.jpg": {1, 7}, "b.jpg": {2}, "c.jpg": {3}, "d.jpg": set()}
    scores = read_scores(art["label_sets"]).set_index(["file_name", "label"])["score"]
    assert scores[("a.jpg", 7)] == 1.0 and scores[("b.jpg", 9)] == 0.0
    assert art["label_sets"].counts["empty_sets"] == 1 and art["label_sets"].counts["labels"] == 4


def test_rerun_reuses_and_a_changed_parameter_reruns_only_downstream_stages(tmp_path):
    config_path = write_case(tmp_path, VOTES_AND_AGGREGATE + "  report: {}\n")
    assert run.execute(load_config(config_path), **QUIET).computed == ["dataset", "votes", "aggregate", "report"]
    assert run.execute(load_config(config_path), **QUIET).computed == []
    config_path.write_text(config_path.read_text().replace("threshold: 0.5", "threshold: 0.9"))
    assert run.execute(load_config(config_path), **QUIET).computed == ["aggregate", "report"]
    # A changed vote file changes the votes stage and everything after it, not the dataset.
    write_case(tmp_path, VOTES_AND_AGGREGATE.replace("0.5", "0.9") + "  report: {}\n",
               votes=VOTES + [("c.jpg", 3, "x", "yes")])
    assert run.execute(load_config(config_path), **QUIET).computed == ["votes", "aggregate", "report"]
    assert (tmp_path / "out" / "report" / "index.html").is_file()


def test_explain_says_which_parameter_or_input_changed(tmp_path, capsys):
    config_path = write_case(tmp_path, VOTES_AND_AGGREGATE)
    run.execute(load_config(config_path), **QUIET)
    config_path.write_text(config_path.read_text().replace("threshold: 0.5", "threshold: 0.9"))
    run.execute(load_config(config_path), **QUIET)
    assert cli.main(["explain", str(tmp_path / "out"), "aggregate"]) == 0
    out = capsys.readouterr().out
    assert "2 stored output(s) of aggregate" in out
    assert "re-ran because params.threshold: 0.5 -> 0.9" in out
    key = json.loads(next((tmp_path / "out" / "store" / "aggregate").glob("*/_key.json")).read_text())
    assert set(key) == {"stage", "key", "inputs", "params", "version"} and set(key["inputs"]) == {"dataset", "votes"}
    assert cli.main(["explain", str(tmp_path / "out"), "nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err


def test_a_new_stage_version_recomputes_that_stage_and_what_follows(tmp_path, capsys, monkeypatch):
    from pipelines.stages.aggregate import AggregateStage

    config_path = write_case(tmp_path, VOTES_AND_AGGREGATE + "  report: {}\n")
    run.execute(load_config(config_path), **QUIET)
    # Code whose computation changed (a bumped version) does not reuse what older code stored.
    monkeypatch.setattr(AggregateStage, "version", AggregateStage.version + 1)
    assert run.execute(load_config(config_path), **QUIET).computed == ["aggregate", "report"]
    assert cli.main(["explain", str(tmp_path / "out"), "aggregate"]) == 0
    assert f"re-ran because version: 1 -> {AggregateStage.version}" in capsys.readouterr().out


def test_a_stage_without_its_inputs_fails_before_anything_runs(tmp_path, capsys):
    config_path = write_case(tmp_path, "  tasks: {}\n  votes: {paths: [votes.csv]}\n")
    with pytest.raises(StageError, match="stages.tasks needs proposals"):
        run.plan(load_config(config_path))
    assert cli.main(["run", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert "stages.tasks needs proposals" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_label_sets_given_as_a_file_replace_the_aggregate_stage(tmp_path):
    config_path = write_case(tmp_path, "  report: {}\n")
    (tmp_path / "sets.json").write_text(json.dumps({"a.jpg": [1, 7], "b.jpg": [2], "c.jpg": [3], "d.jpg": []}))
    config_path.write_text(config_path.read_text() + "inputs: {label_sets: sets.json}\n")
    result = run.execute(load_config(config_path), **QUIET)
    assert result.computed == ["dataset", "report"]
    assert read_label_sets(result.artifacts["label_sets"])["a.jpg"] == {1, 7}
    assert read_scores(result.artifacts["label_sets"]) is None
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["summary"]["labels"] == 4


def _predictions(path: Path, logits: np.ndarray) -> str:
    np.savez(path, file_names=np.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]), logits=logits.astype(np.float32))
    return str(path)


def test_predictions_subset_selection_proposals_and_tasks_on_a_hand_built_case(tmp_path):
    """Two 'models' whose logits are written by hand: model `good` ranks each image's
    true classes first; `bad` ranks class 0 first everywhere."""
    good, bad = np.full((4, 10), -5.0), np.full((4, 10), -5.0)
    for row, classes in enumerate([(1, 7), (2,), (3,), (4,)]):
        good[row, list(classes)] = [5.0 - i for i in range(len(classes))]
    bad[:, 0] = 5.0
    _predictions(tmp_path / "good.npz", good)
    _predictions(tmp_path / "bad.npz", bad)
    (tmp_path / "gold.json").write_text(json.dumps({"a.jpg": [1, 7], "b.jpg": [2], "c.jpg": [3], "d.jpg": [4]}))
    config_path = write_case(tmp_path, """  predict: {predictions: {good: good.npz, bad: bad.npz}}
  select_subset: {gold: gold.json, recall_target: 0.9}
  propose: {top_n: 8}
  tasks: {max_labels: 8}
""")
    result = run.execute(load_config(config_path), **QUIET)
    assert result.computed == ["dataset", "predict", "select_subset", "propose", "tasks"]
    art = result.artifacts
    assert art["selection"].counts["selected_models"] == ["good"]
    proposals = read_proposals(art["proposals"])
    assert not any(s.startswith("bad:") for sources in proposals["sources"] for s in sources)
    assert {(f, int(l)) for f, l in zip(proposals["file_name"], proposals["label"])} >= {("a.jpg", 7)}
    # Every image's top-1 (of the chosen model) is its original label: nothing to ask.
    tasks = read_tasks(art["tasks"])
    assert len(tasks) == 0 and art["tasks"].counts["images_skipped_all_top1_agree"] == 4


def test_the_beam_engine_gives_the_in_memory_scores(real_slice, tmp_path):
    """Dawid-Skene over vote shards in Beam equals crowd-kit in memory (within the EM
    tolerance) on the real slice's ReaL votes."""
    config = (real_slice / "audit.yaml").read_text()
    (real_slice / "audit_beam.yaml").write_text(config.replace(
        "aggregate: {method: dawid-skene, threshold: 0.8}",
        "aggregate: {method: dawid-skene, threshold: 0.8, engine: beam, votes_per_shard: 2000}"))
    memory = run.execute(load_config(real_slice / "audit.yaml", output_dir=str(tmp_path / "m")), target="aggregate", **QUIET)
    beam = run.execute(load_config(real_slice / "audit_beam.yaml", output_dir=str(tmp_path / "b")), target="aggregate",
                       **QUIET)
    assert beam.artifacts["label_sets"].counts["engine"] == "beam"
    a = read_scores(memory.artifacts["label_sets"]).set_index(["file_name", "label"])["score"].sort_index()
    b = read_scores(beam.artifacts["label_sets"]).set_index(["file_name", "label"])["score"].sort_index()
    assert a.index.equals(b.index)
    assert np.abs(a.to_numpy() - b.to_numpy()).max() < 1e-4
    assert read_label_sets(memory.artifacts["label_sets"]) == read_label_sets(beam.artifacts["label_sets"])
