"""The re-audit rules (auditing/reaudit.py) and version semantics (auditing/versions.py)."""
from __future__ import annotations

import pandas as pd
from auditing import reaudit, versions


def test_asked_pairs_are_the_scored_questions_of_a_release():
    table = pd.DataFrame({"file_name": ["a", "b", "c"], "score_labels": [[1, 7], [], [3]]})
    asked = reaudit.asked_pairs(table)
    assert sorted(zip(asked["file_name"], asked["label"])) == [("a", 1), ("a", 7), ("c", 3)]


def test_only_never_asked_pairs_are_asked_again():
    proposals = pd.DataFrame({"file_name": ["a", "a", "b", "c"], "label": [1, 2, 5, 3], "count": [4, 3, 2, 1]})
    asked = pd.DataFrame({"file_name": ["a", "c", "z"], "label": [1, 3, 9]})
    left = reaudit.unasked(proposals, asked)
    assert list(zip(left["file_name"], left["label"], left["count"])) == [("a", 2, 3), ("b", 5, 2)]


def test_an_earlier_source_wins_and_a_repeated_vote_counts_once():
    new = pd.DataFrame({"file_name": ["a", "a"], "label": [1, 2], "rater_id": ["r", "r"], "answer": ["no", "yes"]})
    carried = pd.DataFrame({"file_name": ["a", "a", "b"], "label": [1, 2, 1], "rater_id": ["r", "r", "s"],
                            "answer": ["yes", "yes", "maybe"]})
    merged = reaudit.merge_votes([new, carried])
    assert list(merged["answer"]) == ["no", "yes", "maybe"]  # the corrected "no" wins
    assert len(merged) == 3


def test_version_change_follows_tfds_semantics():
    old = pd.DataFrame({"file_name": ["a", "b"], "real_label": [[1], [2, 3]], "scores": [[0.9], [0.95, 0.81]]})
    assert versions.version_change(old, old.copy()) == "patch"
    assert versions.version_change(old, old.assign(flag=[False, True])) == "minor"
    changed = old.copy()
    changed.at[1, "real_label"] = [2]
    assert versions.version_change(old, changed) == "major"
    assert versions.version_change(old, old.iloc[:1]) == "major"
    assert versions.version_change(old, old.drop(columns=["scores"])) == "major"


def test_unasked_is_the_anti_join_a_merge_gives():
    import numpy as np

    rng = np.random.default_rng(0)
    names = np.array(["a", "b", "c", None, "d"], dtype=object)
    proposals = pd.DataFrame({"file_name": names[rng.integers(0, 5, 300)], "label": rng.integers(0, 4, 300),
                              "count": np.arange(300)}, index=np.arange(300) * 3)
    asked = pd.DataFrame({"file_name": names[rng.integers(0, 5, 40)], "label": rng.integers(0, 4, 40)})
    merged = proposals[["file_name", "label"]].merge(asked.drop_duplicates(), on=["file_name", "label"],
                                                     how="left", indicator=True)
    expected = proposals[(merged["_merge"] == "left_only").to_numpy()]
    assert 0 < len(expected) < len(proposals)
    pd.testing.assert_frame_equal(reaudit.unasked(proposals, asked), expected)
    # Categorical file names (the votes' and tasks' readers) give the same pairs.
    as_categories = proposals.astype({"file_name": "category"})
    assert reaudit.unasked(as_categories, asked).index.tolist() == expected.index.tolist()
