"""Stage 6: write an audit as a versioned TFDS dataset, through TFDS's writers.

The release is ``<out>/tfds/<name>/<version>/`` in ``array_record`` (readable without
TensorFlow: ``tfds.builder_from_directory(path).as_data_source('validation')``), with
the features of TFDS ``imagenet2012_real`` (``file_name``, ``original_label``,
``real_label``) plus ``label_scores`` (every rated (label, score) of the image).
Beside TFDS's own files it holds ``RELEASE_NOTES.md``, ``manifest.json`` (sha256 of
every input and of the config) and ``counts.json``.

The version folder may be local or on an object store (``gs://``, ``s3://``): it is
written through Beam's ``FileSystems`` under the commit protocol of ``pipelines.commit``
(no rename: the version exists once its ``_COMMITTED.json`` marker, written last,
lists every file with its size and sha256). A crash leaves no committed partial version,
and a committed version is never overwritten. Versions follow TFDS's semantics (see
``auditing.versions.next_version``). Users read a remote version through
``pipelines.release_pull.load_release``.

Two writers make the same dataset (same builder, features, records, shards and commit):
``beam`` is TFDS's Beam path (``download_and_prepare`` runs a Beam job; it scales out on
Dataflow), ``local`` is TFDS's own in-process path for generator builders. ``auto``
picks ``local`` for small tables on the in-process direct runner (see ``choose_writer``).
"""
from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
import numpy as np
import pandas as pd
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import writer as tfds_writer
from tensorflow_datasets.proto import tf_example_pb2
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from auditing.errors import InputError
from auditing.imagenet import imagenet_wnids
from auditing.versions import version_key
from pipelines import commit

SPLIT = "validation"
ROWS_PER_CHUNK = 2000
WRITERS = ("auto", "beam", "local")
# Where ``auto`` stops writing in-process. TFDS's Beam writer runs several Beam steps per
# record (encode, serialize, hash the key, shuffle, write), and Beam's direct runner
# costs ~28 us per element per step plus seconds to start a job: a 50,000-image release
# took ~10 s through Beam and well under 1 s in-process. In-process, the serialized
# records of the split are held in memory until the shards are written (TFDS's shuffler
# spills to disk past ~1 GB); a million ~250-byte records is a few hundred MB, beyond
# which Beam's workers (and on Dataflow, its many machines) are the better writer.
LOCAL_WRITER_MAX_ROWS = 1_000_000
HOMEPAGE = "https://github.com/google-research/reassessed-imagenet"
CITATION = """@article{beyer2020imagenet,
  title={Are we done with ImageNet?},
  author={Lucas Beyer and Olivier J. H\\'enaff and Alexander Kolesnikov and Xiaohua Zhai and A\\"aron van den Oord},
  journal={arXiv preprint arXiv:2002.05709},
  year={2020}
}"""


class SerializedExample(bytes):
    """A record already encoded and serialized by ``serialize_row`` (the fast path);
    TFDS's encode and serialize steps pass it through unchanged."""


def _serialize_example_deterministically(self, example):
    if isinstance(example, SerializedExample):
        return bytes(example)
    return self.get_tf_example(example).SerializeToString(deterministic=True)


_encode_features = tfds.features.FeaturesDict.encode_example


def _encode_unless_serialized(self, example):
    return example if isinstance(example, SerializedExample) else _encode_features(self, example)


# Same inputs must give byte-identical release files. protobuf orders the map of a
# tf.train.Example's features differently in each process unless asked not to, and
# TFDS has no option for it; this module is imported wherever a release is written
# (Beam workers unpickle the builder from it), so the patches are in force there too.
example_serializer.ExampleSerializer.serialize_example = _serialize_example_deterministically
# TFDS encodes and serializes each record through its generic feature tree (~0.5 ms a
# record: most of a 50,000-image release write). Records without images are built
# here directly as the same tf.train.Example (serialize_row; a test checks the bytes
# against TFDS's own path), and TFDS's steps let them through.
tfds.features.FeaturesDict.encode_example = _encode_unless_serialized


# TFDS's Encoding.BYTES of a float64 scalar: its 8 bytes in native order.
_float64_bytes = struct.Struct("=d").pack


def serialize_row(row: Mapping[str, Any], num_classes: int) -> SerializedExample:
    """The release record of a row without an image, byte for byte what TFDS's
    ``encode_example`` + deterministic serialization of ``release_features`` give."""
    return RecordSerializer()(row["file_name"], row["original_label"], row["real_label"], row["score_labels"],
                              row["scores"], row.get("awaiting_votes"), num_classes)


class RecordSerializer:
    """``serialize_row`` of a row's cells, for many rows: each record is serialized from
    one tf.train.Example whose features are all present, its lists refilled per record
    (a new message per record, with its map entries and lists, cost 3x the serializing:
    ~0.6 s of a 50,000-image release). Not thread-safe: one per stream of records."""

    def __init__(self) -> None:
        self._lists: dict[bool, tuple[Any, list]] = {}  # with the awaiting-votes feature -> message, lists

    def _message(self, with_awaiting: bool) -> tuple[Any, list]:
        if with_awaiting not in self._lists:
            example = tf_example_pb2.Example()
            feature = example.features.feature
            kinds = [("file_name", "bytes_list"), ("original_label", "int64_list"), ("real_label", "int64_list"),
                     ("label_scores/label", "int64_list"), ("label_scores/score", "bytes_list")]
            lists = []
            for name, kind in kinds + ([("awaiting_votes", "int64_list")] if with_awaiting else []):
                values = getattr(feature[name], kind)
                # An empty list is still a present (empty) feature, as TFDS writes it.
                values.SetInParent()
                lists.append(values.value)
            self._lists[with_awaiting] = (example, lists)
        return self._lists[with_awaiting]

    def __call__(self, file_name: str, original_label: int, real_label: list[int], score_labels: list[int],
                 scores: list[float], awaiting_votes: bool | None, num_classes: int) -> SerializedExample:
        """``awaiting_votes`` None: no such feature."""
        labels = [original_label, *real_label, *score_labels]
        if min(labels) < 0 or max(labels) >= num_classes:
            bad = next(v for v in labels if not 0 <= v < num_classes)
            raise ValueError(f"{file_name}: label {bad} outside [0, {num_classes})")
        if len(score_labels) != len(scores):
            raise ValueError(f"{file_name}: {len(score_labels)} score labels, {len(scores)} scores")
        example, lists = self._message(awaiting_votes is not None)
        lists[0][:] = [file_name.encode()]
        lists[1][:] = [original_label]
        lists[2][:] = real_label
        lists[3][:] = score_labels
        lists[4][:] = list(map(_float64_bytes, scores))
        if awaiting_votes is not None:
            lists[5][:] = [int(bool(awaiting_votes))]
        return SerializedExample(example.SerializeToString(deterministic=True))


class ReleaseExistsError(InputError, FileExistsError):
    """The requested version is already released; versions are immutable."""


def release_dir(out_dir: str | os.PathLike, name: str, version: str) -> str | Path:
    """``<out>/tfds/<name>/<version>``: a Path for local outputs, a URI string otherwise."""
    if commit.is_uri(out_dir):
        return commit.join(str(out_dir), "tfds", name, version)
    return Path(out_dir) / "tfds" / name / version


def released_versions(out_dir: str | os.PathLike, name: str) -> list[str]:
    """Committed versions of ``name`` under ``out_dir`` (local or URI), oldest first.

    A version without its commit marker (being written, or left by a crashed run) is
    not released and is not listed."""
    versions = commit.committed_children(commit.join(str(out_dir), "tfds", name))
    return sorted((v for v in versions if re.fullmatch(r"\d+\.\d+\.\d+", v)), key=version_key)


def release_features(class_names: list[str], with_images: bool = False,
                     with_awaiting: bool = False) -> tfds.features.FeaturesDict:
    label = tfds.features.ClassLabel(names=class_names)
    images = {"image": tfds.features.Image(shape=(None, None, 3))} if with_images else {}
    # True where proposed pairs of the image have no answer yet (awaiting a crowd): its
    # label set comes from the answered questions only.
    awaiting = {"awaiting_votes": tfds.features.Tensor(shape=(), dtype=np.bool_)} if with_awaiting else {}
    return tfds.features.FeaturesDict({
        **images, **awaiting,
        "file_name": tfds.features.Text(),
        "original_label": label,
        "real_label": tfds.features.Sequence(tfds.features.ClassLabel(names=class_names)),
        "label_scores": tfds.features.Sequence({
            "label": tfds.features.ClassLabel(names=class_names),
            # float64, stored as its 8 bytes: the published ReaL scores need 1e-12, and a
            # tf.train.Example's float_list is float32 (~1e-7), whatever the dtype says.
            "score": tfds.features.Tensor(shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
        }),
    })


def image_table(file_names: list[str], original_labels: np.ndarray,
                label_sets: Mapping[str, Iterable[int]]) -> pd.DataFrame:
    """One row per image: file_name, original_label, real_label (sorted)."""
    return pd.DataFrame({
        "file_name": list(file_names),
        "original_label": np.asarray(original_labels).astype(np.int64).tolist(),
        "real_label": [sorted(label_sets[name]) for name in file_names],
    })


def score_lists(scores: pd.DataFrame) -> dict[str, tuple[list[int], list[float]]]:
    """file_name -> (labels, scores) of its rated questions, by label, from one row per
    rated question (file_name, label, score)."""
    # Images by first appearance (hashing the names, not sorting them), each one's rows
    # by label (a stable sort: the order sorting by file name and label gives an image).
    # Then one cut of the sorted columns at the image boundaries (not a groupby per
    # image: 50,000 small groups cost seconds).
    image, names = pd.factorize(scores["file_name"].to_numpy(dtype=object), use_na_sentinel=False)
    order = np.lexsort((scores["label"].to_numpy(np.int64), image))
    image = image[order]
    starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]]) if len(image) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(image)].tolist()
    labels = scores["label"].to_numpy(np.int64)[order].tolist()
    values = scores["score"].to_numpy(np.float64)[order].tolist()
    return {name: (labels[a:b], values[a:b]) for name, a, b in zip(names[image[starts]].tolist(), starts.tolist(), ends)}


# The scores of an audit without rated questions.
NO_SCORES = pd.DataFrame({"file_name": pd.Series(dtype=object), "label": pd.Series(dtype="int64"),
                          "score": pd.Series(dtype="float64")})


def read_score_shards(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Every rated question of the score shards ``paths`` (local files or URIs), in one table."""
    shards = [commit.read_parquet(p, columns=list(NO_SCORES.columns)) for p in paths]
    return pd.concat(shards, ignore_index=True) if shards else NO_SCORES


def with_scores(images: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """``images`` (see ``image_table``) with each image's score_labels and scores
    (empty for an image without rated questions; scores of other images are left out)."""
    per_image = score_lists(scores)
    empty = ([], [])
    found = [per_image.get(name, empty) for name in images["file_name"]]
    table = images.assign(score_labels=[labels for labels, _ in found], scores=[values for _, values in found])
    first = ["file_name", "original_label", "real_label", "score_labels", "scores"]
    return table[first + [c for c in table.columns if c not in first]]


def release_table(file_names: list[str], original_labels: np.ndarray,
                  label_sets: Mapping[str, Iterable[int]],
                  scores: pd.DataFrame) -> pd.DataFrame:
    """One row per image: file_name, original_label, real_label, score_labels, scores.

    ``scores`` has one row per rated question (file_name, label, score).
    """
    return with_scores(image_table(file_names, original_labels, label_sets), scores)


def _rgb_encoded(path: str) -> bytes:
    """The image file's bytes if it is an RGB JPEG or PNG, else the image converted to
    RGB as the models see it (grayscale, CMYK, RGBA) and encoded as PNG. Encoded bytes,
    because TFDS encodes decoded arrays with TensorFlow, which is optional here."""
    with FileSystems.open(path) as f:
        data = f.read()
    with PIL.Image.open(io.BytesIO(data)) as decoded:
        if decoded.mode == "RGB" and decoded.format in ("JPEG", "PNG"):
            return data
        buffer = io.BytesIO()
        decoded.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()


def _to_example(row: dict[str, Any], num_classes: int) -> tuple[str, Any]:
    if not row.get("image_path"):
        return row["file_name"], serialize_row(row, num_classes)
    return row["file_name"], {
        "image": _rgb_encoded(row["image_path"]),
        "file_name": row["file_name"],
        "original_label": row["original_label"],
        "real_label": row["real_label"],
        "label_scores": {"label": row["score_labels"], "score": row["scores"]},
        **({"awaiting_votes": bool(row["awaiting_votes"])} if "awaiting_votes" in row else {}),
    }


def _plain(values: list) -> list:
    """A column's cells as plain Python (parquet gives list cells back as arrays)."""
    ndarray = np.ndarray
    return [v.tolist() if isinstance(v, ndarray) else v for v in values]


def _columns(table: pd.DataFrame) -> dict[str, list]:
    """The table's columns as lists of plain values."""
    return {c: _plain(table[c].tolist()) if table[c].dtype == object else table[c].tolist() for c in table.columns}


def _rows(table: pd.DataFrame):
    """The table's rows as dicts of plain values (``DataFrame.to_dict("records")`` costs
    ~14 us a row; zipping the columns' lists a tenth of that)."""
    columns = _columns(table)
    return (dict(zip(columns, row)) for row in zip(*columns.values()))


def _table_examples(table: pd.DataFrame, num_classes: int):
    if "image_path" in table.columns:
        return (_to_example(row, num_classes) for row in _rows(table))
    # No images: each record serialized from its cells, without a dict per row.
    columns = _columns(table)
    awaiting = columns.get("awaiting_votes", itertools.repeat(None))
    serialize = RecordSerializer()
    return ((name, serialize(name, original, real, labels, scores, flag, num_classes))
            for name, original, real, labels, scores, flag in zip(
                columns["file_name"], columns["original_label"], columns["real_label"], columns["score_labels"],
                columns["scores"], awaiting))


def _write_row_chunks(table: pd.DataFrame, folder: str) -> list[str]:
    """The rows as parquet files under ``folder`` (inside the release prefix, so that
    workers anywhere read them; removed before the commit). Parquet keeps float64 exact
    and is read back without parsing text."""
    paths = []
    for start in range(0, len(table), ROWS_PER_CHUNK):
        path = commit.join(folder, f"rows-{start // ROWS_PER_CHUNK:05d}.parquet")
        commit.write_parquet(table.iloc[start:start + ROWS_PER_CHUNK], path, index=False)
        paths.append(path)
    return paths


def _read_examples(path: str, num_classes: int) -> list[tuple[str, Any]]:
    return list(_table_examples(commit.read_parquet(path), num_classes))


def _read_keyed_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    return [(row["file_name"], row) for row in _rows(commit.read_parquet(path))]


def _read_keyed_scores(path: str) -> list[tuple[str, tuple[list[int], list[float]]]]:
    return list(score_lists(read_score_shards([path])).items())


def _joined_example(item: tuple[str, Mapping[str, list]], num_classes: int) -> list[tuple[str, Any]]:
    name, joined = item
    if not joined["rows"]:
        return []  # rated, but not an image of the release (as with_scores leaves it out)
    if len(joined["scores"]) > 1:
        raise ValueError(f"{name}: scores in {len(joined['scores'])} shards; an image's scores are in one shard")
    labels, values = joined["scores"][0] if joined["scores"] else ([], [])
    return [_to_example(joined["rows"][0] | {"score_labels": labels, "scores": values}, num_classes)]


class _ExamplesFromShards(beam.PTransform):
    """The records from the per-image rows (chunk files) and the score shards, joined by
    image in the workers: no worker, and not the launcher, holds every score."""

    def __init__(self, row_chunks: list[str], score_shards: list[str], num_classes: int):
        super().__init__()
        self.row_chunks, self.score_shards, self.num_classes = row_chunks, score_shards, num_classes

    def expand(self, root):
        rows = (root | "ListImageChunks" >> beam.Create(self.row_chunks, reshuffle=True)
                | "ReadImages" >> beam.FlatMap(_read_keyed_rows))
        scores = (root | "ListScoreShards" >> beam.Create(self.score_shards, reshuffle=True)
                  | "ReadScoreShards" >> beam.FlatMap(_read_keyed_scores))
        return ({"rows": rows, "scores": scores} | "JoinByImage" >> beam.CoGroupByKey()
                | "MakeRecords" >> beam.FlatMap(_joined_example, num_classes=self.num_classes))


# Builders register themselves by class name when defined. Releases are built at run
# time with a name from the config, and must not clash with TFDS's catalogue or an
# earlier release in this process, so neither the base nor the subclasses register.
with tfds.core.registered.skip_registration():

    class AuditReleaseBuilder(tfds.core.GeneratorBasedBuilder):
        """A release; subclasses made by ``_builder_class`` set the class attributes."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES: dict[str, str] = {}
        DESCRIPTION = ""
        CLASS_NAMES: list[str] = []
        WITH_IMAGES = False
        WITH_AWAITING = False
        ROW_CHUNKS: list[str] = []
        # Score shards (parquet: file_name, label, score; an image's in one shard) to join
        # with the per-image rows of ROW_CHUNKS; empty when the rows hold the scores.
        SCORE_SHARDS: list[str] = []
        # The rows, for the in-process writer (``local``): its examples are generated
        # from them in this process, instead of by Beam workers from ROW_CHUNKS.
        LOCAL_TABLE: pd.DataFrame | None = None
        SHARD_TARGET = ""  # the version prefix (local or URI) the shards are copied into

        def _example_writer(self) -> tfds_writer.ExampleWriter:
            return _CopyingShardWriter(self.info.file_format, self.SHARD_TARGET)

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self, description=self.DESCRIPTION, features=release_features(self.CLASS_NAMES, self.WITH_IMAGES,
                                                                                       self.WITH_AWAITING),
                homepage=HOMEPAGE, citation=CITATION)

        def _split_generators(self, dl_manager):
            return {SPLIT: self._generate_examples()}

        def _generate_examples(self):
            # A generator: TFDS writes the split in this process (its writer for
            # non-Beam builders, with the same shard writer, hashing and shuffling).
            if self.LOCAL_TABLE is not None:
                return _table_examples(self.LOCAL_TABLE, len(self.CLASS_NAMES))
            # A PTransform, so TFDS writes the split with Beam (scales out on Dataflow).
            if self.SCORE_SHARDS:
                return _ExamplesFromShards(self.ROW_CHUNKS, self.SCORE_SHARDS, len(self.CLASS_NAMES))
            # Workers read the rows from chunk files rather than from an in-graph
            # beam.Create, which infers a type from every row (~0.5 ms per row) and is
            # pickled into every stage of the job.
            return ("ListRowChunks" >> beam.Create(self.ROW_CHUNKS, reshuffle=True)
                    | "ReadRows" >> beam.FlatMap(_read_examples, num_classes=len(self.CLASS_NAMES)))


_INCOMPLETE = re.compile(r"^incomplete\.[0-9a-fA-F]{32}\.")


class _CopyingShardWriter(tfds_writer.ExampleWriter):
    """TFDS's shard writer, writing a local file and copying it into the release prefix.

    array_record's writer (C++) writes local files only, so TFDS cannot write a shard to
    ``gs://``; and on Dataflow a worker's disk vanishes with the worker. So each worker
    writes its shard to a local file and copies the finished file into ``target``
    through Beam's FileSystems, which reaches object stores. For a local ``target`` the
    shard is written where TFDS asks (the launcher's staging folder, on this machine
    with local runners); for a URI always to a temporary folder of the worker, as on
    Dataflow (the shard lengths go to the release too: ``_store_split_info_in_release``)."""

    def __init__(self, file_format, target: str):
        super().__init__(file_format)
        self.target = target

    def write(self, path, examples):
        path = epath.Path(path)
        final_name = _INCOMPLETE.sub("", path.name)
        if not commit.is_uri(self.target):
            positions = super().write(path, examples)
            _copy_to(str(path), commit.join(self.target, final_name))
            return positions
        with tempfile.TemporaryDirectory(prefix="release-shard-") as local_dir:
            local = os.path.join(local_dir, final_name)
            positions = super().write(local, examples)
            _copy_to(local, commit.join(self.target, final_name))
        return positions


_store_split_info = tfds_writer.BeamWriter._store_split_info
_finalize_split = tfds_writer.BeamWriter.finalize


def _split_info_uri(beam_writer) -> str | None:
    shard_writer = getattr(beam_writer, "_example_writer", None)
    if isinstance(shard_writer, _CopyingShardWriter) and commit.is_uri(shard_writer.target):
        return commit.join(shard_writer.target, "_split_info", f"{beam_writer._filename_template.split}.json")
    return None


def _store_split_info_in_release(self, shard_infos) -> None:
    """TFDS's Beam writer has a worker write the split's shard lengths into the
    launcher's staging folder, which a Dataflow worker does not have: for a release on
    an object store they go into the release prefix (removed before the commit)."""
    uri = _split_info_uri(self)
    if uri is None:
        return _store_split_info(self, shard_infos)
    shard_infos = sorted(shard_infos, key=lambda x: x.id)
    commit.write_json(uri, {"total_size": sum(info.size for info in shard_infos),
                            "shard_lengths": [info.num_examples for info in shard_infos]})


def _finalize_split_from_release(self):
    uri = _split_info_uri(self)
    if uri is None:
        return _finalize_split(self)
    info = commit.read_json(uri)
    commit.delete_files([uri])
    return info["shard_lengths"], info["total_size"]


tfds_writer.BeamWriter._store_split_info = _store_split_info_in_release
tfds_writer.BeamWriter.finalize = _finalize_split_from_release


def _copy_to(local_path: str, destination: str) -> None:
    if not commit.is_uri(destination):
        # Same disk: a second name for the file, not a second copy of its bytes.
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(local_path, destination)
            return
        except OSError:
            pass  # another file system, or links not supported: copy
    with open(local_path, "rb") as source, commit.open_write(destination) as sink:
        shutil.copyfileobj(source, sink, 8 << 20)


def _builder_class(name: str, version: str, release_notes: Mapping[str, str], description: str,
                   row_chunks: list[str], class_names: list[str], table_columns: list[str] = (),
                   shard_target: str = "", local_table: pd.DataFrame | None = None,
                   score_shards: Sequence[str] = ()) -> type:
    """A builder named ``name`` at ``version`` whose examples are the rows stored in the
    files ``row_chunks`` (Beam; joined with ``score_shards`` if any), or the rows of
    ``local_table`` (in-process)."""
    with tfds.core.registered.skip_registration():
        return type(name, (AuditReleaseBuilder,), {
            "name": name, "__module__": __name__, "VERSION": tfds.core.Version(version),
            "RELEASE_NOTES": dict(release_notes), "DESCRIPTION": description,
            "CLASS_NAMES": class_names, "ROW_CHUNKS": row_chunks, "SHARD_TARGET": shard_target,
            "LOCAL_TABLE": local_table, "SCORE_SHARDS": list(score_shards),
            "WITH_IMAGES": "image_path" in table_columns, "WITH_AWAITING": "awaiting_votes" in table_columns})


def release_notes_markdown(name: str, release_notes: Mapping[str, str]) -> str:
    notes = "\n".join(f"## {v}\n\n{release_notes[v]}\n"
                      for v in sorted(release_notes, key=version_key, reverse=True))
    return f"# {name}\n\n{notes}"


def choose_writer(writer: str, options: PipelineOptions, num_rows: int) -> str:
    """``local`` or ``beam`` for a ``writer`` setting (``auto``, ``beam``, ``local``).

    ``auto`` writes in-process on the in-process direct runner below
    ``LOCAL_WRITER_MAX_ROWS`` records: there a Beam job only adds its per-element cost
    (the same single process does the work). Any other runner (worker processes, a
    portable worker pool, Dataflow) was chosen to run the work elsewhere, so ``auto``
    gives the job to Beam, as for larger releases."""
    if writer not in WRITERS:
        raise ValueError(f"release writer {writer!r}: expected one of {', '.join(WRITERS)}")
    if writer != "auto":
        return writer
    runner = options.view_as(StandardOptions).runner
    in_process = (runner is None or str(runner).lower() in ("direct", "directrunner")) and (
        options.view_as(DirectOptions).direct_running_mode in (None, "in_memory"))
    return "local" if in_process and num_rows < LOCAL_WRITER_MAX_ROWS else "beam"


def write_release(out_dir: str | os.PathLike, name: str, version: str, table: pd.DataFrame, *,
                  release_notes: Mapping[str, str], manifest: Mapping[str, Any],
                  counts: Mapping[str, Any], options: PipelineOptions,
                  description: str = "", diff: Mapping[str, Any] | None = None,
                  class_names: list[str] | None = None, writer: str = "auto",
                  score_shards: Sequence[str] | None = None,
                  stale_after_s: float = commit.STALE_AFTER_S) -> str | Path:
    """Write ``table`` (see ``release_table``) as ``<out>/tfds/<name>/<version>``, local or
    on an object store, and commit it. Returns its path (a Path locally, else a URI).
    ``writer`` is ``auto``, ``beam`` or ``local`` (``choose_writer``): the same release.

    With ``score_shards`` (parquet files of file_name, label, score, every score of an
    image in one of them; paths the workers can read), ``table`` has no score columns
    (see ``image_table``) and the scores come from the shards: joined with the rows by
    the Beam workers, or, by the local writer, read here one after the other.

    Refuses with ``ReleaseExistsError`` if that version is committed (or is being
    written by another live run). Leftovers of a crashed write of it are removed first.
    """
    final = release_dir(out_dir, name, version)
    if version not in release_notes:
        raise ValueError(f"release notes have no entry for version {version}")
    local = choose_writer(writer, options, len(table)) == "local"
    if score_shards is not None and (local or not score_shards):
        table = with_scores(table, read_score_shards(score_shards))
        score_shards = None
    target = str(final)
    writer = commit.PrefixWriter(target, stale_after_s=stale_after_s)
    try:
        writer.claim()
    except (commit.AlreadyCommittedError, commit.PrefixBusyError) as e:
        raise ReleaseExistsError(
            f"{final}: {e}. Released versions are never overwritten "
            "(bump stages.release.version, or run `label-audit reaudit`)") from e
    # TFDS builds its metadata in a local folder of the launcher; the shards are
    # copied into the release by the workers (see _CopyingShardWriter).
    staging = Path(tempfile.mkdtemp(prefix=f"release-{name}-{version}-"))
    try:
        row_chunks = [] if local else _write_row_chunks(table, writer.path("_rows"))
        builder_cls = _builder_class(name, version, release_notes,
                                     description or f"Audited labels ({name} {version}).",
                                     row_chunks, class_names or list(imagenet_wnids()),
                                     list(table.columns), shard_target=target,
                                     local_table=table if local else None, score_shards=score_shards or ())
        builder = builder_cls(data_dir=str(staging), file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(beam_options=None if local else options))
        if not local:
            commit.delete_prefix(writer.path("_rows"))
        built = staging / name / version
        copied = commit.list_files(target)
        for local in sorted(p for p in built.rglob("*") if p.is_file()):
            rel = local.relative_to(built).as_posix()
            if copied.get(rel) != local.stat().st_size:  # the workers' shards are there already
                _copy_to(str(local), writer.path(rel))
        writer.write_text("RELEASE_NOTES.md", release_notes_markdown(name, release_notes))
        writer.write_json("manifest.json", manifest)
        writer.write_json("counts.json", counts)
        if diff is not None:
            writer.write_json("diff.json", diff)
        writer.commit({"release": {"name": name, "version": version}})
    finally:
        writer.abort()  # nothing once committed; else what this attempt wrote
        shutil.rmtree(staging, ignore_errors=True)
    return final


def release_source(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, decoders=None):
    """(builder, validation data source) of a release version: a local version folder,
    or a committed version's URI (pulled and verified through ``release_pull.load_release``)."""
    if commit.is_uri(path):
        from pipelines.release_pull import load_release

        builder = load_release(str(path), cache_dir=cache_dir)
    else:
        builder = tfds.builder_from_directory(str(path))
    return builder, builder.as_data_source(split=SPLIT, decoders=decoders)


def read_release(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """A release version as a table (file_name, original_label, real_label, score_labels,
    scores), sorted by file name."""
    _, source = release_source(path, cache_dir)
    rows = []
    for example in source:
        rows.append({
            "file_name": example["file_name"].decode() if isinstance(example["file_name"], bytes)
            else example["file_name"],
            "original_label": int(example["original_label"]),
            "real_label": [int(v) for v in example["real_label"]],
            "score_labels": [int(v) for v in example["label_scores"]["label"]],
            "scores": [float(v) for v in example["label_scores"]["score"]],
            **({"awaiting_votes": bool(example["awaiting_votes"])} if "awaiting_votes" in example else {}),
        })
    return pd.DataFrame(rows).sort_values("file_name", ignore_index=True)
