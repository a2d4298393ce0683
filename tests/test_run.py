"""`label-audit run` and `reaudit` end to end on a slice of the real ReaL votes."""
from __future__ import annotations

import filecmp
import json
from pathlib import Path

import shutil

import pandas as pd

from tests.conftest import N_RATED, N_UNRATED

from pipelines import cli, reaudit, release, run
from pipelines.config import load_config
from pipelines.store import Store

def test_run_writes_release_and_report_then_rerun_recomputes_nothing(real_slice, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", str(real_slice / "audit.yaml"), "--out", str(out)]) == 0
    version = out / "tfds" / "real_slice_audit" / "1.0.0"
    counts = json.loads((version / "counts.json").read_text())
    assert counts["images"] == N_RATED + N_UNRATED
    assert counts["votes_quarantined"] == 0
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["inputs"]["stages.votes.paths[0]"]["sha256"]
    table = release.read_release(version)
    unrated = table[table["score_labels"].map(len) == 0]
    assert len(unrated) == N_UNRATED
    assert all(len(s) == 1 for s in unrated["real_label"])  # original label kept
    report = json.loads((out / "report" / "report.json").read_text())
    agreement = report["run"]["agreement_with_published"]
    assert agreement["question_agreement"] > 0.95
    assert (out / "report" / "index.html").read_text().startswith("<!DOCTYPE html>")

    config = load_config(real_slice / "audit.yaml", output_dir=str(out))
    state = run.execute(config, echo=lambda *a, **k: None)
    assert state.store.computed == [] and state.computed == []
    assert state.release_status == "unchanged"
    # Nothing changed: reaudit says so with exit code 3 and writes no version.
    assert cli.main(["reaudit", str(real_slice / "audit.yaml"), "--out", str(out)]) == reaudit.EXIT_UNCHANGED
    assert release.released_versions(out, "real_slice_audit") == ["1.0.0"]


def test_reaudit_with_new_votes_writes_a_major_version_with_a_diff(real_slice, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["run", str(real_slice / "audit.yaml"), "--out", str(out)]) == 0
    config_text = (real_slice / "audit.yaml").read_text().replace(
        "paths: [votes_first.csv]", "paths: [votes_first.csv, votes_later.csv]")
    (real_slice / "audit_more_votes.yaml").write_text(config_text)
    code = cli.main(["reaudit", str(real_slice / "audit_more_votes.yaml"), "--out", str(out)])
    assert code == reaudit.EXIT_NEW_VERSION
    # Label sets changed: existing records changed, a new MAJOR version (TFDS semantics).
    assert release.released_versions(out, "real_slice_audit") == ["1.0.0", "2.0.0"]
    new = out / "tfds" / "real_slice_audit" / "2.0.0"
    diff = json.loads((new / "diff.json").read_text())
    assert diff["from_version"] == "1.0.0" and diff["to_version"] == "2.0.0"
    assert diff["images_changed"] == len(diff["changed"]) > 0
    notes = (new / "RELEASE_NOTES.md").read_text()
    assert "## 2.0.0" in notes and "## 1.0.0" in notes and "votes changed" in notes
    old_sets = dict(zip(*release.read_release(out / "tfds/real_slice_audit/1.0.0")[["file_name", "real_label"]]
                        .T.values))
    new_sets = dict(zip(*release.read_release(new)[["file_name", "real_label"]].T.values))
    changed = {f for f in old_sets if list(old_sets[f]) != list(new_sets[f])}
    assert changed == {c["file_name"] for c in diff["changed"]}
    # The earlier votes were kept: every vote of 1.0.0 is still used, merged with the new file.
    first, second = (pd.read_csv(real_slice / name) for name in ("votes_first.csv", "votes_later.csv"))
    key = json.loads((new / "manifest.json").read_text())["stage_keys"]["votes"]
    used = pd.read_parquet(Store(out / "store").path("votes", key) / "votes.parquet")
    summary = json.loads((Store(out / "store").path("votes", key) / "summary.json").read_text())
    assert summary["carried_over"] == len(first) and summary["votes_used"] == len(first) + len(second)
    columns = ["file_name", "label", "rater_id", "answer"]
    merged = used[columns].astype(str).merge(first[columns].astype(str), how="inner")
    assert len(merged) == len(first)
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["run"]["diff"]["to_version"] == "2.0.0"
    # Running the newer config again changes nothing.
    assert cli.main(["reaudit", str(real_slice / "audit_more_votes.yaml"), "--out", str(out)]) == 3


def test_same_inputs_give_byte_identical_release_files(real_slice, tmp_path):
    for name in ("a", "b"):
        assert cli.main(["run", str(real_slice / "audit.yaml"), "--out", str(tmp_path / name)]) == 0
    first = tmp_path / "a" / "tfds" / "real_slice_audit" / "1.0.0"
    second = tmp_path / "b" / "tfds" / "real_slice_audit" / "1.0.0"
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(first, second, files, shallow=False)
    assert mismatch == [] and errors == [], mismatch


def test_config_errors_exit_2_with_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: o\nstages: {aggregate: {method: vote}}\n")
    assert cli.main(["run", str(bad)]) == 2
    assert "stages.aggregate.method" in capsys.readouterr().err


def test_votes_about_images_outside_the_dataset_make_no_label_set(real_slice, tmp_path):
    labels = pd.read_csv(real_slice / "labels.tsv", sep="\t")
    votes = pd.read_csv(real_slice / "votes_first.csv")
    dropped = sorted(set(votes["file_name"]))[0]
    labels[labels["file_name"] != dropped].to_csv(tmp_path / "labels.tsv", sep="\t", index=False)
    shutil.copy(real_slice / "votes_first.csv", tmp_path / "votes_first.csv")
    (tmp_path / "audit.yaml").write_text((real_slice / "audit.yaml").read_text())
    assert cli.main(["run", str(tmp_path / "audit.yaml"), "--out", str(tmp_path / "out")]) == 0
    version = tmp_path / "out" / "tfds" / "real_slice_audit" / "1.0.0"
    counts = json.loads((version / "counts.json").read_text())
    assert counts["images"] == N_RATED + N_UNRATED - 1 == len(release.read_release(version))
    assert counts["rated_images_not_in_dataset"] == 1


def test_reaudit_refuses_when_earlier_votes_are_gone(real_slice, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", str(real_slice / "audit.yaml"), "--out", str(out)]) == 0
    shutil.rmtree(out / "store" / "votes")
    (tmp_path / "more.yaml").write_text((real_slice / "audit.yaml").read_text().replace(
        "paths: [votes_first.csv]", f"paths: [{real_slice}/votes_later.csv]").replace(
        "labels.tsv", f"{real_slice}/labels.tsv"))
    assert cli.main(["reaudit", str(tmp_path / "more.yaml"), "--out", str(out)]) == 2
    assert "missing from the store" in capsys.readouterr().err
    assert release.released_versions(out, "real_slice_audit") == ["1.0.0"]


def test_a_corrected_vote_file_wins_over_the_carried_vote(real_slice, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["run", str(real_slice / "audit.yaml"), "--out", str(out)]) == 0
    first_run = set((out / "store" / "votes").iterdir())
    votes = pd.read_csv(real_slice / "votes_first.csv")
    # A rater's "yes" on a question becomes "no" in the re-exported file.
    row = votes.index[votes["answer"] == "yes"][0]
    votes.loc[row, "answer"] = "no"
    votes.to_csv(tmp_path / "votes_corrected.csv", index=False)
    (tmp_path / "fixed.yaml").write_text((real_slice / "audit.yaml").read_text().replace(
        "paths: [votes_first.csv]", "paths: [votes_corrected.csv]").replace(
        "labels.tsv", f"{real_slice}/labels.tsv"))
    assert cli.main(["reaudit", str(tmp_path / "fixed.yaml"), "--out", str(out)]) == 0
    # The re-audit's votes: the stored output the first run did not make (both hold as
    # many votes, the corrected one replacing the carried one).
    (reaudited,) = set((out / "store" / "votes").iterdir()) - first_run
    newest = pd.read_parquet(reaudited / "votes.parquet")
    key = votes.loc[row, ["file_name", "label", "rater_id"]]
    used = newest[(newest["file_name"] == key["file_name"]) & (newest["label"] == key["label"])
                  & (newest["rater_id"].astype(str) == str(key["rater_id"]))]
    assert used["answer"].astype(str).tolist() == ["no"]
