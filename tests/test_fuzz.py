"""Malformed inputs, made by seeded random mutations of real files (hypothesis is not installed).

The rule every reader must keep (developer guide, "Bad input"): a clear error naming
the file (and row/field or key), or a counted quarantine with read == kept +
quarantined. Never a bare traceback from deep inside a library, never silent loss.
"""
from __future__ import annotations

import csv
import io
import json
import pickle
import random
from pathlib import Path

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that

from auditing import labelsets, votes
from models import sample_photos
from pipelines import cli
from pipelines.beam_options import make_options
from pipelines.images import (METRICS_NAMESPACE, QUARANTINED, DecodeImages, ImageFiles,
                              ReadImageShards, plan_shards)
from tests.test_checkpoints import _RunsShellCommand, _zip_file

SEEDS = 150


def mutate(data: bytes, rng: random.Random, kinds: tuple[str, ...] = ("flip", "truncate", "insert", "delete")
           ) -> tuple[str, bytes]:
    """One seeded corruption of ``data``: bit flips, a truncation, an inserted or deleted run."""
    b = bytearray(data)
    kind = rng.choice(kinds)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        b = b[:rng.randrange(len(b))]
    elif kind == "insert":
        i = rng.randrange(len(b))
        b[i:i] = rng.choice([b",", b"\n", b'"', b"\x00", b"\r", b"  ", b"x", b"\t", b"\xff"])
    else:
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 30)]
    return kind, bytes(b)


def _check_counted(validated: votes.ValidatedVotes, path: Path, expected_rows: int | None) -> None:
    """read == kept + quarantined, every quarantined row names the file, kept rows are valid."""
    summary = validated.summary
    assert summary.read == summary.kept + summary.quarantined_total
    if expected_rows is not None:  # no silent loss: every record of the file was read
        assert summary.read == expected_rows, (summary.read, expected_rows)
    assert (validated.quarantine["source"] == str(path)).all()
    assert (validated.quarantine["row"] >= 1).all()
    assert set(validated.quarantine["reason"]) <= set(votes.REASONS)
    votes.check_votes(validated.kept)


@pytest.fixture(scope="module")
def real_vote_csv(real_slice) -> bytes:
    """The first ~30 kB (whole rows) of the real ReaL votes of the slice."""
    data = (real_slice / "votes_first.csv").read_bytes()[:30_000]
    return data[:data.rindex(b"\n") + 1]


def _csv_records(data: bytes) -> int | None:
    """Data records by Python's csv module (blank lines skipped), None if not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    records = [r for r in csv.reader(io.StringIO(text, newline="")) if any(f.strip() for f in r)]
    return max(len(records) - 1, 0)


def _fuzz_vote_file(source: bytes, suffix: str, count_records, folder: Path) -> dict[str, int]:
    """Read SEEDS mutations of ``source``; each must be an error naming the file or a
    counted quarantine that read every record (``count_records(bytes)``). Outcome counts."""
    outcomes: dict[str, int] = {}
    for seed in range(SEEDS):
        kind, data = mutate(source, random.Random(seed))
        path = folder / f"votes_{seed}{suffix}"
        path.write_bytes(data)
        try:
            validated = votes.read_and_validate([path])
        except votes.VoteFileError as e:
            assert str(path) in str(e), f"seed {seed} ({kind}): the error does not name the file: {e}"
            outcome = "error"
        else:
            _check_counted(validated, path, count_records(data))
            outcome = "quarantined" if validated.summary.quarantined_total else "clean"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def _jsonl_lines(data: bytes) -> int:
    """Non-blank lines as Python's text mode splits them (universal newlines)."""
    return sum(1 for line in io.TextIOWrapper(io.BytesIO(data), encoding="utf-8") if line.strip())


@pytest.fixture(scope="module")
def real_vote_records(real_slice) -> list[dict]:
    return pd.read_csv(real_slice / "votes_first.csv", dtype=str).head(300).to_dict("records")


def test_mutated_real_vote_csv_is_a_clear_error_or_a_counted_quarantine(real_vote_csv, tmp_path):
    outcomes = _fuzz_vote_file(real_vote_csv, ".csv", _csv_records, tmp_path)
    # The mutations reach all three outcomes (else the test would not test much).
    assert set(outcomes) == {"error", "quarantined", "clean"}, outcomes


def test_mutated_real_vote_jsonl_bytes_are_a_clear_error_or_a_counted_quarantine(real_vote_records,
                                                                                  tmp_path):
    source = "".join(json.dumps(r) + "\n" for r in real_vote_records).encode()
    outcomes = _fuzz_vote_file(source, ".jsonl", _jsonl_lines, tmp_path)
    assert outcomes.get("quarantined", 0) > 10, outcomes


# JSON values a crowd platform export can hold where a string or an integer belongs.
ODD_JSON_VALUES = [None, True, 3.5, 1e20, -1, 1000, "", " ", "NaN", 2**70, [7], {"label": 7}]


@pytest.mark.parametrize("field", votes.REQUIRED_COLUMNS)
def test_jsonl_field_of_any_json_type_is_kept_or_quarantined_never_a_crash(real_vote_records, tmp_path,
                                                                           field):
    """One row per odd value in ``field``; a list or dict value used to raise TypeError
    (unhashable) from ``_clean_text``'s ``pd.factorize``."""
    records = [dict(r) for r in real_vote_records[:len(ODD_JSON_VALUES) + 5]]
    for record, value in zip(records, ODD_JSON_VALUES):
        record[field] = value
    path = tmp_path / "votes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    validated = votes.read_and_validate([path])
    _check_counted(validated, path, len(records))
    # The five untouched real rows are kept; lists, dicts and the empty values are not.
    assert validated.summary.kept >= 5
    bad_rows = set(validated.quarantine["row"])
    for row, value in enumerate(ODD_JSON_VALUES, start=1):
        if isinstance(value, (list, dict)) or value in (None, "", " "):
            assert row in bad_rows, (field, value)


def _real_rows(real_slice: Path, n: int = 40) -> pd.DataFrame:
    return pd.read_csv(real_slice / "votes_first.csv", dtype=str, keep_default_na=False).head(n)


# (what to do to real data row 5 (1-based), the quarantine reason it must get)
ROW_MALFORMATIONS = {
    "bad answer": (lambda r: r.assign(answer="perhaps"), votes.UNKNOWN_ANSWER),
    "empty rater": (lambda r: r.assign(rater_id="  "), votes.EMPTY_RATER_ID),
    "label out of range": (lambda r: r.assign(label="1000"), votes.UNKNOWN_LABEL),
    "negative label": (lambda r: r.assign(label="-3"), votes.UNKNOWN_LABEL),
    "non-integer label": (lambda r: r.assign(label="3.5"), votes.UNPARSABLE_LABEL),
    "wnid as label": (lambda r: r.assign(label="n01440764"), votes.UNPARSABLE_LABEL),
    "empty file name": (lambda r: r.assign(file_name=""), votes.MISSING_FIELD),
}


@pytest.mark.parametrize("name", ROW_MALFORMATIONS)
def test_malformed_vote_row_is_quarantined_with_its_row_and_reason(real_slice, tmp_path, name):
    change, reason = ROW_MALFORMATIONS[name]
    rows = _real_rows(real_slice)
    rows.iloc[4] = change(rows.iloc[[4]]).iloc[0]
    path = tmp_path / "votes.csv"
    rows.to_csv(path, index=False)
    validated = votes.read_and_validate([path])
    _check_counted(validated, path, len(rows))
    q = validated.quarantine
    assert q[["row", "reason"]].values.tolist() == [[5, reason]]
    assert q["source"].tolist() == [str(path)] and q["detail"].iloc[0]


def test_duplicate_votes_across_files_keep_the_first_and_count_the_rest(real_slice, tmp_path):
    rows = _real_rows(real_slice)
    first, again = tmp_path / "a.csv", tmp_path / "b.csv"
    rows.to_csv(first, index=False)
    rows.iloc[10:20].to_csv(again, index=False)  # a re-sent batch of the crowd platform
    validated = votes.read_and_validate([first, again])
    assert validated.summary.read == 50 and validated.summary.kept == 40
    assert validated.summary.quarantined == {**{r: 0 for r in votes.REASONS}, votes.DUPLICATE_VOTE: 10}
    assert set(validated.quarantine["source"]) == {str(again)}


def _write_missing_column(path: Path, rows: pd.DataFrame) -> None:
    rows.drop(columns="rater_id").to_csv(path, index=False)


def _write_garbage(path: Path, rows: pd.DataFrame) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4000))


def _write_too_many_fields(path: Path, rows: pd.DataFrame) -> None:
    text = rows.to_csv(index=False).splitlines()
    text[7] += ",extra"
    path.write_text("\n".join(text) + "\n")


FILE_MALFORMATIONS = {  # name -> (writer, suffix, what the error must name besides the file)
    "missing column": (_write_missing_column, ".csv", "rater_id"),
    "binary garbage csv": (_write_garbage, ".csv", "CSV"),
    "binary garbage jsonl": (_write_garbage, ".jsonl", "UTF-8"),
    "binary garbage npz": (_write_garbage, ".npz", "npz"),
    "row with an extra field": (_write_too_many_fields, ".csv", "line 8"),
}


@pytest.mark.parametrize("name", FILE_MALFORMATIONS)
def test_unreadable_vote_file_is_an_error_naming_the_file(real_slice, tmp_path, name):
    write, suffix, named = FILE_MALFORMATIONS[name]
    path = tmp_path / f"votes{suffix}"
    write(path, _real_rows(real_slice))
    with pytest.raises(votes.VoteFileError) as error:
        votes.read_and_validate([path])
    assert str(path) in str(error.value) and named in str(error.value)


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.999])
def test_truncated_real_raters_npz_is_a_vote_file_error(real_raters_path, tmp_path, fraction):
    """np.load raises zipfile.BadZipFile (an Exception, not OSError/ValueError) for a
    truncated archive; the reader must turn it into a VoteFileError."""
    data = Path(real_raters_path).read_bytes()
    path = tmp_path / "raters.npz"
    path.write_bytes(data[:int(len(data) * fraction)])
    for read in (votes.read_real_raters_raw, votes.read_real_questions):
        with pytest.raises(votes.VoteFileError, match="raters.npz"):
            read(path)


def test_bit_flipped_real_raters_npz_is_an_error_or_reads_every_question(real_raters_path, tmp_path):
    data = Path(real_raters_path).read_bytes()
    questions = len(votes.read_real_questions(real_raters_path))
    for seed in range(8):
        _, flipped = mutate(data, random.Random(seed), kinds=("flip",))
        path = tmp_path / f"raters_{seed}.npz"
        path.write_bytes(flipped)
        try:
            read = votes.read_real_questions(path)
        except votes.VoteFileError as e:
            assert str(path) in str(e)
            continue
        assert len(read) == questions


# ------------------------------------------------------------------ configs via `label-audit run`

CONFIG_ERRORS = {  # name -> (config text, or bytes; what stderr must name)
    "unknown key": ("output_dir: o\nstages: {votes: {paths: [v.csv], fromat: csv}}\n", "stages.votes.fromat"),
    "wrong type": ("output_dir: o\nstages: {aggregate: {threshold: high}}\n", "stages.aggregate.threshold"),
    "wrong type of section": ("output_dir: o\nstages: [votes]\n", "stages"),
    "missing file": ("output_dir: o\nstages: {votes: {paths: [nowhere.csv]}}\n", "stages.votes.paths[0]"),
    "bad YAML": ("output_dir: o\nstages: {votes: [\n", "not valid YAML"),
    "not a mapping": ("- just\n- a list\n", "expected a mapping"),
    "empty file": ("", "expected a mapping"),
    "bad release version": ("output_dir: o\nstages: {release: {version: one}}\n", "stages.release.version"),
    "binary garbage": (b"\xff\xfe\x00\x81garbage\x80", "bad.yaml"),
}


@pytest.mark.parametrize("name", CONFIG_ERRORS)
def test_malformed_config_exits_2_naming_the_key(tmp_path, capsys, name):
    text, named = CONFIG_ERRORS[name]
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["votes", "labels"])
def test_run_with_an_unreadable_input_file_exits_2_naming_it(real_slice, tmp_path, capsys, what):
    """A vote file without the rater_id column, or a labels TSV with a bad label: the
    readers raise VoteFileError / LabelFileError; `run` must report them like config errors."""
    config_text = (real_slice / "audit.yaml").read_text()
    config_text = config_text.replace("labels.tsv", str(real_slice / "labels.tsv"))
    if what == "votes":
        bad = tmp_path / "votes.csv"
        _write_missing_column(bad, _real_rows(real_slice))
        config_text = config_text.replace("votes_first.csv", str(bad))
    else:
        bad = tmp_path / "labels.tsv"
        bad.write_text("file_name\tlabel\nILSVRC2012_val_00000001.JPEG\tsixty-five\n")
        config_text = config_text.replace(str(real_slice / "labels.tsv"), str(bad)).replace(
            "votes_first.csv", str(real_slice / "votes_first.csv"))
    config = tmp_path / "audit.yaml"
    config.write_text(config_text)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    assert str(bad) in capsys.readouterr().err


def test_mutated_real_labels_tsv_is_a_clear_error_or_read_whole(real_slice, tmp_path):
    source = (real_slice / "labels.tsv").read_bytes()
    for seed in range(SEEDS):
        kind, data = mutate(source, random.Random(seed))
        path = tmp_path / f"labels_{seed}.tsv"
        path.write_bytes(data)
        try:
            table = labelsets.read_label_tsv(path)
        except labelsets.LabelFileError as e:
            assert str(path) in str(e), f"seed {seed} ({kind}): {e}"
            continue
        lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
        assert len(table) == len(lines) - 1, f"seed {seed} ({kind}): rows lost"


def test_run_counts_quarantined_votes_in_the_release(real_slice, tmp_path):
    """Every row-level malformation at once, end to end: the run succeeds and the
    release's counts.json and the stored quarantine.csv account for each bad row."""
    rows = pd.read_csv(real_slice / "votes_first.csv", dtype=str, keep_default_na=False)
    for i, (change, _) in enumerate(ROW_MALFORMATIONS.values()):
        rows.iloc[100 + i] = change(rows.iloc[[100 + i]]).iloc[0]
    rows = pd.concat([rows, rows.iloc[:3]], ignore_index=True)  # 3 duplicate votes
    path = tmp_path / "votes.csv"
    rows.to_csv(path, index=False)
    config = tmp_path / "audit.yaml"
    config.write_text((real_slice / "audit.yaml").read_text()
                      .replace("labels.tsv", str(real_slice / "labels.tsv"))
                      .replace("votes_first.csv", str(path)))
    out = tmp_path / "out"
    assert cli.main(["run", str(config), "--out", str(out)]) == 0
    counts = json.loads((out / "tfds/real_slice_audit/1.0.0/counts.json").read_text())
    expected = len(ROW_MALFORMATIONS) + 3
    assert counts["votes_read"] == len(rows) and counts["votes_quarantined"] == expected
    quarantine = pd.read_csv(next((out / "store/votes").glob("[!.]*/quarantine.csv")))
    assert len(quarantine) == expected
    assert sorted(quarantine["row"]) == [101 + i for i in range(len(ROW_MALFORMATIONS))] + [
        len(rows) - 2, len(rows) - 1, len(rows)]


# ------------------------------------------------------------------ images


def _real_jpeg() -> bytes:
    path = sample_photos.photo_path("china")
    assert path.suffix == ".jpg"
    return path.read_bytes()


def test_mutated_real_jpegs_are_decoded_or_quarantined_and_counted(tmp_path):
    """Seeded corruptions of a real JPEG through the Beam image reader with the real
    model preprocessing: every image comes out once, decoded (224x224x3, finite) or
    quarantined with a reason; every truncated file is quarantined, never half-decoded."""
    from models.registry import get_model

    spec = get_model("efficientnet-lite0")
    jpeg = _real_jpeg()
    files: dict[str, bytes] = {"original.jpg": jpeg, "empty.jpg": b"",
                               "noise.jpg": np.random.default_rng(1).bytes(20_000)}
    must_quarantine = {"empty.jpg", "noise.jpg"}
    for seed in range(40):
        kind, data = mutate(jpeg, random.Random(seed), kinds=("flip", "truncate", "delete"))
        files[f"{kind}_{seed:03d}.jpg"] = data
        if kind == "truncate":
            must_quarantine.add(f"{kind}_{seed:03d}.jpg")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    source = ImageFiles.from_folder(folder)
    all_names = sorted(files)  # the check below is pickled: it must not hold the image bytes

    def check(outcomes):
        outcomes = list(outcomes)
        names = [key.file_name for key, _ in outcomes]
        assert sorted(names) == all_names, "every image comes out exactly once"
        for key, array in outcomes:
            if array is None:
                assert key.quarantine_reason, key
            else:
                assert key.quarantine_reason is None and key.file_name not in must_quarantine, key
                assert array.shape == (224, 224, 3) and np.isfinite(array).all()
        quarantined = {key.file_name for key, array in outcomes if array is None}
        assert must_quarantine <= quarantined and "original.jpg" not in quarantined

    pipeline = BeamTestPipeline(options=make_options())
    decoded = (pipeline | beam.Create(plan_shards(len(source), 8)) | ReadImageShards(source)
               | DecodeImages(spec.preprocess))
    assert_that(decoded | beam.combiners.ToList(), lambda lists: check(lists[0]))
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]}
    assert counters["read"] == len(files) == counters["decoded"] + counters[QUARANTINED]
    assert counters[QUARANTINED] >= len(must_quarantine)


# ------------------------------------------------------------------ checkpoints


def test_user_checkpoint_that_runs_os_system_is_refused_through_the_registry(tmp_path):
    from models import registry, torch_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(_zip_file(pickle.dumps(_RunsShellCommand(f"touch {marker}"), protocol=2)))
    with pytest.raises(torch_checkpoint.UnsafeCheckpointError) as error:
        registry.get_model("resnet50", checkpoint=path).load()
    assert "os.system" in str(error.value) or "posix.system" in str(error.value)
    assert str(path) in str(error.value) and not marker.exists()


def test_random_bytes_as_a_user_checkpoint_name_the_file(tmp_path):
    from models import checkpoints, registry, torch_checkpoint

    for suffix in (".msgpack", ".pth"):
        path = tmp_path / f"random{suffix}"
        path.write_bytes(np.random.default_rng(2).bytes(10_000))
        with pytest.raises((checkpoints.CheckpointError, torch_checkpoint.TorchCheckpointError,
                            torch_checkpoint.UnsafeCheckpointError)) as error:
            registry.get_model("efficientnet-lite0", checkpoint=path).load()
        assert str(path) in str(error.value)


def test_msgpack_with_wrong_shapes_lists_the_parameters(tmp_path):
    """A real converted checkpoint, edited: one kernel transposed, one dropped, one extra."""
    from flax import traverse_util

    from models import checkpoints, registry

    spec = registry.get_model("efficientnet-lite0")
    _, variables = spec.load()
    flat = traverse_util.flatten_dict(variables, sep="/")
    kernels = sorted(k for k in flat if k.endswith("kernel") and np.ndim(flat[k]) == 2)
    transposed, dropped = kernels[0], sorted(k for k in flat if k.startswith("batch_stats"))[0]
    flat[transposed] = flat[transposed].T
    del flat[dropped]
    flat["params/extra_head/kernel"] = np.zeros((3, 3), np.float32)
    path = checkpoints.save_checkpoint(tmp_path / "edited.msgpack", traverse_util.unflatten_dict(flat, sep="/"))
    with pytest.raises(checkpoints.CheckpointMismatchError) as error:
        registry.get_model("efficientnet-lite0", checkpoint=path).load()
    message = str(error.value)
    assert str(path) in message
    for name in (transposed, dropped, "params/extra_head/kernel"):
        assert name in message, name


def test_mutated_real_torch_weights_are_an_error_or_a_checked_load(tmp_path, monkeypatch):
    """Byte flips in the pickle part of the real efficientnet-lite0 .pth, given as a user
    checkpoint: the restricted unpickler or the conversion raises an error naming the
    file, or what it reads is converted and checked leaf by leaf against the model."""
    from models import checkpoints, efficientnet_lite, registry, torch_checkpoint

    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    weights, _ = efficientnet_lite.bundled_weights("efficientnet-lite0")
    data = weights.read_bytes()
    errors = loaded = 0
    for seed in range(40):
        rng = random.Random(seed)
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(60_000)  # the pickle and the first storages
            flipped[i] ^= 1 << rng.randrange(8)
        path = tmp_path / f"weights_{seed}.pth"
        path.write_bytes(bytes(flipped))
        try:
            registry.get_model("efficientnet-lite0", checkpoint=path).load()
            loaded += 1
        except (torch_checkpoint.TorchCheckpointError, torch_checkpoint.UnsafeCheckpointError,
                checkpoints.CheckpointError) as e:
            assert str(path) in str(e), f"seed {seed}: the error does not name the file: {e}"
            errors += 1
        path.unlink()
    assert errors > 10 and errors + loaded == 40
