"""Aggregation at scale: votes read and sharded by Beam, Dawid-Skene EM over the shards,
scores written as Parquet shards.

The in-memory path (``auditing.aggregation.aggregate``, crowd-kit) is the reference and
stays the default below ``SHARDED_MIN_VOTES``; ``aggregate_sharded`` gives the same
scores (max |difference| ~1e-14 on the 924,810 ReaL votes, the EM tolerance being
1e-5; gold-confusion: the same floats, difference 0.0) from vote files of any size.
Measured (benchmarks/aggregation_scale.py, synthetic votes, 2 loaded cores): 24M votes
in 5.5 GB peak RSS; the in-memory path needs ~0.5 GB per million votes; at 1M votes
10.3 s against crowd-kit's 11.8 s in the same run. The maths is in ``auditing.aggregation.sharded``; this module is the
Beam wiring and the I/O, all through Beam's ``FileSystems`` (local paths, ``gs://``).

Elements are shards, never single votes (Beam costs ~28 us per element, 11 minutes
per pass over 24M single votes):

1. ``ReadValidateVotes``: each vote file is read in chunks of ``CHUNK_ROWS`` raw rows
   (Parquet row batches, CSV / JSONL line blocks, the ReaL npz's rows) and each chunk
   validated by ``auditing.votes.validate_votes``; bad rows go to a counted quarantine.
2. ``ShardVotes``: chunks are cut by a hash of the image into ceil(votes /
   ``votes_per_shard``) buckets and grouped (``CoGroupByKey``, with the original labels
   when the class prior depends on them), so a shard holds every vote of its images.
   Duplicates across chunks are quarantined there (the first vote in file order is
   kept, as ``validate_votes`` does within a batch); raters get codes from one sorted
   vocabulary (a side input).
3. ``DawidSkeneIterations``: one ``Map`` over the shards per iteration, whose side
   input is every shard's previous ``ShardStep`` (the state it used and its sufficient
   statistics: rater x answer x truth counts, kilobytes); each shard does the M-step
   from those (``next_state``, summed in shard order: the same floats everywhere),
   then its E-step. Fixed-matrix methods
   (``fixed-matrices``, e.g. gold-confusion's matrices) are one ``Map`` pass. The
   original label as a pseudo-rater (``original_label_rater``) is added to each
   shard's votes where the original labels are joined. Gold questions (small) never
   enter the shards: ``gold-confusion``'s matrices are counted on them in a ``Map`` on
   the rater coding (the in-memory worker order, so the same floats), then one
   posterior pass; Dawid-Skene with gold is seeded by those matrices and adds the gold
   answers' statistics, posteriors held at the truth, to every M-step (side inputs).
4. ``WriteScores``: per shard, ``scores-SSSSS-of-NNNNN.parquet`` (file_name, label,
   score) under ``out_prefix``.

Why EM runs as blocks of unrolled iterations, several pipeline runs if needed: a
pipeline graph cannot loop, and the two extremes both cost. One run per iteration
pays a job start per iteration (~1 s on the DirectRunner, minutes on Dataflow) and
rereads the votes each time; one run of ``n_iter`` (100) unrolled iterations pays
a stage per iteration even after convergence (it then does no work, but it still
runs: ~0.05-0.1 s on the DirectRunner at 1M votes, more to build). EM converges in 14-28
iterations on ReaL-like votes, so the first run unrolls ``iterations_per_run`` (16)
and each later run as many as the convergence rate so far predicts are left
(``next_block_size``): two runs at most in practice (on Dataflow, where job starts
dominate, pass a larger block). Iterations after convergence send nothing and the
state passes through unchanged, so the result does not depend on the block size.
Between runs the state (rater matrices, priors, history: kilobytes) and the vote
shards (written once, by the first run) are files under ``out_prefix``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from auditing import votes as votes_lib
from auditing.errors import InputError
from auditing.aggregation import sharded
from auditing.aggregation.gold_confusion import GoldConfusion, GoldConfusionParams
from auditing.aggregation.methods import GoldAnswers, gold_answers, validate_params
from auditing.aggregation.original_label_rater import DEFAULT_RATER_ID as DEFAULT_PSEUDO_RATER_ID
from auditing.aggregation.original_label_rater import OriginalLabelRaterParams, original_label_answers
from auditing.aggregation.priors import (ORIGINAL, PROPOSED, SHARED, original_label_prior_groups,
                                         resolve_prior_classes)
from auditing.aggregation.sharded import EMState, ShardStatistics, VoteShard
from auditing.gold import Gold

CHUNK_ROWS = 100_000  # raw rows read and validated per element
DEFAULT_VOTES_PER_SHARD = 100_000
DEFAULT_ITERATIONS_PER_RUN = 16
# Below this many votes the in-memory crowd-kit path is the default: it is the reference,
# and at the ReaL size (0.9M votes, ~0.5 GB per million) a pipeline is not worth its start.
SHARDED_MIN_VOTES = 5_000_000
GLOBAL_GROUPS = ("all",)
ORIGINAL_LABEL_GROUPS = (ORIGINAL, PROPOSED, SHARED)
SHARDED_METHODS = ("dawid-skene", "gold-confusion", "fixed-matrices")
DS_PARAMS = ("n_iter", "tol", "smoothing", "shrinkage", "prior", "prior_classes", "rater_history",
             "rater_history_strength", "original_label_rater", "use_gold", "gold_smoothing")
GOLD_CONFUSION_PARAMS = tuple(GoldConfusionParams.model_fields)
FIXED_PARAMS = ("rater_matrices", "class_prior", "prior", "prior_classes", "default_matrix", "original_label_rater")
DUPLICATE_DETAIL = "a vote of this rater on this (file_name, label) came earlier"


class ShardedAggregationError(InputError):
    """Bad arguments or inputs of the sharded aggregation; the message names the key, file or rater."""


# ---------------------------------------------------------------- file I/O (FileSystems only)

def _open(path: str, compressed: bool = False):
    return FileSystems.open(path, compression_type=CompressionTypes.AUTO if compressed
                            else CompressionTypes.UNCOMPRESSED)


def _write_bytes(path: str, data: bytes) -> str:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    return path


def _write_parquet(path: str, frame: pd.DataFrame) -> str:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    return _write_bytes(path, buffer.getvalue())


def _write_json(path: str, value: Any) -> str:
    return _write_bytes(path, (json.dumps(value, indent=1) + "\n").encode())


def _read_json(path: str) -> Any:
    with _open(path) as f:
        return json.loads(f.read().decode())


def _join(prefix: str, name: str) -> str:
    return FileSystems.join(prefix, name) if prefix.endswith(("/", os.sep)) else prefix + name


# ---------------------------------------------------------------- step 1: read and validate

def _format_of(path: str, fmt: str | None) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return fmt or votes_lib.detect_format(name)


def read_vote_chunks(path: str, fmt: str | None = None, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Raw rows of one vote file in chunks, as ``auditing.votes.read_votes`` gives them
    for the whole file (same columns, same ``row`` numbers), through FileSystems."""
    fmt = _format_of(path, fmt)
    if fmt not in votes_lib.FORMATS:
        raise votes_lib.VoteFileError(f"{path}: unknown vote format {fmt!r}; expected one of {votes_lib.FORMATS}")
    if fmt == "real-npz":
        with _open(path) as f:
            raw = votes_lib.read_real_raters_raw(io.BytesIO(f.read()))
        for start in range(0, len(raw), chunk_rows):
            yield raw.iloc[start:start + chunk_rows].reset_index(drop=True)
        return
    if fmt == "parquet":
        yield from _parquet_chunks(path, chunk_rows)
    elif fmt == "csv":
        yield from _csv_chunks(path, chunk_rows)
    else:
        yield from _jsonl_chunks(path, chunk_rows)


def _schema_columns(frame: pd.DataFrame, first_row: int) -> pd.DataFrame:
    frame = frame.reset_index(drop=True)
    frame["row"] = np.arange(first_row, first_row + len(frame))
    wanted = (*votes_lib.REQUIRED_COLUMNS, *votes_lib.OPTIONAL_COLUMNS, "row")
    return frame[[c for c in wanted if c in frame.columns]]


def _check_fields(path: str, columns: Sequence[str], where: str) -> None:
    missing = [c for c in votes_lib.REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise votes_lib.VoteFileError(f"{path}: {where} lacks the field(s) {missing}; expected "
                                      f"{list(votes_lib.REQUIRED_COLUMNS)}")


def _parquet_chunks(path: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    with _open(path) as f:
        try:
            parquet = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise votes_lib.VoteFileError(f"{path}: not a readable Parquet vote file: {e}") from e
        _check_fields(path, parquet.schema_arrow.names, "the Parquet schema")
        first = 1
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            frame = batch.to_pandas()
            yield _schema_columns(frame, first)
            first += len(frame)


def _csv_chunks(path: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    with _open(path, compressed=True) as f:
        try:
            reader = pd.read_csv(f, dtype=str, keep_default_na=False, skipinitialspace=True, chunksize=chunk_rows)
            first = 1
            for frame in reader:
                _check_fields(path, list(frame.columns), "the CSV header")
                yield _schema_columns(frame, first)
                first += len(frame)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
            raise votes_lib.VoteFileError(f"{path}: not a readable CSV vote file: {e}") from e


def _jsonl_chunks(path: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """As ``votes._read_jsonl``: ``row`` = line number, a line that is not a JSON object
    is a row with every field missing, blank lines are skipped."""
    columns = [*votes_lib.REQUIRED_COLUMNS, *votes_lib.OPTIONAL_COLUMNS]

    def frame_of(records: list[dict], rows: list[int]) -> pd.DataFrame:
        frame = pd.DataFrame.from_records(records, columns=columns)
        optional = [c for c in votes_lib.OPTIONAL_COLUMNS if frame[c].notna().any()]
        frame = frame[[*votes_lib.REQUIRED_COLUMNS, *optional]].copy()
        frame["row"] = np.asarray(rows, dtype=np.int64)
        return frame

    records: list[dict] = []
    rows: list[int] = []
    with _open(path, compressed=True) as f:
        try:
            for number, record in votes_lib.jsonl_records(io.TextIOWrapper(f, encoding="utf-8")):
                records.append(record)
                rows.append(number)
                if len(records) == chunk_rows:
                    yield frame_of(records, rows)
                    records, rows = [], []
        except UnicodeDecodeError as e:
            raise votes_lib.VoteFileError(f"{path}: not a UTF-8 JSONL vote file: {e}") from e
    if records:
        yield frame_of(records, rows)


class ReadValidateVotes(beam.PTransform):
    """(source index, path) -> validated vote chunks (dicts of arrays: file_name, label,
    rater_id, answer code, source, order, row) and, tagged ``quarantine``, (name,
    quarantine frame) pairs (``votes.QUARANTINE_COLUMNS``)."""

    def __init__(self, vote_format: str | None = None, num_classes: int = votes_lib.DEFAULT_NUM_CLASSES,
                 chunk_rows: int = CHUNK_ROWS):
        super().__init__()
        self.vote_format, self.num_classes, self.chunk_rows = vote_format, num_classes, chunk_rows

    def expand(self, files):
        return files | "ReadAndValidate" >> beam.FlatMap(self._chunks).with_outputs("quarantine", main="votes")

    def _chunks(self, indexed_path: tuple[int, str]):
        source, path = indexed_path
        for number, raw in enumerate(read_vote_chunks(path, self.vote_format, self.chunk_rows)):
            # provenance: each kept vote's file row, to name a duplicate found across chunks.
            kept, quarantine = votes_lib.validate_votes(raw, num_classes=self.num_classes, source=path,
                                                        provenance=True)
            if len(quarantine):
                yield beam.pvalue.TaggedOutput("quarantine", (f"read-{source:04d}-{number:06d}", quarantine))
            yield {"file_name": kept["file_name"].to_numpy(dtype=object),
                   "label": kept["label"].to_numpy(np.int64),
                   "rater_id": kept["rater_id"].to_numpy(dtype=object),
                   "answer": kept["answer"].cat.codes.to_numpy(np.int8),
                   "source": np.full(len(kept), source, np.int32),
                   "order": number * (1 << 32) + np.arange(len(kept), dtype=np.int64),  # file order
                   "row": kept["row"].to_numpy(np.int64)}


# ---------------------------------------------------------------- step 2: shards by image

def image_bucket(file_names: np.ndarray, n_shards: int) -> np.ndarray:
    """Shard of each image: a stable hash (pandas' siphash, fixed key) modulo n_shards."""
    return (pd.util.hash_array(np.asarray(file_names, dtype=object)) % np.uint64(n_shards)).astype(np.int64)


def _split_by_bucket(arrays: Mapping[str, np.ndarray], n_shards: int) -> Iterator[tuple[int, dict]]:
    bucket = image_bucket(arrays["file_name"], n_shards)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(n_shards + 1))
    for shard in np.flatnonzero(np.diff(bounds)):
        take = order[bounds[shard]:bounds[shard + 1]]
        yield int(shard), {k: v[take] for k, v in arrays.items()}


@dataclasses.dataclass
class NamedShard:
    """A ``VoteShard`` with its place (``index`` of ``count`` shards) and the (file_name,
    label) of each of its questions."""

    index: int
    count: int
    file_name: np.ndarray  # (Q,) object
    label: np.ndarray  # (Q,) int64
    votes: VoteShard
    pseudo_votes: int = 0  # of which the pseudo-rater's (appended last)


@dataclasses.dataclass(frozen=True)
class PseudoRater:
    """The original label as one more rater (``aggregation.original_label_rater``): on
    questions whose label is in ``classes`` (all when None) and whose image has an
    original label, it answers yes for the original label and no otherwise."""

    rater_id: str
    classes: tuple[int, ...] | None = None

    def votes(self, questions: pd.DataFrame, original: pd.DataFrame) -> pd.DataFrame:
        return original_label_answers(questions, original, None if self.classes is None
                                      else np.asarray(self.classes), self.rater_id)


@dataclasses.dataclass(frozen=True)
class PriorSpec:
    """Which class-prior groups questions fall in: one for all, or original-label groups."""

    prior: str = "global"
    prior_classes: tuple[int, ...] | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        return GLOBAL_GROUPS if self.prior == "global" else ORIGINAL_LABEL_GROUPS

    def question_groups(self, questions: pd.DataFrame, original: pd.DataFrame | None) -> np.ndarray:
        if self.prior == "global":
            return np.zeros(len(questions), np.int64)
        names = original_label_prior_groups(questions, original, self.prior_classes)["group"]
        return pd.Categorical(names, categories=ORIGINAL_LABEL_GROUPS).codes.astype(np.int64)


def build_shard(index: int, count: int, pieces: Sequence[Mapping[str, np.ndarray]],
                raters: np.ndarray, prior: PriorSpec, original: pd.DataFrame | None,
                paths: Sequence[str] = (), pseudo: PseudoRater | None = None) -> tuple[NamedShard, pd.DataFrame]:
    """One shard from its pieces: duplicates across chunks quarantined (first in file
    order kept), questions numbered in (file_name, label) order, raters coded by the
    sorted vocabulary ``raters`` (the pseudo-rater, if any, is code len(raters)).
    Returns the shard and the duplicates' quarantine."""
    arrays = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    in_file_order = np.lexsort((arrays["order"], arrays["source"]))
    arrays = {k: v[in_file_order] for k, v in arrays.items()}
    frame = pd.DataFrame({"file_name": arrays["file_name"], "label": arrays["label"],
                          "rater": arrays["rater"]})
    duplicate = frame.duplicated(["rater", "file_name", "label"], keep="first").to_numpy()
    quarantine = _duplicates_quarantine(arrays, duplicate, raters, paths)
    keep = ~duplicate
    questions = frame.loc[keep, ["file_name", "label"]].drop_duplicates().sort_values(["file_name", "label"])
    questions = questions.reset_index(drop=True)
    code = pd.MultiIndex.from_frame(questions).get_indexer(pd.MultiIndex.from_frame(frame.loc[keep, ["file_name", "label"]]))
    vote_rater, vote_answer = arrays["rater"][keep].astype(np.int64), arrays["answer"][keep].astype(np.int64)
    extra = 0
    if pseudo is not None and original is not None:
        answers = pseudo.votes(questions, original)
        extra = len(answers)
        code = np.concatenate([code, pd.MultiIndex.from_frame(questions).get_indexer(
            pd.MultiIndex.from_frame(answers[["file_name", "label"]]))])
        vote_rater = np.concatenate([vote_rater, np.full(extra, len(raters), np.int64)])
        vote_answer = np.concatenate([vote_answer, answers["answer"].cat.codes.to_numpy(np.int64)])
    # Compact dtypes: every EM iteration's stage reads the shards (7 bytes a vote, not 24).
    votes = VoteShard(prior.question_groups(questions, original), code.astype(np.int32),
                      vote_rater.astype(np.int32), vote_answer.astype(np.int8))
    return NamedShard(index, count, questions["file_name"].to_numpy(dtype=object),
                      questions["label"].to_numpy(np.int64), votes, extra), quarantine


def _duplicates_quarantine(arrays: Mapping[str, np.ndarray], duplicate: np.ndarray,
                           raters: np.ndarray, paths: Sequence[str]) -> pd.DataFrame:
    n = int(duplicate.sum())
    sources = np.asarray([*paths, ""], dtype=object)  # "" for a source index without a path
    return pd.DataFrame({
        "source": sources[np.minimum(arrays["source"][duplicate], len(paths))],
        "row": arrays["row"][duplicate], "reason": np.full(n, votes_lib.DUPLICATE_VOTE, dtype=object),
        "detail": np.full(n, DUPLICATE_DETAIL, dtype=object), "file_name": arrays["file_name"][duplicate],
        "label": arrays["label"][duplicate], "rater_id": raters[arrays["rater"][duplicate]],
        "answer": np.asarray(votes_lib.ANSWERS, dtype=object)[arrays["answer"][duplicate]]})


def _first_seen(chunk: Mapping[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    """rater_id -> (source, order) of its first vote in a chunk."""
    codes, ids = pd.factorize(chunk["rater_id"])
    first = np.unique(codes, return_index=True)[1]
    return {str(ids[c]): (int(chunk["source"][i]), int(chunk["order"][i])) for c, i in zip(codes[first], first)}


def _earliest(seen: Sequence[Mapping[str, tuple[int, int]]]) -> dict[str, tuple[int, int]]:
    total: dict[str, tuple[int, int]] = {}
    for part in seen:
        for rater, where in part.items():
            if rater not in total or where < total[rater]:
                total[rater] = where
    return total


def _add_summaries(summaries) -> tuple[int, dict[str, tuple[int, int]]]:
    summaries = list(summaries)
    return sum(n for n, _ in summaries), _earliest([seen for _, seen in summaries])


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What cutting the votes into shards needs: the vote count (before the duplicate
    check), the shard count, the sorted rater vocabulary (the codes) and the raters in
    order of first appearance."""

    n_votes: int
    n_shards: int
    vocabulary: np.ndarray
    appearance: np.ndarray


class ShardVotes(beam.PTransform):
    """Validated chunks (+ optional original-label chunks) -> ``NamedShard``s, and tagged
    ``quarantine`` (name, frame) of the duplicates found across chunks, ``raters`` (one sorted array
    of rater ids: the codes) and ``plan`` (the shard plan: vote count, vocabulary, rater
    ids in order of first appearance)."""

    def __init__(self, paths: Sequence[str], votes_per_shard: int = DEFAULT_VOTES_PER_SHARD,
                 prior: PriorSpec = PriorSpec(), pseudo: PseudoRater | None = None):
        super().__init__()
        self.paths, self.votes_per_shard, self.prior, self.pseudo = list(paths), votes_per_shard, prior, pseudo

    def expand(self, inputs):
        chunks, labels = inputs["votes"], inputs.get("original_labels")
        pseudo, votes_per_shard = self.pseudo, self.votes_per_shard

        def plan_of(summary: tuple[int, dict[str, tuple[int, int]]]) -> ShardPlan:
            n_votes, seen = summary
            if pseudo is not None and pseudo.rater_id in seen:
                raise ShardedAggregationError(f"original_label_rater.rater_id {pseudo.rater_id!r} is also a "
                                              "rater of the votes")
            return ShardPlan(n_votes, max(1, math.ceil(n_votes / votes_per_shard)),
                             np.asarray(sorted(seen), dtype=object),
                             np.asarray(sorted(seen, key=seen.__getitem__), dtype=object))

        # One combine for the vote count and the raters' first votes: each combine is
        # a stage of its own.
        plan = (chunks | "ChunkSummary" >> beam.Map(lambda c: (len(c["label"]), _first_seen(c)))
                | "AllChunks" >> beam.CombineGlobally(_add_summaries) | "ShardPlan" >> beam.Map(plan_of))
        raters = plan | "Vocabulary" >> beam.Map(lambda p: p.vocabulary)
        paths = self.paths

        def coded_pieces(chunk, plan: ShardPlan):
            coded = {k: v for k, v in chunk.items() if k != "rater_id"}  # elements are not to be mutated
            coded["rater"] = np.searchsorted(plan.vocabulary, chunk["rater_id"]).astype(np.int32)
            yield from _split_by_bucket(coded, plan.n_shards)

        pieces = chunks | "CodeAndBucket" >> beam.FlatMap(coded_pieces, beam.pvalue.AsSingleton(plan))
        grouped = {"votes": pieces}
        if labels is not None:
            grouped["labels"] = labels | "BucketLabels" >> beam.FlatMap(
                lambda frame, plan: ((b, piece) for b, piece in _split_by_bucket(
                    {"file_name": frame["file_name"].to_numpy(dtype=object),
                     "label": frame["label"].to_numpy(np.int64)}, plan.n_shards)), beam.pvalue.AsSingleton(plan))
        prior = self.prior

        def shard_of(keyed, plan: ShardPlan):
            index, parts = keyed
            if not parts["votes"]:
                return  # an image bucket with original labels but no votes
            original = None
            if parts.get("labels"):
                original = pd.DataFrame({k: np.concatenate([p[k] for p in parts["labels"]])
                                         for k in ("file_name", "label")})
            elif labels is not None:  # a bucket whose images have no original label
                original = pd.DataFrame({"file_name": pd.Series(dtype=object), "label": pd.Series(dtype=np.int64)})
            shard, quarantine = build_shard(index, plan.n_shards, parts["votes"], plan.vocabulary, prior, original,
                                            paths, pseudo)
            if len(quarantine):
                yield beam.pvalue.TaggedOutput("quarantine", (f"duplicates-{index:05d}", quarantine))
            yield shard

        if labels is None:  # nothing to join: a plain GroupByKey is cheaper than CoGroupByKey
            by_bucket = pieces | "GroupByImageBucket" >> beam.GroupByKey() | "AsParts" >> beam.MapTuple(
                lambda index, votes: (index, {"votes": list(votes)}))
        else:
            by_bucket = grouped | "GroupByImageBucket" >> beam.CoGroupByKey()
        shards = (by_bucket
                  | "BuildShards" >> beam.FlatMap(shard_of, beam.pvalue.AsSingleton(plan))
                  .with_outputs("quarantine", main="shards"))
        return {"shards": shards.shards, "quarantine": shards.quarantine, "raters": raters, "plan": plan}


# ---------------------------------------------------------------- step 3: EM and fixed matrices

@dataclasses.dataclass(frozen=True)
class RaterCoding:
    """Every rater the aggregation counts, by code: the sorted vocabulary of the votes'
    raters (codes 0..n-1, as the shards carry them), then the pseudo-rater, then raters
    found only in gold. ``appearance``: the codes in order of first appearance (vote
    raters in file order, the pseudo-rater, gold-only raters in gold order), the
    in-memory engine's worker order, in which gold-confusion averages and multiplies."""

    rater_ids: np.ndarray  # code -> rater_id
    appearance: np.ndarray  # codes, first seen first
    n_vote_raters: int

    @property
    def in_appearance_order(self) -> np.ndarray:
        return self.rater_ids[self.appearance]

    @property
    def rank(self) -> np.ndarray:
        """Place of each code in ``appearance``."""
        rank = np.empty(len(self.appearance), np.int64)
        rank[self.appearance] = np.arange(len(self.appearance))
        return rank


def rater_coding(vocabulary: np.ndarray, appearance: np.ndarray, pseudo_id: str | None = None,
                 gold_raters: Sequence[str] = ()) -> RaterCoding:
    extra = [] if pseudo_id is None else [pseudo_id]
    known = set(vocabulary.tolist()) | set(extra)
    extra += [r for r in gold_raters if r not in known]
    ids = np.concatenate([np.asarray(vocabulary, dtype=object), np.asarray(extra, dtype=object)])
    first = np.searchsorted(vocabulary, appearance) if len(vocabulary) else np.zeros(0, np.int64)
    return RaterCoding(ids, np.concatenate([first, np.arange(len(vocabulary), len(ids))]).astype(np.int64),
                       len(vocabulary))


@dataclasses.dataclass(frozen=True)
class GoldConfusionModel:
    """gold-confusion's fitted model on the codes: (W, 2, 3) P(answer | truth) rows in
    appearance order, each code's rank there, and the prior P(present)."""

    matrices: np.ndarray
    rank: np.ndarray
    prior: float

    def scores(self, votes: VoteShard) -> np.ndarray:
        """``GoldConfusion``'s posterior: the same factors in the same order, the same floats."""
        return GoldConfusion.posterior(self.matrices, self.prior, votes.n_questions, votes.vote_question,
                                       self.rank[votes.vote_rater], votes.vote_answer)

    @property
    def errors(self) -> np.ndarray:
        """(W, 3, 2) P(answer | truth) by code."""
        return self.matrices[self.rank].transpose(0, 2, 1)


def gold_confusion(params: GoldConfusionParams, gold: GoldAnswers) -> GoldConfusion:
    """The in-memory aggregator ``params`` configure, for the answers of ``gold``: its
    rules count the matrices here too (the same floats)."""
    return GoldConfusion(smoothing=params.smoothing, raters_without_gold=params.raters_without_gold,
                         prior=gold.present_share if params.prior is None else params.prior,
                         default_excludes=[] if gold.pseudo_rater is None else [gold.pseudo_rater])


def gold_confusion_params(params: Mapping[str, Any]) -> GoldConfusionParams:
    """``params`` typed as in memory (``methods.validate_params``: its error names the key)."""
    return validate_params("gold-confusion", params)


def gold_confusion_model(coding: RaterCoding, gold: GoldAnswers,
                         params: GoldConfusionParams = GoldConfusionParams()) -> GoldConfusionModel:
    """The matrices counted on ``gold`` for every coded rater (``GoldConfusion``'s rule)."""
    model = gold_confusion(params, gold)
    try:
        matrices, _ = model.rater_matrices(gold.answers, gold.true_labels, coding.in_appearance_order)
        present = model.present_prior(gold.true_labels)
    except ValueError as e:
        raise ShardedAggregationError(f"gold-counted matrices: {e}") from e
    return GoldConfusionModel(matrices, coding.rank, present)


def held_gold_statistics(coding: RaterCoding, gold: GoldAnswers, n_groups: int) -> ShardStatistics:
    """The gold answers' share of every M-step (their posteriors held at the truth)."""
    answers = gold.answers
    truth = gold.true_labels.sort_index().to_numpy(np.int64)  # tasks 0..T-1
    raters = pd.Index(coding.rater_ids).get_indexer(answers["worker"])
    shard = VoteShard(np.zeros(len(truth), np.int64), answers["task"].to_numpy(np.int64), raters.astype(np.int64),
                      pd.Categorical(answers["label"], categories=votes_lib.ANSWERS).codes.astype(np.int64))
    return sharded.held_truth_statistics(shard, truth, len(coding.rater_ids), n_groups)


@dataclasses.dataclass(frozen=True)
class EMModel:
    """What every iteration needs besides the state: sizes, pseudo-counts, hyper-parameters,
    and with gold the held gold statistics and the gold-counted seed matrices."""

    n_raters: int
    n_groups: int
    pseudo_counts: np.ndarray | None
    shrinkage: float
    tol: float
    n_iter: int
    held: ShardStatistics | None = None
    seed_errors: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ShardStep:
    """What a shard sends on after an EM step: its ``index``, the ``state`` its
    statistics were computed under (None before iteration 0), its ``stats`` (None once
    EM is done) and, for the seeded initialisation, the ``seed_priors`` used."""

    index: int
    state: EMState | None
    stats: ShardStatistics | None
    seed_priors: np.ndarray | None = None


def next_state(steps: Sequence[ShardStep], m: EMModel) -> EMState:
    """The M-step from every shard's last step: iteration 0 from the initial posteriors'
    statistics, else ``sharded.advance``; a done state (or one without statistics: the
    start of a later run) passes through. Summed in shard order, so that every shard
    that computes it gets the same floats."""
    ordered = sorted(steps, key=lambda s: s.index)
    totals = [s.stats for s in ordered if s.stats is not None]
    current = ordered[0].state
    if current is not None and (current.done(m.n_iter) or not totals):
        return current
    total = sum(totals[1:], totals[0])
    if current is None:
        seed_priors = ordered[0].seed_priors
        return sharded.initial_state(total, m.pseudo_counts, m.shrinkage, m.held,
                                     None if seed_priors is None else m.seed_errors, seed_priors)
    return sharded.advance(current, total, m.pseudo_counts, m.shrinkage, m.tol, m.held)


class DawidSkeneIterations(beam.PTransform):
    """``count`` unrolled EM iterations: (shards, previous steps, model) -> the shards'
    last steps (``next_state`` of them is the state after the block).

    One stage per iteration: a ``Map`` over the shards whose side input is the list of
    every shard's previous ``ShardStep``; each shard does the M-step itself from those
    statistics (kilobytes per shard: W x 3 x 2 counts; summing a few hundred of them is
    microseconds) and then its E-step. A combine per iteration would cost a second stage
    (its group-by and merge) and ~5 more transforms to build: measured on the
    DirectRunner at 1M votes, ~0.2 s per iteration. Once the state is done later
    iterations send no statistics and the state passes through unchanged."""

    def __init__(self, first: int, count: int):
        super().__init__()
        self.first, self.count = first, count

    def expand(self, inputs):
        shards, steps, model = inputs["shards"], inputs["previous"], inputs["model"]

        def e_step(shard: NamedShard, previous: list[ShardStep], m: EMModel) -> ShardStep:
            state = next_state(previous, m)
            if state.done(m.n_iter):
                return ShardStep(shard.index, state, None)
            return ShardStep(shard.index, state, sharded.e_step_statistics(shard.votes, state, m.n_raters,
                                                                           m.n_groups))

        for t in range(self.first, self.first + self.count):
            steps = shards | f"EMStep{t}" >> beam.Map(e_step, beam.pvalue.AsList(steps),
                                                      beam.pvalue.AsSingleton(model))
        return steps


def _initial_steps(shards, model, seeded: bool = False):
    """The shards' statistics of the initial posteriors: the majority vote's, or with
    ``seeded`` (gold) those of one E-step under the seed matrices with the majority
    vote's class priors (as ``PresenceDawidSkene`` with ``initial_error``)."""
    def majority(shard: NamedShard, m: EMModel) -> ShardStep:
        return ShardStep(shard.index, None, sharded.shard_statistics(
            shard.votes, sharded.majority_posteriors(shard.votes), m.n_raters, m.n_groups))

    steps = shards | "MajorityStatistics" >> beam.Map(majority, beam.pvalue.AsSingleton(model))
    if not seeded:
        return steps

    def seeded_step(shard: NamedShard, previous: list[ShardStep], m: EMModel) -> ShardStep:
        totals = [s.stats for s in sorted(previous, key=lambda s: s.index)]
        priors = sharded.class_priors(sum(totals[1:], totals[0]))
        return ShardStep(shard.index, None, sharded.shard_statistics(
            shard.votes, sharded.posteriors(shard.votes, m.seed_errors, priors), m.n_raters, m.n_groups), priors)

    return shards | "SeededStatistics" >> beam.Map(seeded_step, beam.pvalue.AsList(steps),
                                                   beam.pvalue.AsSingleton(model))


def next_block_size(state: EMState, tol: float, n_iter: int, default: int) -> int:
    """Iterations to unroll in the next run: EM's change shrinks about geometrically, so
    the rate of the last three changes predicts how many are left (+1 for safety);
    ``default`` while there is no rate to go by. Never past ``n_iter``."""
    left = n_iter - state.iteration
    recent = [c for c in state.changes[-4:] if c > 0]
    if len(recent) >= 2:
        rate = (recent[-1] / recent[0]) ** (1 / (len(recent) - 1))
        if 0 < rate < 1:
            return max(1, min(left, math.ceil(math.log(tol / recent[-1]) / math.log(rate)) + 1))
    return max(1, min(left, default))


# ---------------------------------------------------------------- step 4: writing

def _shard_name(kind: str, index: int, count: int, suffix: str) -> str:
    return f"{kind}-{index:05d}-of-{count:05d}{suffix}"


def write_scores(out_prefix: str, shard: NamedShard, scores: np.ndarray) -> str:
    path = _join(out_prefix, _shard_name("scores", shard.index, shard.count, ".parquet"))
    return _write_parquet(path, pd.DataFrame({"file_name": shard.file_name, "label": shard.label,
                                              "score": scores}))


def write_vote_shard(out_prefix: str, shard: NamedShard) -> str:
    """The shard as .npz (no pickles: file names as a fixed-width unicode array)."""
    buffer = io.BytesIO()
    v = shard.votes
    np.savez(buffer, index=shard.index, count=shard.count, file_name=shard.file_name.astype(str),
             label=shard.label, question_group=v.question_group, vote_question=v.vote_question,
             vote_rater=v.vote_rater, vote_answer=v.vote_answer)
    return _write_bytes(_join(out_prefix, _shard_name("votes/votes", shard.index, shard.count, ".npz")),
                        buffer.getvalue())


def read_vote_shard(path: str) -> NamedShard:
    with _open(path) as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
        votes = VoteShard(data["question_group"], data["vote_question"], data["vote_rater"], data["vote_answer"])
        return NamedShard(int(data["index"]), int(data["count"]), data["file_name"].astype(object),
                          data["label"], votes)


def _state_to_json(state: EMState) -> dict[str, Any]:
    def listed(a):
        return None if a is None else np.asarray(a).tolist()
    return {"iteration": state.iteration, "errors": listed(state.errors), "priors": listed(state.priors),
            "previous_errors": listed(state.previous_errors), "previous_priors": listed(state.previous_priors),
            "changes": list(state.changes), "converged": state.converged}


def _state_from_json(value: Mapping[str, Any]) -> EMState:
    def array(a):
        return None if a is None else np.asarray(a, dtype=np.float64)
    return EMState(value["iteration"], array(value["errors"]), array(value["priors"]),
                   array(value["previous_errors"]), array(value["previous_priors"]),
                   tuple(value["changes"]), value["converged"])


def write_quarantine(out_prefix: str, named: tuple[str, pd.DataFrame]) -> dict[str, int]:
    """One quarantine frame as quarantine-NAME.parquet (raw fields as text, None kept);
    returns its rows per reason."""
    name, frame = named
    text = {c: frame[c].where(frame[c].isna(), frame[c].astype(str)).astype(object)
            for c in votes_lib.QUARANTINE_COLUMNS if c != "row"}
    _write_parquet(_join(out_prefix, f"quarantine-{name}.parquet"), frame.assign(**text))
    return {str(k): int(v) for k, v in frame["reason"].value_counts().items()}


def _sum_sizes(rows) -> tuple[int, int, int]:
    total = [0, 0, 0]
    for row in rows:
        total = [a + b for a, b in zip(total, row)]
    return tuple(total)


OUTPUT_PATTERNS = ("scores-*.parquet", "votes/votes-*.npz", "quarantine-*.parquet", "em-state.json", "counts.json")


def _clear_outputs(out_prefix: str, patterns: Sequence[str] = OUTPUT_PATTERNS) -> None:
    """Outputs of an earlier run under the same prefix would be globbed as this run's."""
    for pattern in patterns:
        old = [m.path for m in FileSystems.match([_join(out_prefix, pattern)])[0].metadata_list]
        if old:
            FileSystems.delete(old)


def _add_counts(counts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


# ---------------------------------------------------------------- the entry point

@dataclasses.dataclass
class ShardedAggregation:
    """What ``aggregate_sharded`` wrote and measured. Scores are in ``score_paths``
    (Parquet: file_name, label, score), never gathered here; ``read_scores`` does that
    for small results and tests."""

    method: str
    out_prefix: str
    score_paths: list[str]
    counts: dict[str, Any]  # read, kept, quarantined, quarantined_by_reason, questions, raters, shards
    rater_ids_: np.ndarray
    errors_: np.ndarray | None  # (raters, 3 answers, 2 truths) P(answer | truth)
    priors_: np.ndarray | None  # (groups, 2)
    prior_groups: tuple[str, ...]
    n_iter_: int | None = None
    converged_: bool | None = None
    changes_: tuple[float, ...] = ()
    pipeline_runs: int = 1

    def read_scores(self) -> pd.DataFrame:
        frames = []
        for path in self.score_paths:
            with _open(path) as f:
                frames.append(pd.read_parquet(io.BytesIO(f.read())))
        if not frames:
            return pd.DataFrame({"file_name": pd.Series(dtype=object), "label": pd.Series(dtype=np.int64),
                                 "score": pd.Series(dtype=np.float64)})
        return pd.concat(frames, ignore_index=True)


def _check_params(method: str, params: Mapping[str, Any]) -> None:
    if method not in SHARDED_METHODS:
        raise ShardedAggregationError(f"method {method!r} has no sharded implementation; "
                                      f"expected one of {SHARDED_METHODS} (the others run in memory)")
    allowed = {"dawid-skene": DS_PARAMS, "gold-confusion": GOLD_CONFUSION_PARAMS}.get(method, FIXED_PARAMS)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ShardedAggregationError(f"params {unknown} are not options of sharded {method!r}; "
                                      f"expected some of {list(allowed)}")
    if method != "gold-confusion" and params.get("prior", "global") not in ("global", "original-label"):
        raise ShardedAggregationError(f"params.prior must be 'global' or 'original-label', got {params['prior']!r}")
    if method == "fixed-matrices" and "rater_matrices" not in params:
        raise ShardedAggregationError("method 'fixed-matrices' needs params.rater_matrices (rater_id -> (2, 3))")


def _pseudo_rater(params: Mapping[str, Any]) -> PseudoRater | None:
    """params.original_label_rater ({classes, rater_id}; ``present_if`` only matters when
    its matrix is counted on gold, before this pass) as a ``PseudoRater``."""
    spec = params.get("original_label_rater")
    if spec is None:
        return None
    spec = dict(spec) if isinstance(spec, Mapping) else spec.model_dump()
    classes = resolve_prior_classes(spec.get("classes"))
    return PseudoRater(str(spec.get("rater_id") or DEFAULT_PSEUDO_RATER_ID),
                       None if classes is None else tuple(int(c) for c in classes))


def _prior_spec(method: str, params: Mapping[str, Any]) -> PriorSpec:
    if method == "gold-confusion":  # its prior is P(present), one for all questions
        return PriorSpec()
    classes = resolve_prior_classes(params.get("prior_classes"))
    return PriorSpec(params.get("prior", "global"), None if classes is None else tuple(int(c) for c in classes))


def _em_model(coding: RaterCoding, params: Mapping[str, Any], n_groups: int,
              gold: GoldAnswers | None = None) -> EMModel:
    raters = coding.rater_ids
    history = None
    if params.get("rater_history"):
        # Of the votes' raters (and the pseudo-rater), as in memory, where the history is
        # matched before gold adds its raters.
        voting = raters[:len(raters) - _gold_only_count(coding, gold)]
        history = sharded.history_pseudo_counts(voting, {str(k): v for k, v in params["rater_history"].items()},
                                                float(params.get("rater_history_strength", 50.0)))
        history = np.concatenate([history, np.zeros((len(raters) - len(voting), *history.shape[1:]))])
    held = seed = None
    if gold is not None:
        held = held_gold_statistics(coding, gold, n_groups)
        seeding = GoldConfusionParams(smoothing=float(params.get("gold_smoothing", 1.0)))
        seed = gold_confusion_model(coding, gold, seeding).errors
    return EMModel(len(raters), n_groups,
                   sharded.smoothing_pseudo_counts(len(raters), float(params.get("smoothing", 1.0)), history),
                   float(params.get("shrinkage", 0.0)), float(params.get("tol", 1e-5)),
                   int(params.get("n_iter", 100)), held, seed)


def _gold_only_count(coding: RaterCoding, gold: GoldAnswers | None) -> int:
    if gold is None:
        return 0
    return len(coding.rater_ids) - coding.n_vote_raters - (gold.pseudo_rater is not None)


def _gold_answers(method: str, params: Mapping[str, Any], gold: Gold | None,
                  original_labels: pd.DataFrame | str | None) -> GoldAnswers | None:
    """The gold questions as tasks, when the method uses them (read here: gold is small)."""
    if method == "gold-confusion" and gold is None:
        raise ShardedAggregationError("gold-confusion needs gold questions (stages.votes.gold)")
    if gold is None or method == "fixed-matrices" or not params.get("use_gold", True):
        return None
    if isinstance(original_labels, str):
        with _open(original_labels) as f:
            original_labels = pd.read_parquet(io.BytesIO(f.read()), columns=["file_name", "label"])
    spec = params.get("original_label_rater")
    pseudo = None if spec is None else OriginalLabelRaterParams.model_validate(
        dict(spec) if isinstance(spec, Mapping) else spec.model_dump())
    try:
        answers = gold_answers(gold, original_labels, pseudo)
        if method == "gold-confusion":  # a bad gold set fails here, before any pipeline runs
            gold_confusion(gold_confusion_params(params), answers).rater_matrices(
                answers.answers, answers.true_labels, answers.raters)
    except ValueError as e:
        raise ShardedAggregationError(f"gold questions: {e}") from e
    return answers


def fixed_rater_errors(raters: np.ndarray, rater_matrices: Mapping[str, Any],
                       default_matrix: Any | None = None) -> np.ndarray:
    """(W, 3, 2) P(answer | truth) from rater_id -> (2, 3) P(answer in (no, maybe, yes) |
    absent, present); ``default_matrix`` for raters without one, else an error naming them."""
    matrices = {str(k): np.asarray(v, dtype=np.float64) for k, v in rater_matrices.items()}
    missing = [r for r in raters if str(r) not in matrices]
    if missing and default_matrix is None:
        raise ShardedAggregationError(f"params.rater_matrices has no matrix for {len(missing)} rater(s), e.g. "
                                      f"{missing[:3]}; give params.default_matrix for them")
    default = None if default_matrix is None else np.asarray(default_matrix, dtype=np.float64)
    return np.stack([matrices.get(str(r), default).T for r in raters]) if len(raters) else np.zeros((0, 3, 2))


def _fixed_priors(params: Mapping[str, Any], groups: tuple[str, ...]) -> np.ndarray:
    """(G, 2) from params.class_prior: P(present) for all groups, or group -> P(present)."""
    prior = params.get("class_prior", 0.5)
    if isinstance(prior, Mapping):
        unknown = sorted(set(prior) - set(groups))
        if unknown:
            raise ShardedAggregationError(f"params.class_prior names unknown group(s) {unknown}; groups: {groups}")
        present = np.array([float(prior.get(g, 0.5)) for g in groups])
    else:
        present = np.full(len(groups), float(prior))
    return np.stack([1 - present, present], axis=1)


def _original_labels_input(p: beam.Pipeline, original_labels: pd.DataFrame | str | None, chunk_rows: int):
    """Original labels as chunks: from a (file_name, label) frame, or a Parquet path read in the pipeline."""
    if original_labels is None:
        return None
    if isinstance(original_labels, str):
        def read(path):
            with _open(path) as f:
                frame = pd.read_parquet(io.BytesIO(f.read()), columns=["file_name", "label"])
            for start in range(0, len(frame), chunk_rows):
                yield frame.iloc[start:start + chunk_rows]
        return p | "OriginalLabelFile" >> beam.Create([original_labels]) | "ReadOriginalLabels" >> beam.FlatMap(read)
    frame = original_labels[["file_name", "label"]].astype({"file_name": object, "label": np.int64})
    chunks = [frame.iloc[s:s + chunk_rows] for s in range(0, len(frame), chunk_rows)]
    return p | "OriginalLabels" >> beam.Create(chunks)


def aggregate_sharded(vote_paths: Sequence[str], method: str = "dawid-skene", params: Mapping[str, Any] | None = None,
                      out_prefix: str = "", options: PipelineOptions | None = None, *,
                      original_labels: pd.DataFrame | str | None = None, gold: Gold | None = None,
                      vote_format: str | None = None, num_classes: int = votes_lib.DEFAULT_NUM_CLASSES,
                      votes_per_shard: int = DEFAULT_VOTES_PER_SHARD,
                      iterations_per_run: int = DEFAULT_ITERATIONS_PER_RUN,
                      chunk_rows: int = CHUNK_ROWS, scores_prefix: str | None = None) -> ShardedAggregation:
    """Score every (file_name, label) question of the vote files with Beam.

    ``method``: ``dawid-skene`` (params as ``aggregation.aggregate``'s: n_iter, tol,
    smoothing, shrinkage, prior, prior_classes, rater_history, rater_history_strength,
    original_label_rater, use_gold, gold_smoothing; with ``gold``: seeded from the
    gold-counted matrices, gold truth held fixed), ``gold-confusion`` (params as
    ``GoldConfusionParams``; needs ``gold``: the matrices are counted on it, then one
    pass; the same floats as in memory) or ``fixed-matrices`` (params.rater_matrices:
    rater_id -> (2, 3) P(answer | absent, present); params.class_prior: P(present), or
    group -> P(present); optional default_matrix). ``original_labels`` (a (file_name,
    label) frame or a Parquet path) is needed for ``prior: original-label`` and the
    original-label pseudo-rater; ``gold``: ``auditing.gold.Gold``.

    Writes under ``out_prefix`` (a folder ending in '/' or a file prefix; local or any
    FileSystems scheme): scores-*.parquet (under ``scores_prefix`` when given: the
    only output a caller keeps), votes/votes-*.npz (the shards, for later EM runs),
    quarantine-*.parquet, em-state.json, counts.json.
    """
    from pipelines.beam_options import make_options

    params = dict(params or {})
    _check_params(method, params)
    if not out_prefix:
        raise ShardedAggregationError("out_prefix is required (a folder or prefix for the score shards)")
    options = options or make_options("direct")
    prior, pseudo = _prior_spec(method, params), _pseudo_rater(params)
    joins_labels = prior.prior != "global" or pseudo is not None
    if joins_labels and original_labels is None:
        what = "params.prior 'original-label'" if prior.prior != "global" else "params.original_label_rater"
        raise ShardedAggregationError(f"{what} needs original_labels (file_name, label)")
    gold_tasks = _gold_answers(method, params, gold, original_labels)
    paths = [str(p) for p in vote_paths]
    n_groups = len(prior.groups)
    iterations_per_run = max(1, int(iterations_per_run))
    scores_prefix = scores_prefix or out_prefix
    _clear_outputs(out_prefix)
    _clear_outputs(scores_prefix, ("scores-*.parquet",))

    with beam.Pipeline(options=options) as p:
        files = p | "VoteFiles" >> beam.Create(list(enumerate(paths)))
        validated = files | "ReadValidateVotes" >> ReadValidateVotes(vote_format, num_classes, chunk_rows)
        inputs = {"votes": validated.votes}
        labels = _original_labels_input(p, original_labels if joins_labels else None, chunk_rows)
        if labels is not None:
            inputs["original_labels"] = labels
        sharded_votes = inputs | "ShardVotes" >> ShardVotes(paths, votes_per_shard, prior, pseudo)
        shards = sharded_votes["shards"]
        gold_raters = () if gold_tasks is None else tuple(gold_tasks.raters.tolist())
        pseudo_id = None if pseudo is None else pseudo.rater_id
        coding = sharded_votes["plan"] | "RaterCoding" >> beam.Map(
            lambda plan: rater_coding(plan.vocabulary, plan.appearance, pseudo_id, gold_raters))

        quarantine = ((validated.quarantine, sharded_votes["quarantine"]) | "AllQuarantine" >> beam.Flatten())
        by_reason = (quarantine | "WriteQuarantine" >> beam.Map(lambda named: write_quarantine(out_prefix, named))
                     | "SumQuarantine" >> beam.CombineGlobally(_add_counts))
        shard_sizes = (shards | "ShardSizes" >> beam.Map(
            lambda s: (s.votes.n_votes - s.pseudo_votes, s.votes.n_questions, 1))
                       | "SumSizes" >> beam.CombineGlobally(_sum_sizes))

        def summary(sizes, reasons, c: RaterCoding):
            votes, questions, count = sizes
            reasons = {r: int(reasons.get(r, 0)) for r in votes_lib.REASONS}
            quarantined = sum(reasons.values())
            return {"read": votes + quarantined, "kept": votes, "quarantined": quarantined,
                    "quarantined_by_reason": reasons, "questions": questions, "raters": c.n_vote_raters,
                    "shards": count, "rater_ids": [str(r) for r in c.rater_ids],
                    "appearance": c.appearance.tolist()}

        (shard_sizes | "Counts" >> beam.Map(summary, beam.pvalue.AsSingleton(by_reason, default_value={}),
                                            beam.pvalue.AsSingleton(coding))
         | "WriteCounts" >> beam.Map(lambda c: _write_json(_join(out_prefix, "counts.json"), c)))

        if method == "fixed-matrices":
            errors = coding | "RaterMatrices" >> beam.Map(
                lambda c: fixed_rater_errors(c.rater_ids, params["rater_matrices"], params.get("default_matrix")))
            priors = _fixed_priors(params, prior.groups)
            shards | "PosteriorScores" >> beam.Map(
                lambda s, e: write_scores(scores_prefix, s, sharded.posteriors(s.votes, e, priors)[:, 1]),
                beam.pvalue.AsSingleton(errors))
        elif method == "gold-confusion":
            model = coding | "GoldMatrices" >> beam.Map(gold_confusion_model, gold_tasks, gold_confusion_params(params))
            shards | "PosteriorScores" >> beam.Map(lambda s, m: write_scores(scores_prefix, s, m.scores(s.votes)),
                                                   beam.pvalue.AsSingleton(model))
        else:
            shards | "WriteVoteShards" >> beam.Map(lambda s: write_vote_shard(out_prefix, s))
            model = coding | "EMModel" >> beam.Map(_em_model, params, n_groups, gold_tasks)
            # The iterations read the votes only: the questions' names stay out of the
            # elements every iteration's stage decodes.
            em_shards = shards | "VotesOnly" >> beam.Map(lambda s: dataclasses.replace(s, file_name=None, label=None))
            steps = _initial_steps(em_shards, model, seeded=gold_tasks is not None)
            _em_block(shards, steps, model, 0, iterations_per_run, out_prefix, scores_prefix, em_shards)

    counts = _read_json(_join(out_prefix, "counts.json")) if FileSystems.exists(_join(out_prefix, "counts.json")) \
        else {"read": 0, "kept": 0, "quarantined": 0, "quarantined_by_reason": {}, "questions": 0, "raters": 0,
              "shards": 0, "rater_ids": [], "appearance": []}
    coding_ = RaterCoding(np.asarray(counts.pop("rater_ids"), dtype=object),
                          np.asarray(counts.pop("appearance"), dtype=np.int64), counts["raters"])
    if method == "fixed-matrices":
        errors = fixed_rater_errors(coding_.rater_ids, params["rater_matrices"], params.get("default_matrix"))
        return ShardedAggregation(method, out_prefix, _score_paths(scores_prefix), counts, coding_.rater_ids, errors,
                                  _fixed_priors(params, prior.groups), prior.groups)
    if method == "gold-confusion":
        fitted = gold_confusion_model(coding_, gold_tasks, gold_confusion_params(params))
        return ShardedAggregation(method, out_prefix, _score_paths(scores_prefix), counts, coding_.rater_ids,
                                  fitted.errors, np.array([[1 - fitted.prior, fitted.prior]]), prior.groups)
    runs = 1
    state_path = _join(out_prefix, "em-state.json")
    model = _em_model(coding_, params, n_groups, gold_tasks)
    state = _state_from_json(_read_json(state_path)) if FileSystems.exists(state_path) else None
    while state is not None and not state.done(model.n_iter):
        # Another block: the vote shards written by the first run, the state from the last.
        shard_paths = sorted(m.path for m in FileSystems.match([_join(out_prefix, "votes/votes-*.npz")])[0].metadata_list)
        with beam.Pipeline(options=options) as p:
            shards = (p | "VoteShardFiles" >> beam.Create(shard_paths)
                      | "ReadVoteShards" >> beam.Map(read_vote_shard))
            model_pc = p | "EMModel" >> beam.Create([model])
            start = p | "State" >> beam.Create([ShardStep(0, state, None)])
            _em_block(shards, start, model_pc, state.iteration,
                      next_block_size(state, model.tol, model.n_iter, iterations_per_run), out_prefix, scores_prefix)
        state = _state_from_json(_read_json(state_path))
        runs += 1
    return ShardedAggregation(method, out_prefix, _score_paths(scores_prefix), counts, coding_.rater_ids,
                              None if state is None else state.errors, None if state is None else state.priors,
                              prior.groups, None if state is None else state.iteration,
                              None if state is None else state.converged, () if state is None else state.changes,
                              runs)


def _em_block(shards, steps, model, first: int, count: int, out_prefix: str, scores_prefix: str,
              em_shards=None) -> None:
    """``count`` iterations from the shards' ``steps`` (over ``em_shards``, the shards
    without their questions' names, when given); writes em-state.json, and the scores if
    done."""
    last = {"shards": shards if em_shards is None else em_shards, "previous": steps, "model": model} | f"Iterations{first}" >> DawidSkeneIterations(
        first, count)
    final = (shards.pipeline | "Final" >> beam.Create([None])
             | "FinalState" >> beam.Map(lambda _, steps, m: next_state(steps, m), beam.pvalue.AsList(last),
                                        beam.pvalue.AsSingleton(model)))
    final | "WriteState" >> beam.Map(lambda s: _write_json(_join(out_prefix, "em-state.json"), _state_to_json(s)))

    def scores_if_done(shard: NamedShard, s: EMState, m: EMModel):
        if s.done(m.n_iter):
            yield write_scores(scores_prefix, shard, s.current_posteriors(shard.votes)[:, 1])

    shards | "WriteScores" >> beam.FlatMap(scores_if_done, beam.pvalue.AsSingleton(final),
                                           beam.pvalue.AsSingleton(model))


def _score_paths(out_prefix: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([_join(out_prefix, "scores-*.parquet")])[0].metadata_list)


def estimate_vote_count(vote_paths: Sequence[str], vote_format: str | None = None) -> int:
    """Votes in the files without reading them all: Parquet row counts from the footer,
    ReaL npz answered cells, CSV/JSONL bytes / mean bytes per line of the first 1,000."""
    total = 0
    for path in map(str, vote_paths):
        fmt = _format_of(path, vote_format)
        if fmt == "parquet":
            with _open(path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        elif fmt == "real-npz":
            with _open(path) as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
                total += int(data["tensor"].any(axis=2).sum())
        else:
            size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
            with _open(path, compressed=True) as f:
                head = [f.readline() for _ in range(1001)]
            lines = [h for h in head[1:] if h]
            total += int(size / max(np.mean([len(h) for h in lines]) if lines else 1, 1))
    return total


def prefers_sharded(vote_paths: Sequence[str], vote_format: str | None = None,
                    min_votes: int = SHARDED_MIN_VOTES) -> bool:
    """Whether the stage should take the sharded path (from ``min_votes`` votes)."""
    return estimate_vote_count(vote_paths, vote_format) >= min_votes


__all__ = ["DawidSkeneIterations", "NamedShard", "PriorSpec", "PseudoRater", "ReadValidateVotes", "ShardVotes",
           "ShardStep", "ShardedAggregation", "ShardedAggregationError", "aggregate_sharded", "build_shard",
           "estimate_vote_count", "fixed_rater_errors", "image_bucket", "next_block_size", "next_state", "prefers_sharded", "read_vote_chunks",
           "read_vote_shard", "write_scores", "write_vote_shard"]
