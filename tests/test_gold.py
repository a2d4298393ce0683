"""Gold readers: the ReaL npz files, the long formats (CSV / JSONL / Parquet) made from
them, the counted quarantine of bad gold rows, and errors for unreadable files."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from auditing import gold, votes

# The 7 of the 85 ReaL raters without golden answers (SOURCES.md).
RATERS_WITHOUT_GOLD = {"111", "132", "134", "146", "153", "167", "189"}


@pytest.fixture(scope="session")
def real_gold_paths(shared_data) -> tuple[Path, Path]:
    folder = shared_data / "reassessed_imagenet"
    return folder / "golden.npz", folder / "raters_golden.npz"


# Cached by path: the fixtures below are imported by other test modules, where pytest
# would otherwise read the real files once per module.
@functools.lru_cache(maxsize=1)
def _read_kept(path: str) -> pd.DataFrame:
    return votes.read_real_votes(path).kept


@functools.lru_cache(maxsize=1)
def _read_gold(experts: str, raters: str, votes_path: str) -> gold.Gold:
    return gold.read_real_gold(experts, raters, known_raters=set(_read_kept(votes_path)["rater_id"]))


@pytest.fixture(scope="session")
def real_kept(real_raters_path) -> pd.DataFrame:
    return _read_kept(str(real_raters_path))


@pytest.fixture(scope="session")
def real_gold(real_gold_paths, real_raters_path) -> gold.Gold:
    return _read_gold(str(real_gold_paths[0]), str(real_gold_paths[1]), str(real_raters_path))


def test_real_gold_npz(real_gold, real_kept):
    questions = real_gold.questions
    assert len(questions) == 1135 and questions["file_name"].nunique() == 155
    assert (questions["experts"] == 5).all()
    assert int(questions["truth"].sum()) == 248  # >= 3 of 5 experts (issue 11)
    assert int(real_gold.truth(gold.PresenceRule(min_yes=2, of=5))["truth"].sum()) == 303
    # Any threshold on the experts' yes-share in (0.4, 0.6] gives the same split: no 2.5 of 5.
    assert real_gold.truth(gold.PresenceRule(min_yes=3, of=5))["truth"].equals(questions["truth"])
    summary = real_gold.summary
    assert summary.read == {"truth": 0, "experts": 5 * 1135, "raters": 78 * 1135}
    assert summary.kept == summary.read and not len(real_gold.quarantine)
    raters = set(real_gold.rater_votes["rater_id"])
    assert len(raters) == 78 and raters | RATERS_WITHOUT_GOLD == set(real_kept["rater_id"])
    assert real_gold.rater_votes.groupby("rater_id").size().eq(1135).all()
    votes.check_votes(real_gold.rater_votes)
    # Every golden question was also put to the crowd (raters.npz).
    asked = pd.MultiIndex.from_frame(real_kept[["file_name", "label"]])
    assert pd.MultiIndex.from_frame(questions[["file_name", "label"]]).isin(asked).all()


def _write_long(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.astype(object).to_dict("records")))
    else:
        frame.to_parquet(path, index=False)
    return path


def _long_files(real_gold_paths, tmp_path, suffix):
    experts_raw = votes.read_real_raters_raw(real_gold_paths[0])
    raters_raw = votes.read_real_raters_raw(real_gold_paths[1])
    columns = list(votes.REQUIRED_COLUMNS)
    experts = _write_long(experts_raw[columns].astype({"answer": str}), tmp_path / f"experts{suffix}")
    raters = _write_long(raters_raw[columns].astype({"answer": str}), tmp_path / f"raters{suffix}")
    return experts, raters


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_long_formats_give_the_npz_gold(real_gold_paths, real_gold, tmp_path, suffix):
    experts, raters = _long_files(real_gold_paths, tmp_path, suffix)
    from_experts = gold.read_gold(experts=experts, raters=raters, rule=gold.REAL_RULE)
    pd.testing.assert_frame_equal(from_experts.questions, real_gold.questions)
    pd.testing.assert_frame_equal(from_experts.rater_votes, real_gold.rater_votes)
    # The truth given directly: file_name, label, truth.
    truth = _write_long(real_gold.truth().astype({"truth": str if suffix == ".csv" else bool}),
                        tmp_path / f"truth{suffix}")
    from_truth = gold.read_gold(truth=truth, raters=raters)
    assert from_truth.rule is None and from_truth.summary.read["truth"] == 1135
    pd.testing.assert_frame_equal(from_truth.truth(), real_gold.truth())
    assert (from_truth.questions["yes"] == -1).all()
    with pytest.raises(ValueError, match="given directly; the rule '>= 2 of 5 experts said yes' needs"):
        from_truth.truth(gold.PresenceRule(min_yes=2, of=5))


def test_bad_gold_rows_are_quarantined_with_reasons(real_gold_paths, tmp_path):
    experts, raters = _long_files(real_gold_paths, tmp_path, ".csv")
    expert_rows = pd.read_csv(experts, dtype=str)
    # Question 1 (the first five rows) loses one expert: 4 of 5 answered.
    expert_rows = expert_rows.drop(index=expert_rows.index[(expert_rows["file_name"] == expert_rows.loc[0, "file_name"])
                                                          & (expert_rows["label"] == expert_rows.loc[0, "label"])][:1])
    expert_rows.to_csv(experts, index=False)
    rater_rows = pd.read_csv(raters, dtype=str)
    n_raters = len(rater_rows)
    first = rater_rows.iloc[1]  # the second question (the first is no longer gold)
    extra = pd.DataFrame([
        {"file_name": first["file_name"], "label": "999", "rater_id": first["rater_id"], "answer": "yes"},  # no truth
        {"file_name": first["file_name"], "label": first["label"], "rater_id": "7777", "answer": "no"},  # unknown rater
        {"file_name": first["file_name"], "label": first["label"], "rater_id": first["rater_id"], "answer": "no"},  # dup
        {"file_name": first["file_name"], "label": first["label"], "rater_id": "190", "answer": "sure"},  # bad answer
    ])
    pd.concat([rater_rows, extra]).to_csv(raters, index=False)
    known = set(rater_rows["rater_id"]) | {"190"}
    result = gold.read_gold(experts=experts, raters=raters, known_raters=known)
    q = result.quarantine
    by_part = {part: dict(zip(q.loc[q["part"] == part, "row"], q.loc[q["part"] == part, "reason"]))
               for part in gold.PARTS}
    assert list(by_part["experts"].values()) == ["expert_count"] * 4  # the question's 4 remaining votes
    assert "4 experts answered this question" in q.loc[q["part"] == "experts", "detail"].iloc[0]
    extra_reasons = {row: why for row, why in by_part["raters"].items() if row > n_raters}
    assert extra_reasons == {n_raters + 1: "unknown_gold_question", n_raters + 2: "unknown_rater",
                             n_raters + 3: "duplicate_vote", n_raters + 4: "unknown_answer"}
    # The 78 raters' answers on the question that lost its gold truth.
    assert sorted(set(by_part["raters"].values()) - {"unknown_rater", "duplicate_vote", "unknown_answer"}) == [
        "unknown_gold_question"] and len(by_part["raters"]) == 78 + 4
    assert set(q.loc[q["part"] == "raters", "source"]) == {str(raters)}
    summary = result.summary
    for part in gold.PARTS:
        assert summary.read[part] == summary.kept[part] + sum(summary.quarantined[part].values())
    assert summary.read["raters"] == n_raters + 4 and summary.kept["raters"] == n_raters - 78
    assert summary.quarantined["raters"] == {"unknown_gold_question": 79, "unknown_rater": 1, "duplicate_vote": 1,
                                             "unknown_answer": 1}
    assert len(result.questions) == 1134  # the question with 4 experts is not gold
    assert len(result.rater_votes) == n_raters - 78  # ... and the 78 answers on it are quarantined


def test_bad_truth_rows_are_quarantined(tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_text("file_name,label,truth\n"
                     "a.JPEG,1,yes\n"        # 1 kept
                     "a.JPEG,2,perhaps\n"    # 2 unknown truth
                     "a.JPEG,1,no\n"         # 3 duplicate question
                     "a.JPEG,1000,yes\n"     # 4 label outside [0, 1000)
                     ",3,yes\n"              # 5 missing file name
                     "b.JPEG,4,Absent\n")    # 6 kept
    raters = tmp_path / "raters.csv"
    raters.write_text("file_name,label,rater_id,answer\na.JPEG,1,r1,yes\nb.JPEG,4,r1,no\na.JPEG,2,r1,no\n")
    result = gold.read_gold(truth=truth, raters=raters)
    assert result.truth().values.tolist() == [["a.JPEG", 1, True], ["b.JPEG", 4, False]]
    q = result.quarantine
    truth_rows = q.loc[q["part"] == "truth"]
    assert dict(zip(truth_rows["row"], truth_rows["reason"])) == {
        2: "unknown_truth", 3: "duplicate_question", 4: "unknown_label", 5: "missing_field"}
    reasons = q.groupby("part")["reason"].apply(list).to_dict()
    assert sorted(reasons["truth"]) == ["duplicate_question", "missing_field", "unknown_label", "unknown_truth"]
    assert reasons["raters"] == ["unknown_gold_question"]  # a.JPEG/2 has no gold truth (its row was bad)
    assert q.loc[q["reason"] == "unknown_truth", "truth"].tolist() == ["perhaps"]
    assert result.summary.read == {"truth": 6, "experts": 0, "raters": 3}


@pytest.mark.parametrize("name, text, kwargs, expected", [
    ("truth.csv", "file_name,label\na,1\n", "truth", r"truth\.csv: the gold truth file lacks the field\(s\) \['truth'\]"),
    ("truth.txt", "x", "truth", r"truth\.txt: cannot tell the gold truth format from the suffix '\.txt'"),
    ("experts.npz", "not an npz", "experts", r"gold experts: .*experts\.npz: not a readable ReaL npz"),
    ("raters.csv", "file_name,label\n", "raters", r"gold raters: .*raters\.csv: the CSV header lacks"),
])
def test_unreadable_gold_files_raise_errors_naming_the_file(tmp_path, name, text, kwargs, expected):
    path = tmp_path / name
    path.write_text(text)
    good_truth = tmp_path / "good_truth.csv"
    good_truth.write_text("file_name,label,truth\na,1,yes\n")
    good_raters = tmp_path / "good_raters.csv"
    good_raters.write_text("file_name,label,rater_id,answer\na,1,r,yes\n")
    args = {"truth": good_truth, "raters": good_raters}
    if kwargs == "experts":
        args = {"experts": path, "raters": good_raters}
    else:
        args[kwargs] = path
    with pytest.raises(gold.GoldFileError, match=expected):
        gold.read_gold(**args)
    with pytest.raises(gold.GoldFileError, match="no such gold truth file"):
        gold.read_gold(truth=tmp_path / "missing.csv", raters=good_raters)


def test_presence_rule_is_checked():
    with pytest.raises(ValueError, match="min_yes=6 cannot exceed of=5"):
        gold.PresenceRule(min_yes=6, of=5)
    with pytest.raises(ValueError, match="extra"):
        gold.PresenceRule(min_yes=2, of=5, share=0.5)
    assert gold.REAL_RULE.present(np.array([2, 3])).tolist() == [False, True]


def test_gold_subset_by_image(real_gold):
    images = real_gold.images[:10]
    inside, outside = real_gold.subset(images), real_gold.subset(images, keep=False)
    assert len(inside.questions) + len(outside.questions) == 1135
    assert set(inside.rater_votes["file_name"]) == set(images)
    assert not set(outside.questions["file_name"]) & set(images)
