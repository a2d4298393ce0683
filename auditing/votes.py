"""Rater votes: one schema, readers for the formats crowds send back, and validation.

A vote is one rater's answer to one question "is class ``label`` in image
``file_name``?". The schema (a long pandas DataFrame, one row per vote):

    file_name  str       the image
    label      int64     class index in [0, num_classes)
    rater_id   str       who answered (never empty)
    answer     category  one of ANSWERS = (no, maybe, yes)
    task_id    str       optional: the task (one image, <= 8 labels) the vote came from
    timestamp  any       optional: carried through as given

Formats, picked by suffix in ``read_votes`` (or named with ``format=``):

- ``real-npz`` (``.npz``): the ReaL ``raters.npz``: ``tensor`` (raters, questions, 3),
  one-hot over [no, maybe, yes], all zero where the rater did not see the question;
  ``info`` (questions, 2) = (file name, label index as a string); ``ids`` rater ids.
- ``csv`` / ``jsonl`` / ``parquet``: long format with the schema's column names, as crowd
  platforms return the tasks built by the task builder. Answers are case-insensitive.

Reading and validating are two steps: ``read_votes`` turns a file into raw rows (strings
as given, plus the row number within the file) and fails only on files that cannot be
parsed at all, with a ``VoteFileError`` naming file, row and field. ``validate_votes``
then keeps the good rows and quarantines the others with a reason, so that
``read == kept + quarantined`` always holds.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import zipfile
import zlib
from collections.abc import Iterator, Callable, Sequence
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import pandas as pd

from auditing.errors import InputError
from auditing import atomic
from auditing import sources

# The order of raters.npz's one-hot axis; also the order of the answer categories.
ANSWERS: tuple[str, ...] = ("no", "maybe", "yes")
ANSWER_DTYPE = pd.CategoricalDtype(list(ANSWERS), ordered=True)
REQUIRED_COLUMNS: tuple[str, ...] = ("file_name", "label", "rater_id", "answer")
OPTIONAL_COLUMNS: tuple[str, ...] = ("task_id", "timestamp")
FORMATS: tuple[str, ...] = ("real-npz", "csv", "jsonl", "parquet")
_SUFFIX_FORMATS = {".npz": "real-npz", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                   ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_NUM_CLASSES = 1000

# Quarantine reasons, in the order they are checked: a row gets the first that applies.
MISSING_FIELD = "missing_field"
MALFORMED_FIELD = "malformed_field"
UNPARSABLE_LABEL = "unparsable_label"
EMPTY_RATER_ID = "empty_rater_id"
UNKNOWN_LABEL = "unknown_label"
UNKNOWN_ANSWER = "unknown_answer"
DUPLICATE_VOTE = "duplicate_vote"
REASONS: tuple[str, ...] = (MALFORMED_FIELD, MISSING_FIELD, UNPARSABLE_LABEL, EMPTY_RATER_ID, UNKNOWN_LABEL,
                            UNKNOWN_ANSWER, DUPLICATE_VOTE)
QUARANTINE_COLUMNS: tuple[str, ...] = ("source", "row", "reason", "detail", *REQUIRED_COLUMNS)


class VoteFileError(InputError):
    """A vote file that cannot be parsed at all; the message names file, row and field."""


@dataclasses.dataclass(frozen=True)
class VoteSummary:
    read: int
    kept: int
    quarantined: dict[str, int]  # reason -> count, every reason listed

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def as_dict(self) -> dict[str, object]:
        return {"read": self.read, "kept": self.kept, "quarantined": self.quarantined_total,
                "quarantined_by_reason": dict(self.quarantined)}


class ValidatedVotes(NamedTuple):
    """``kept, quarantine = validate_votes(...)`` unpacks; ``.summary`` counts both."""

    kept: pd.DataFrame
    quarantine: pd.DataFrame

    @property
    def summary(self) -> VoteSummary:
        counts = self.quarantine["reason"].value_counts()
        by_reason = {reason: int(counts.get(reason, 0)) for reason in REASONS}
        return VoteSummary(read=len(self.kept) + len(self.quarantine), kept=len(self.kept),
                           quarantined=by_reason)


def empty_votes(with_task_id: bool = False) -> pd.DataFrame:
    """A vote frame with no rows and the schema's dtypes."""
    frame = pd.DataFrame({"file_name": pd.Series(dtype=object), "label": pd.Series(dtype=np.int64),
                          "rater_id": pd.Series(dtype=object),
                          "answer": pd.Series(dtype=ANSWER_DTYPE)})
    if with_task_id:
        frame["task_id"] = pd.Series(dtype=object)
    return frame


def check_votes(votes: pd.DataFrame, num_classes: int = DEFAULT_NUM_CLASSES) -> None:
    """Raise ValueError unless ``votes`` already follows the schema (e.g. before aggregating)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in votes.columns]
    if missing:
        raise ValueError(f"votes lack column(s) {missing}; expected {list(REQUIRED_COLUMNS)}")
    if not pd.api.types.is_integer_dtype(votes["label"]):
        raise ValueError(f"votes.label must be integers, got dtype {votes['label'].dtype}")
    if len(votes) and not votes["label"].between(0, num_classes - 1).all():
        raise ValueError(f"votes.label has values outside [0, {num_classes})")
    answers = votes["answer"].astype(object)
    if not answers.isin(ANSWERS).all():
        bad = sorted(set(answers[~answers.isin(ANSWERS)].astype(str)))[:5]
        raise ValueError(f"votes.answer has values outside {ANSWERS}: {bad}")
    if (votes["rater_id"].astype(str).str.strip() == "").any() or votes["rater_id"].isna().any():
        raise ValueError("votes.rater_id has empty values")
    if votes.duplicated(["rater_id", "file_name", "label"]).any():
        raise ValueError("votes have duplicate (rater_id, file_name, label) rows")


# ------------------------------------------------------------------------- readers


def detect_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise VoteFileError(f"{path}: cannot tell the vote format from the suffix {suffix!r}; "
                            f"use one of {sorted(_SUFFIX_FORMATS)} or pass format= one of {FORMATS}")
    return _SUFFIX_FORMATS[suffix]


def jsonl_records(lines) -> Iterator[tuple[int, dict]]:
    """(line number, record) of the non-blank lines of a JSONL vote file; a line that is
    not a JSON object becomes an empty record (every field missing: quarantined)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        yield number, record if isinstance(record, dict) else {}


def read_votes(path: str | os.PathLike, format: str | None = None) -> pd.DataFrame:
    """Raw vote rows of one file: the schema's columns as given (not yet validated)
    plus ``row``, the row's number in the file (see each reader). ``format`` is picked
    from the suffix when None. Raises VoteFileError for a file that cannot be parsed."""
    fmt = format or detect_format(path)
    readers = {"real-npz": read_real_raters_raw, "csv": _read_csv, "jsonl": _read_jsonl,
               "parquet": _read_parquet}
    if fmt not in readers:
        raise VoteFileError(f"{path}: unknown vote format {fmt!r}; expected one of {FORMATS}")
    if not Path(path).is_file():
        raise VoteFileError(f"{path}: no such vote file")
    return readers[fmt](path)


def _check_header(path: str | os.PathLike, columns: Sequence[str], where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise VoteFileError(f"{path}: {where} lacks the field(s) {missing}; "
                            f"expected {list(REQUIRED_COLUMNS)} (+ optional {list(OPTIONAL_COLUMNS)})")


def _keep_schema_columns(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[[c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, "row") if c in frame.columns]]


def _read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """``row`` = data row number: 1 is the first row after the header."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise VoteFileError(f"{path}: not a readable CSV vote file: {e}") from e
    _check_header(path, list(frame.columns), "the CSV header")
    frame["row"] = np.arange(1, len(frame) + 1)
    return _keep_schema_columns(frame)


def _read_jsonl(path: str | os.PathLike) -> pd.DataFrame:
    """``row`` = line number. A line that is not a JSON object is kept as a row with
    every field missing (the validator quarantines it), so one bad line does not lose
    the file; blank lines are skipped."""
    records, rows = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for number, record in jsonl_records(f):
                records.append(record)
                rows.append(number)
    except UnicodeDecodeError as e:
        raise VoteFileError(f"{path}: not a UTF-8 JSONL vote file: {e}") from e
    frame = pd.DataFrame.from_records(records, columns=[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS])
    # Optional fields no line has are left out (as a CSV without them would be).
    given = frame.dropna(axis=1, how="all").columns
    frame = frame.reindex(columns=[*REQUIRED_COLUMNS, *[c for c in OPTIONAL_COLUMNS if c in given]])
    frame["row"] = np.asarray(rows, dtype=np.int64)
    return frame


def _read_parquet(path: str | os.PathLike) -> pd.DataFrame:
    """``row`` = 1-based row index."""
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise VoteFileError(f"{path}: not a readable Parquet vote file: {e}") from e
    _check_header(path, list(frame.columns), "the Parquet schema")
    frame = frame.reset_index(drop=True)
    frame["row"] = np.arange(1, len(frame) + 1)
    return _keep_schema_columns(frame)


def _read_npy_header(member, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an NPY stream, read up to the data. Object
    arrays (pickles) are refused, as np.load(allow_pickle=False) does."""
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(member)
    if dtype.hasobject:
        raise ValueError(f"array {name!r} holds Python objects (a pickle); refused")
    return shape, fortran_order, dtype


def _read_npy_data(member: IO[bytes], header: tuple[tuple[int, ...], bool, np.dtype]) -> np.ndarray:
    """The array of an NPY stream whose ``header`` (``_read_npy_header``) was read,
    decompressed in one call and viewed in place (writable, as np.load's)."""
    shape, fortran_order, dtype = header
    data = bytearray(member.read())
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)))
    return array.reshape(shape, order="F" if fortran_order else "C")


def _read_npz_member(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """One array of an NPZ, decompressed in one call and viewed in place: numpy's own
    reader copies a compressed member in small chunks (6 s for raters.npz's 377 MB
    tensor, against 1.4 s)."""
    with archive.open(name) as member:
        return _read_npy_data(member, _read_npy_header(member, name))


# Cells of the rater tensor decompressed at a time (3 MB of float64 one-hot triples).
# Measured on raters.npz (377 MB inflated from 1.4 MB) in a process the size of the
# demo's: 1.5 MB pieces 1.9-2.1 s, 3 or 6 MB 1.5-1.6 s, 24 MB 1.6-1.9 s (zipfile copies
# the member's compressed rest at each read, and larger pieces leave the cache).
_CHUNK_CELLS = 1 << 17


def _answered_cells(member: IO[bytes], path: str | os.PathLike | IO[bytes], raters: int,
                    questions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat index rater * questions + question, answer code, irregular values) of the
    cells of the open ``tensor.npy`` member (raters, questions, 3) with any non-zero
    value, in C order. The code is the index in ANSWERS of a one-hot cell's 1, else -1;
    the irregular values (k, 3) are those of the cells with code -1, in order.

    The member is decompressed and scanned a piece at a time: raters.npz's tensor is
    377 MB of which 6% is answered, so the whole array is never allocated and each
    piece is scanned while in cache. The zip CRC is checked at the end, as np.load does."""
    shape, fortran_order, dtype = _read_npy_header(member, "tensor")
    flat, codes, irregular = [np.empty(0, np.int64)], [np.empty(0, np.int8)], [np.empty((0, len(ANSWERS)), dtype)]
    if len(shape) != 3 or shape[2] != len(ANSWERS) or shape[:2] != (raters, questions):
        raise VoteFileError(f"{path}: field 'tensor' must be (raters={raters}, questions={questions}, 3), "
                            f"got shape {shape}")
    if dtype.kind not in "biufc":
        raise VoteFileError(f"{path}: field 'tensor' must hold numbers (one-hot answers), got dtype {dtype}")
    cells, cell_bytes = raters * questions, dtype.itemsize * len(ANSWERS)
    # A Fortran-order tensor's cells are not contiguous: read it whole, as C order.
    step = cells if fortran_order else _CHUNK_CELLS
    starts = range(0, cells, step)
    sizes = [min(step, cells - start) * cell_bytes for start in starts]
    # Closed before the member is: no read may still be running when it closes.
    with contextlib.closing(_read_ahead(member, sizes)) as pieces:
        for start, data in zip(starts, pieces):
            count = min(step, cells - start)
            if len(data) != count * cell_bytes:
                raise VoteFileError(f"{path}: field 'tensor' ends after {start + len(data) // cell_bytes:,} "
                                    f"of {cells:,} cells")
            piece = np.frombuffer(data, dtype)
            piece = (np.ascontiguousarray(piece.reshape(shape, order="F")) if fortran_order else piece
                     ).reshape(count, len(ANSWERS))
            nonzero = piece != 0
            answered = np.flatnonzero(functools.reduce(np.logical_or, nonzero.T))  # 4x faster than .any(axis=1)
            flat.append(answered + start)
            # Coded here, while the next piece is decompressed, each piece in cache.
            values = piece[answered]
            one_hot = (values.sum(axis=1) == 1) & np.isin(values, (0, 1)).all(axis=1)
            codes.append(np.where(one_hot, values.argmax(axis=1), -1).astype(np.int8))
            if not one_hot.all():
                irregular.append(values[~one_hot])
    member.read()  # to the member's end, where zipfile checks the CRC
    return np.concatenate(flat), np.concatenate(codes), np.concatenate(irregular)


def _read_ahead(stream: IO[bytes], sizes: Sequence[int]) -> Iterator[bytes]:
    """``stream.read(size)`` for each of ``sizes``, the next read running in a thread
    while the caller works on the last: zlib decompresses (and zipfile's CRC runs)
    without the GIL, so decompressing and scanning share two cores."""
    if not sizes:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(stream.read, sizes[0])
        for following in sizes[1:]:
            data = pending.result()
            pending = pool.submit(stream.read, following)
            yield data
        yield pending.result()


@contextlib.contextmanager
def _real_npz(path: str | os.PathLike | IO[bytes], keys: Sequence[str]) -> Iterator[zipfile.ZipFile]:
    """The open archive of a ReaL npz holding the arrays ``keys``; an archive that
    cannot be read (truncated, corrupt, not a zip) is a VoteFileError."""
    try:
        with zipfile.ZipFile(path) as archive:
            files = [n.removesuffix(".npy") for n in archive.namelist()]
            missing = [k for k in keys if k not in files]
            if missing:
                raise VoteFileError(f"{path}: ReaL npz lacks the array(s) {missing} (has {files})")
            yield archive
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        if isinstance(e, VoteFileError):
            raise
        raise VoteFileError(f"{path}: not a readable ReaL npz file: {e}") from e


def _load_real_npz(path: str | os.PathLike | IO[bytes], keys: Sequence[str]) -> dict[str, np.ndarray]:
    with _real_npz(path, keys) as archive:
        return {k: _read_npz_member(archive, f"{k}.npy") for k in keys}


def _check_info(path: str | os.PathLike, shape: tuple[int, ...]) -> None:
    if len(shape) != 2 or shape[1] != 2:
        raise VoteFileError(f"{path}: field 'info' must be (questions, 2) = (file name, label), "
                            f"got shape {shape}")


def _info_labels(info: np.ndarray) -> pd.Series:
    """``info``'s label column as numbers (NaN where not a number): each distinct
    string is parsed once (ReaL has 1,000 among 184,962 questions)."""
    codes, uniques = pd.factorize(info[:, 1])
    numbers = pd.to_numeric(pd.Series(uniques, dtype=object), errors="coerce").to_numpy()
    if not len(numbers):
        return pd.Series(np.empty(0, np.float64))
    return pd.Series(numbers[codes])


def _factorized(values: np.ndarray) -> tuple[np.ndarray, pd.Index]:
    """(codes, distinct values) of ``values``, for ``_categorical``."""
    codes, uniques = pd.factorize(values)
    return codes, pd.Index(uniques, dtype=object)


def _categorical(factorized: tuple[np.ndarray, pd.Index], index: np.ndarray) -> pd.Categorical:
    """``values[index]`` of ``factorized = _factorized(values)`` as a Categorical: the
    distinct values once, not a string per vote."""
    codes, categories = factorized
    return pd.Categorical.from_codes(codes[index], categories=categories)


def read_real_raters_raw(path: str | os.PathLike | IO[bytes] | None = None) -> pd.DataFrame:
    """Raw votes of a ReaL ``raters.npz`` (default: ``sources.fetch("real_raters")``).

    Vectorised: the 85 x 184,962 x 3 tensor becomes 924,810 rows in about a second.
    ``row`` = question number (1-based ``info`` row); the rater is in ``rater_id``. A
    cell that is not one-hot (several answers, or values other than 0/1) gets an answer
    string outside the vocabulary, which the validator quarantines. ``file_name``,
    ``rater_id`` and (when every cell is one-hot) ``answer`` are Categoricals.
    """
    path = sources.fetch("real_raters") if path is None else path
    with (_real_npz(path, ("tensor", "info", "ids")) as archive,
          archive.open("info.npy") as info_member, archive.open("tensor.npy") as tensor_member):
        ids = _read_npz_member(archive, "ids.npy")
        info_header = _read_npy_header(info_member, "info")
        _check_info(path, info_header[0])
        # The tensor is decompressed and scanned in a thread (zlib without the GIL) while
        # this one reads and parses ``info``, which does not depend on it (~0.3 s).
        # Leaving the pool waits for the thread: no read runs once the members close.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            answered = pool.submit(_answered_cells, tensor_member, path, len(ids), info_header[0][0])
            info = _read_npy_data(info_member, info_header)
            file_names = _factorized(info[:, 0])
            labels = _info_labels(info).to_numpy()
            if np.isfinite(labels).all() and (labels % 1 == 0).all():
                labels = labels.astype(np.int64)  # the usual case: parse 185k strings, not 925k
            else:
                labels = info[:, 1].astype(object)  # left to the validator, which names the rows
            flat, codes, irregular = answered.result()
    rater_index, question_index = np.divmod(flat, max(len(info), 1))
    answers = pd.Categorical.from_codes(codes, dtype=ANSWER_DTYPE)
    if len(irregular):
        answers = answers.astype(object)
        answers[codes < 0] = ["one-hot violated: " + np.array2string(c, separator=",") for c in irregular]
    # copy=False: the columns are fresh arrays, and not consolidating label and row into
    # one block saves copying 15 MB into memory first touched here (~0.3 s cold).
    return pd.DataFrame({
        "file_name": _categorical(file_names, question_index),
        "label": labels[question_index],
        "rater_id": _categorical(_factorized(ids.astype(str)), rater_index),
        "answer": answers,
        "row": question_index + 1,
    }, copy=False)


def read_real_questions(path: str | os.PathLike | IO[bytes] | None = None) -> pd.DataFrame:
    """The (file_name, label) questions of a ReaL ``raters.npz`` (or ``scores.npz``), in
    file order of ``info``: the proposals that were put to raters. Raises
    VoteFileError naming the row for a label that is not an integer."""
    path = sources.fetch("real_raters") if path is None else path
    info = _load_real_npz(path, ("info",))["info"]
    _check_info(path, info.shape)
    labels = _info_labels(info)
    bad = np.flatnonzero(labels.isna().to_numpy() | (labels.to_numpy() % 1 != 0))
    if bad.size:
        raise VoteFileError(f"{path}: row {bad[0] + 1}, field 'label': {info[bad[0], 1]!r} is not an integer")
    return pd.DataFrame({"file_name": info[:, 0].astype(object), "label": labels.astype(np.int64)})


# ---------------------------------------------------------------------- validation


def _text_codes(values: pd.Series, lower: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw field -> (codes, table): ``table[codes]`` are the stripped strings (object),
    "" where missing, each distinct string once in ``table``. Strips each distinct
    value once: file names and rater ids repeat across many votes (a Categorical's
    values are found from its codes)."""
    codes, uniques = pd.factorize(values if isinstance(values.dtype, pd.CategoricalDtype) else values.astype(object),
                                  use_na_sentinel=True)
    cleaned = pd.Index(uniques).astype(str).str.strip()
    if lower:
        cleaned = cleaned.str.lower()
    # Code -1 (missing) -> the appended "", then equal strings -> one code.
    distinct, table = pd.factorize(np.append(cleaned.to_numpy(dtype=object), ""))
    return distinct[codes], np.asarray(table, dtype=object)


def _used_categories(codes: np.ndarray, table: np.ndarray) -> pd.Categorical:
    """``table[codes]`` as a Categorical whose categories are the entries of ``table``
    that ``codes`` use, in table order."""
    used = np.bincount(codes, minlength=len(table)) > 0
    recode = np.cumsum(used) - 1
    return pd.Categorical.from_codes(recode[codes], categories=pd.Index(table[used], dtype=object))


def combined_key(codes: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray | None:
    """One int64 per row for the tuple of code columns ``codes`` (column i in
    [0, sizes[i])): equal exactly where the tuples are (``np.ravel_multi_index``). None
    where the product of the sizes does not fit in an int64."""
    dims = tuple(max(int(size), 1) for size in sizes)
    if int(np.prod(dims, dtype=object)) > np.iinfo(np.int64).max:
        return None
    return np.ravel_multi_index(tuple(codes), dims).astype(np.int64, copy=False)


def _clean_text(values: pd.Series, lower: bool = False) -> np.ndarray:
    """Raw field -> stripped strings (object array), "" where missing."""
    codes, table = _text_codes(values, lower)
    return table[codes]


def _parse_labels(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(labels as int64, parsable mask). Integers, or strings of an integer."""
    if pd.api.types.is_integer_dtype(values):
        return values.to_numpy(np.int64), np.ones(len(values), dtype=bool)
    text = values.astype(object).where(values.notna(), "").astype(str).str.strip()
    parsable = text.str.fullmatch(r"[+-]?\d{1,18}").to_numpy()
    if pd.api.types.is_float_dtype(values):  # e.g. Parquet with nulls: 3.0 is a fine label
        numbers = values.to_numpy(np.float64)
        parsable = np.isfinite(numbers) & (np.mod(numbers, 1) == 0)
        return np.where(parsable, numbers, -1).astype(np.int64), parsable
    labels = np.full(len(values), -1, dtype=np.int64)
    labels[parsable] = text[parsable].astype(np.int64).to_numpy()
    return labels, parsable


def validate_votes(raw: pd.DataFrame, num_classes: int = DEFAULT_NUM_CLASSES,
                   source: str | os.PathLike | None = None, provenance: bool = False,
                   categorical: bool = False) -> ValidatedVotes:
    """Split raw vote rows (``read_votes``) into kept votes (the schema) and a counted
    quarantine (``QUARANTINE_COLUMNS``: source, row, reason, detail, raw fields).

    A row gets the first reason that applies, in ``REASONS`` order; among otherwise
    valid rows the first (rater_id, file_name, label) vote is kept and later ones are
    ``duplicate_vote``. ``source`` names the file (defaults to a ``source`` column of
    ``raw`` if any, e.g. after concatenating files). ``provenance=True`` keeps
    ``source`` and ``row`` in the kept votes too (for checks made after this one that
    quarantine more rows, e.g. ``auditing.gold``). ``categorical=True`` gives the kept
    ``file_name`` and ``rater_id`` as Categoricals of their distinct stripped strings
    (for a writer that encodes them: no Python string per vote).
    """
    n = len(raw)
    rows = raw["row"].to_numpy() if "row" in raw.columns else np.arange(1, n + 1)

    def sources_of(index: np.ndarray) -> np.ndarray:
        if source is not None:
            return np.full(len(index), str(source), dtype=object)
        if "source" in raw.columns:
            return raw["source"].iloc[index].astype(str).to_numpy(dtype=object)
        return np.full(len(index), "", dtype=object)

    columns = {c: (raw[c] if c in raw.columns else pd.Series([None] * n, index=raw.index, dtype=object))
               for c in REQUIRED_COLUMNS}

    reason = np.zeros(n, dtype=np.int8)  # 0: none yet, else 1 + its index in REASONS
    # Made when a first row is quarantined: most batches have none, and an object array
    # of the rows' size costs its filling with None (~0.05 s for 925k votes).
    details: list[np.ndarray] = []

    def mark(mask: np.ndarray, why: str, text: str | Callable[[np.ndarray], object]) -> None:
        if not mask.any():
            return
        todo = mask & (reason == 0)
        if todo.any():
            if not details:
                details.append(np.empty(n, dtype=object))
            reason[todo] = REASONS.index(why) + 1
            details[0][todo] = text(todo) if callable(text) else text

    def quoted(field: str, suffix: str) -> Callable[[np.ndarray], list[str]]:
        return lambda todo: [f"field '{field}': {v!r} {suffix}"
                             for v in columns[field].iloc[np.flatnonzero(todo)].to_numpy()]

    # A JSONL field holding a list or an object is no value of the schema.
    for field in REQUIRED_COLUMNS:
        # infer_dtype scans in C: only a column that is not all strings (or numbers)
        # is looked at value by value.
        if columns[field].dtype == object and pd.api.types.infer_dtype(columns[field], skipna=True) not in (
                "string", "integer", "floating", "empty"):
            nested = columns[field].map(lambda v: isinstance(v, (list, dict))).to_numpy(dtype=bool)
            if nested.any():
                mark(nested, MALFORMED_FIELD, f"field '{field}' holds a list or an object")
                columns[field] = columns[field].where(~nested, None)
    # Each text field as codes into its distinct stripped strings: the checks below
    # look at each distinct value once, and duplicates are found on the codes.
    text = {c: _text_codes(columns[c], lower=(c == "answer")) for c in ("file_name", "rater_id", "answer")}

    def empty(field: str) -> np.ndarray:
        codes, table = text[field]
        return (table == "")[codes]

    blank_label = columns["label"].isna().to_numpy()
    if columns["label"].dtype == object:
        blank_label |= _clean_text(columns["label"]) == ""
    for field in ("file_name", "label", "answer"):
        mark(blank_label if field == "label" else empty(field), MISSING_FIELD, f"field '{field}' is missing or empty")
    labels, parsable = _parse_labels(columns["label"])
    mark(~parsable, UNPARSABLE_LABEL, quoted("label", "is not an integer"))
    mark(empty("rater_id"), EMPTY_RATER_ID, "field 'rater_id' is empty")
    outside = parsable & ((labels < 0) | (labels >= num_classes))
    mark(outside, UNKNOWN_LABEL, f"field 'label' is outside [0, {num_classes})")
    answer_codes, answer_table = text["answer"]
    answer_index = pd.Index(ANSWERS).get_indexer(answer_table)[answer_codes]  # -1: not an answer
    mark(answer_index < 0, UNKNOWN_ANSWER, quoted("answer", f"is not one of {list(ANSWERS)}"))

    valid = reason == 0
    duplicate = np.zeros(n, dtype=bool)
    all_valid = bool(valid.all())  # the usual case: no copies of the code columns
    vote = [column if all_valid else column[valid] for column in (text["rater_id"][0], text["file_name"][0], labels)]
    key = combined_key(vote, [len(text["rater_id"][1]), len(text["file_name"][1]), num_classes])
    # One integer per (rater, file, label): hashing it is ~10x faster than a duplicated() on three columns.
    duplicate[slice(None) if all_valid else valid] = (
        pd.Index(key).duplicated(keep="first") if key is not None
        else pd.DataFrame(dict(enumerate(vote))).duplicated(keep="first").to_numpy())
    mark(duplicate, DUPLICATE_VOTE, "a vote of this rater on this (file_name, label) came earlier")

    keep = reason == 0
    kept_index = np.flatnonzero(keep)
    everything = len(kept_index) == n  # the usual case: no copy of the rows

    def kept_rows(values: np.ndarray) -> np.ndarray:
        return values if everything else values[kept_index]

    def kept_text(field: str) -> np.ndarray | pd.Categorical:
        codes, table = text[field]
        return _used_categories(kept_rows(codes), table) if categorical else kept_rows(table[codes])

    # copy=False: the columns are fresh arrays, not to be copied into one block per dtype.
    kept = pd.DataFrame({
        "file_name": kept_text("file_name"),
        "label": kept_rows(labels),
        "rater_id": kept_text("rater_id"),
        "answer": pd.Categorical.from_codes(kept_rows(answer_index), dtype=ANSWER_DTYPE),
    }, copy=False)
    for optional in OPTIONAL_COLUMNS:
        if optional in raw.columns:
            values = raw[optional].iloc[kept_index].reset_index(drop=True)
            kept[optional] = _clean_text(values) if optional == "task_id" else values
    if provenance:
        kept["source"], kept["row"] = sources_of(kept_index), rows[kept_index]

    bad = np.flatnonzero(~keep)
    quarantine = pd.DataFrame({
        "source": sources_of(bad), "row": rows[bad],
        "reason": np.asarray(("",) + REASONS, dtype=object)[reason[bad]], "detail": details[0][bad] if details else np.empty(0, dtype=object),
        **{c: columns[c].iloc[bad].astype(object).to_numpy() for c in REQUIRED_COLUMNS}})
    return ValidatedVotes(kept, quarantine)


def read_and_validate(paths: str | os.PathLike | Sequence[str | os.PathLike],
                      num_classes: int = DEFAULT_NUM_CLASSES, format: str | None = None,
                      categorical: bool = False) -> ValidatedVotes:
    """Read and validate one or several vote files as one batch: duplicates are found
    across files too, and each quarantined row names its file. ``categorical``: as
    ``validate_votes``'."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    frames = [read_votes(p, format=format).assign(source=str(p)) for p in paths]
    if len(frames) == 1:
        raw = frames[0]  # not copied again by a concat of one
    else:
        raw = pd.concat(frames, ignore_index=True) if frames else empty_votes().assign(row=[], source=[])
    return validate_votes(raw, num_classes=num_classes, categorical=categorical)


def read_real_votes(path: str | os.PathLike | None = None,
                    num_classes: int = DEFAULT_NUM_CLASSES) -> ValidatedVotes:
    """The ReaL votes (default: ``sources.fetch("real_raters")``), validated."""
    path = sources.fetch("real_raters") if path is None else path
    return validate_votes(read_real_raters_raw(path), num_classes=num_classes, source=path)


def write_quarantine(quarantine: pd.DataFrame | None, path: str | os.PathLike) -> Path:
    """Write the quarantine as CSV atomically (temp file + rename); None or no rows
    writes the header only, so the file always exists."""
    path = Path(path)
    frame = quarantine if quarantine is not None else pd.DataFrame(columns=list(QUARANTINE_COLUMNS))
    with atomic.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        frame.to_csv(f, index=False)
    return path
