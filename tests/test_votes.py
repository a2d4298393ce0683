"""Vote readers and the counted quarantine: hand-built files and the real ReaL votes."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from auditing import votes


def _csv(tmp_path, text, name="votes.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_case_insensitive_answers_and_task_id_carried(tmp_path):
    path = _csv(tmp_path, "task_id,file_name,label,rater_id,answer\n"
                          "t1,a.JPEG,3,r1,YES\nt1,a.JPEG,4,r1, Maybe\nt2,b.JPEG,3,r2,no\n")
    kept, quarantine = votes.validate_votes(votes.read_votes(path), source=path)
    assert quarantine.empty
    assert kept["answer"].tolist() == ["yes", "maybe", "no"]
    assert kept["task_id"].tolist() == ["t1", "t1", "t2"]
    assert kept["label"].dtype == np.int64
    votes.check_votes(kept)


def test_quarantine_reasons_rows_and_counts(tmp_path):
    path = _csv(tmp_path, "file_name,label,rater_id,answer\n"
                          "a.JPEG,3,r1,yes\n"       # 1 kept
                          "a.JPEG,3,r1,no\n"        # 2 duplicate of row 1
                          "a.JPEG,1000,r1,yes\n"    # 3 label outside [0, 1000)
                          "a.JPEG,-1,r1,yes\n"      # 4 label outside
                          "a.JPEG,x7,r1,yes\n"      # 5 unparsable label
                          "a.JPEG,5,,yes\n"         # 6 empty rater
                          "a.JPEG,6,r1,probably\n"  # 7 answer outside the vocabulary
                          ",7,r1,yes\n"             # 8 missing file name
                          "a.JPEG,,r1,yes\n"        # 9 missing label
                          "b.JPEG,3,r1,no\n")       # 10 kept
    result = votes.validate_votes(votes.read_votes(path), source=path)
    kept, quarantine = result
    assert kept[["file_name", "label", "rater_id"]].values.tolist() == [["a.JPEG", 3, "r1"], ["b.JPEG", 3, "r1"]]
    assert kept["answer"].tolist() == ["yes", "no"]  # the first of the duplicates is kept
    assert dict(zip(quarantine["row"], quarantine["reason"])) == {
        2: "duplicate_vote", 3: "unknown_label", 4: "unknown_label", 5: "unparsable_label",
        6: "empty_rater_id", 7: "unknown_answer", 8: "missing_field", 9: "missing_field"}
    assert set(quarantine["source"]) == {str(path)}
    assert "'probably'" in quarantine.loc[quarantine["row"] == 7, "detail"].item()
    summary = result.summary
    assert summary.read == 10 == summary.kept + summary.quarantined_total
    assert summary.quarantined["unknown_label"] == 2 and summary.quarantined["missing_field"] == 2


def test_jsonl_bad_line_is_quarantined_not_fatal(tmp_path):
    path = tmp_path / "votes.jsonl"
    lines = [json.dumps({"task_id": "t1", "file_name": "a.JPEG", "label": 3, "rater_id": "r1", "answer": "Yes"}),
             "{not json",
             "",
             json.dumps({"file_name": "a.JPEG", "label": "4", "answer": "no"})]  # no rater_id
    path.write_text("\n".join(lines) + "\n")
    kept, quarantine = votes.validate_votes(votes.read_votes(path), source=path)
    assert kept[["label", "answer", "task_id"]].values.tolist() == [[3, "yes", "t1"]]
    assert dict(zip(quarantine["row"], quarantine["reason"])) == {2: "missing_field", 4: "empty_rater_id"}


def test_parquet_and_several_files_find_cross_file_duplicates(tmp_path):
    frame = pd.DataFrame({"file_name": ["a.JPEG", "b.JPEG"], "label": [1, 2], "rater_id": ["r1", "r1"],
                          "answer": ["no", "yes"]})
    frame.to_parquet(tmp_path / "one.parquet")
    _csv(tmp_path, "file_name,label,rater_id,answer\nb.JPEG,2,r1,no\nc.JPEG,2,r1,no\n", "two.csv")
    result = votes.read_and_validate([tmp_path / "one.parquet", tmp_path / "two.csv"])
    assert result.kept["file_name"].tolist() == ["a.JPEG", "b.JPEG", "c.JPEG"]
    assert result.quarantine[["source", "row", "reason"]].values.tolist() == [
        [str(tmp_path / "two.csv"), 1, "duplicate_vote"]]


@pytest.mark.parametrize("name, text, expected", [
    ("v.csv", "file_name,label,answer\na,1,yes\n", r"v\.csv: the CSV header lacks the field\(s\) \['rater_id'\]"),
    ("v.csv", "file_name,label,rater_id,answer\na,1,r,yes\na,2,r,yes,extra,more\n", r"v\.csv: not a readable CSV.*line 3"),
    ("v.txt", "", r"cannot tell the vote format from the suffix '\.txt'"),
    ("v.npz", "not an npz", r"v\.npz: not a readable ReaL npz"),
])
def test_unparsable_files_raise_errors_naming_file_and_field(tmp_path, name, text, expected):
    path = _csv(tmp_path, text, name)
    with pytest.raises(votes.VoteFileError, match=expected):
        votes.read_votes(path)


def test_npz_reader_on_a_hand_built_tensor_quarantines_non_one_hot(tmp_path):
    tensor = np.zeros((2, 3, 3))
    tensor[0, 0, 2] = 1  # rater 7: yes on q0
    tensor[1, 0, 0] = 1  # rater 9: no on q0
    tensor[1, 2, [1, 2]] = 1  # rater 9: maybe AND yes on q2 -> quarantined
    info = np.array([["x.JPEG", "5"], ["x.JPEG", "6"], ["y.JPEG", "5"]])
    np.savez(tmp_path / "r.npz", tensor=tensor, info=info, ids=np.array([7, 9]))
    kept, quarantine = votes.read_real_votes(tmp_path / "r.npz")
    assert kept[["file_name", "label", "rater_id", "answer"]].values.tolist() == [
        ["x.JPEG", 5, "7", "yes"], ["x.JPEG", 5, "9", "no"]]
    assert quarantine[["row", "reason", "rater_id"]].values.tolist() == [[3, "unknown_answer", "9"]]
    questions = votes.read_real_questions(tmp_path / "r.npz")
    assert questions.values.tolist() == [["x.JPEG", 5], ["x.JPEG", 6], ["y.JPEG", 5]]


@pytest.mark.parametrize("chunk_cells", [1, 2, 4, 1 << 16])
def test_npz_tensor_read_in_pieces_in_any_layout_and_dtype_gives_the_same_votes(tmp_path, monkeypatch,
                                                                                  chunk_cells):
    """The tensor is decompressed and scanned in pieces of ``_CHUNK_CELLS`` cells: the
    votes do not depend on where pieces end, nor on the tensor's order or dtype."""
    monkeypatch.setattr(votes, "_CHUNK_CELLS", chunk_cells)
    rng = np.random.default_rng(3)
    tensor = np.zeros((3, 5, 3))
    for rater, question in zip(*np.nonzero(rng.random((3, 5)) < 0.6)):
        tensor[rater, question, rng.integers(3)] = 1
    tensor[2, 4] = [1, 0, 1]  # not one-hot
    tensor[0, 1] = [0, 0, -0.0]  # no answer
    info = np.array([[f"{i % 2}.JPEG", str(i)] for i in range(5)])
    expected = None
    for name, array in (("float", tensor), ("fortran", np.asfortranarray(tensor)), ("uint8", tensor.astype(np.uint8))):
        np.savez_compressed(tmp_path / f"{name}.npz", tensor=array, info=info, ids=np.array([4, 5, 6]))
        raw = votes.read_real_raters_raw(tmp_path / f"{name}.npz").astype(object)
        answered = np.nonzero(tensor.any(axis=2))
        assert raw[["rater_id", "row"]].values.tolist() == [[str(4 + r), q + 1] for r, q in zip(*answered)]
        bad = raw["answer"].str.startswith("one-hot violated").to_numpy()
        assert raw.loc[bad, "row"].tolist() == [5]
        if expected is None:
            expected = raw.loc[~bad]
        pd.testing.assert_frame_equal(raw.loc[~bad], expected)
    assert raw.loc[bad, "answer"].tolist() == ["one-hot violated: [1,0,1]"]  # as the dtype prints


def test_write_quarantine_is_atomic_and_always_writes_a_header(tmp_path):
    out = votes.write_quarantine(None, tmp_path / "sub" / "quarantine.csv")
    assert out.read_text().strip() == ",".join(votes.QUARANTINE_COLUMNS)
    _, quarantine = votes.validate_votes(pd.DataFrame({"file_name": ["a"], "label": ["9999"], "rater_id": ["r"],
                                                       "answer": ["yes"]}), source="s.csv")
    votes.write_quarantine(quarantine, out)
    assert pd.read_csv(out)["reason"].tolist() == ["unknown_label"]
    assert [p.name for p in out.parent.iterdir()] == ["quarantine.csv"]  # no temp file left


def test_real_raters_read_complete(real_raters_path):
    result = votes.read_real_votes(real_raters_path)
    kept = result.kept
    assert result.summary.read == len(kept) == 924_810  # 184,962 questions x 5 raters
    assert kept["rater_id"].nunique() == 85
    assert kept.groupby(["file_name", "label"]).size().eq(5).all()
    with np.load(real_raters_path) as data:
        per_answer = data["tensor"].sum(axis=(0, 1))  # [no, maybe, yes], counted independently
    assert kept["answer"].value_counts().reindex(list(votes.ANSWERS)).tolist() == per_answer.tolist()
    votes.check_votes(kept)
    questions = votes.read_real_questions(real_raters_path)
    assert len(questions) == 184_962 and questions["file_name"].nunique() == 24_889
    # What the votes stage keeps (Categorical names and ids) is the same table.
    coded = votes.validate_votes(votes.read_real_raters_raw(real_raters_path), source=real_raters_path,
                                 categorical=True).kept
    assert isinstance(coded["file_name"].dtype, pd.CategoricalDtype)
    pd.testing.assert_frame_equal(coded.astype({"file_name": object, "rater_id": object}), kept)


def test_jsonl_without_optional_fields_has_no_optional_columns_and_provenance_is_kept(tmp_path):
    path = tmp_path / "votes.jsonl"
    path.write_text(json.dumps({"file_name": "a.JPEG", "label": 3, "rater_id": "r1", "answer": "yes"}) + "\n"
                    + json.dumps({"file_name": "a.JPEG", "label": 3, "rater_id": "r1", "answer": "no"}) + "\n")
    kept, quarantine = votes.validate_votes(votes.read_votes(path), source=path, provenance=True)
    assert list(kept.columns) == [*votes.REQUIRED_COLUMNS, "source", "row"]
    assert kept[["source", "row"]].values.tolist() == [[str(path), 1]]
    assert quarantine["row"].tolist() == [2]


def _messy_votes(tmp_path):
    """A CSV with every kind of bad row, duplicates across raters, padded strings and
    strings only quarantined rows have."""
    return votes.read_votes(_csv(tmp_path, "file_name,label,rater_id,answer,task_id\n"
                                           " a.JPEG,3,r1,yes,t1\n"
                                           "a.JPEG ,3,r1,no,t1\n"      # duplicate after stripping
                                           "a.JPEG,3,r2,no,t1\n"       # another rater: kept
                                           "z.JPEG,1000,r9,yes,t9\n"   # z / r9 only here: quarantined
                                           "b.JPEG,4, r2,maybe,t2\n"
                                           ",7,r1,yes,t3\n"
                                           "b.JPEG,4,r2 ,yes,t2\n"))   # duplicate of row 5


def test_categorical_kept_votes_hold_the_values_of_the_plain_ones(tmp_path):
    raw = _messy_votes(tmp_path)
    plain = votes.validate_votes(raw, source="s")
    coded = votes.validate_votes(raw, source="s", categorical=True)
    for column in ("file_name", "rater_id"):
        assert isinstance(coded.kept[column].dtype, pd.CategoricalDtype)
        # Categories are the kept votes' strings only (not z.JPEG / r9 of quarantined rows, nor "").
        assert sorted(coded.kept[column].cat.categories) == sorted(set(plain.kept[column]))
    pd.testing.assert_frame_equal(coded.kept.astype({"file_name": object, "rater_id": object}), plain.kept)
    pd.testing.assert_frame_equal(coded.quarantine, plain.quarantine)
    assert plain.quarantine["reason"].tolist() == ["duplicate_vote", "unknown_label", "missing_field",
                                                   "duplicate_vote"]


def test_duplicates_without_an_integer_key_are_found_the_same_way(tmp_path):
    """Code tuples too many for one int64 (here: a huge label range) fall back to
    DataFrame.duplicated, with the same first-kept rule."""
    raw = _messy_votes(tmp_path)
    assert votes.combined_key([np.zeros(1, np.int64)] * 3, [2**40, 2**20, 2**10]) is None
    huge = votes.validate_votes(raw, num_classes=2**62, source="s")
    usual = votes.validate_votes(raw, num_classes=10**4, source="s")
    pd.testing.assert_frame_equal(huge.kept, usual.kept)
    assert huge.quarantine["reason"].tolist() == ["duplicate_vote", "missing_field", "duplicate_vote"]


def test_combined_key_is_equal_exactly_where_the_tuples_are():
    rng = np.random.default_rng(0)
    sizes = [7, 1, 13]
    codes = [rng.integers(0, size, 500) for size in sizes]
    key = votes.combined_key(codes, sizes)
    tuples = list(zip(*(c.tolist() for c in codes)))
    assert len(set(key.tolist())) == len(set(tuples))
    assert pd.Index(key).duplicated().tolist() == pd.Index(tuples).duplicated().tolist()


def test_votes_table_of_categorical_votes_is_the_table_of_string_votes(tmp_path):
    """votes.parquet is the same file whether the kept votes' text columns are
    Categoricals or Python strings (read_votes and pd.read_parquet see the same)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.stages.votes import votes_table

    raw = _messy_votes(tmp_path)
    plain = votes.validate_votes(raw, source="s").kept
    coded = votes.validate_votes(raw, source="s", categorical=True).kept
    expected = pa.Table.from_pandas(plain, preserve_index=False)
    for frame in (coded, plain):
        table = votes_table(frame)
        assert table.equals(expected) and table.schema.equals(expected.schema, check_metadata=True)
    pq.write_table(votes_table(coded), tmp_path / "coded.parquet")
    pq.write_table(expected, tmp_path / "plain.parquet")
    assert (tmp_path / "coded.parquet").read_bytes() == (tmp_path / "plain.parquet").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "coded.parquet"), plain)


def test_votes_table_of_no_votes_is_that_of_empty_string_columns():
    from pipelines.stages.votes import votes_table

    plain = votes.empty_votes()
    coded = plain.astype({"file_name": "category", "rater_id": "category"})
    assert votes_table(coded).schema.equals(votes_table(plain).schema, check_metadata=True)


def test_stage_read_votes_gives_strings_or_categoricals_of_the_same_votes(tmp_path):
    import pyarrow.parquet as pq

    from pipelines.stages.base import Artifact
    from pipelines.stages.votes import read_votes, votes_table

    kept = votes.validate_votes(_messy_votes(tmp_path), source="s", categorical=True).kept
    pq.write_table(votes_table(kept), tmp_path / "votes.parquet")
    artifact = Artifact("votes", "k", tmp_path)
    plain = read_votes(artifact)
    assert plain["file_name"].dtype == object and plain["rater_id"].dtype == object
    coded = read_votes(artifact, categorical=True)
    assert isinstance(coded["file_name"].dtype, pd.CategoricalDtype)
    pd.testing.assert_frame_equal(coded.astype({"file_name": object, "rater_id": object}), plain)
    pd.testing.assert_frame_equal(plain, kept.astype({"file_name": object, "rater_id": object}))
    only_b = read_votes(artifact, file_names={"b.JPEG"}, categorical=True)
    assert set(only_b["file_name"]) == {"b.JPEG"}
