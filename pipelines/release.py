"""Stage 6: write an audit as a versioned TFDS dataset, through TFDS's Beam path.

The release is ``<out>/tfds/<name>/<version>/`` in ``array_record`` (readable without
TensorFlow: ``tfds.builder_from_directory(path).as_data_source('validation')``), with
the features of TFDS ``imagenet2012_real`` (``file_name``, ``original_label``,
``real_label``) plus ``label_scores`` (every rated (label, score) of the image).
Beside TFDS's own files it holds ``RELEASE_NOTES.md``, ``manifest.json`` (sha256 of
every input and of the config) and ``counts.json``.

The whole version folder is built under a temporary name and renamed into place, so
a crash leaves no partial version, and an existing version is never overwritten.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
import numpy as np
import pandas as pd
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from apache_beam.options.pipeline_options import PipelineOptions

from auditing.imagenet import imagenet_wnids

SPLIT = "validation"
ROWS_PER_CHUNK = 2000
HOMEPAGE = "https://github.com/google-research/reassessed-imagenet"
CITATION = """@article{beyer2020imagenet,
  title={Are we done with ImageNet?},
  author={Lucas Beyer and Olivier J. H\\'enaff and Alexander Kolesnikov and Xiaohua Zhai and A\\"aron van den Oord},
  journal={arXiv preprint arXiv:2002.05709},
  year={2020}
}"""


def _serialize_example_deterministically(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)


# Same inputs must give byte-identical release files. protobuf orders the map of a
# tf.train.Example's features differently in each process unless asked not to, and
# TFDS has no option for it; this module is imported wherever a release is written
# (Beam workers unpickle the builder from it), so the patch is in force there too.
example_serializer.ExampleSerializer.serialize_example = _serialize_example_deterministically


class ReleaseExistsError(FileExistsError):
    """The requested version is already released; versions are immutable."""


def release_dir(out_dir: str | os.PathLike, name: str, version: str) -> Path:
    return Path(out_dir) / "tfds" / name / version


def released_versions(out_dir: str | os.PathLike, name: str) -> list[str]:
    """Complete versions of ``name`` under ``out_dir``, oldest first."""
    root = Path(out_dir) / "tfds" / name
    if not root.is_dir():
        return []
    versions = [p.name for p in root.iterdir()
                if p.is_dir() and (p / "dataset_info.json").is_file() and not p.name.startswith(".")]
    return sorted(versions, key=lambda v: tuple(int(x) for x in v.split(".")))


def release_features(class_names: list[str], with_images: bool = False) -> tfds.features.FeaturesDict:
    label = tfds.features.ClassLabel(names=class_names)
    images = {"image": tfds.features.Image(shape=(None, None, 3))} if with_images else {}
    return tfds.features.FeaturesDict({
        **images,
        "file_name": tfds.features.Text(),
        "original_label": label,
        "real_label": tfds.features.Sequence(tfds.features.ClassLabel(names=class_names)),
        "label_scores": tfds.features.Sequence({
            "label": tfds.features.ClassLabel(names=class_names),
            "score": np.float32,
        }),
    })


def release_table(file_names: list[str], original_labels: np.ndarray,
                  label_sets: Mapping[str, frozenset[int]],
                  scores: pd.DataFrame) -> pd.DataFrame:
    """One row per image: file_name, original_label, real_label, score_labels, scores.

    ``scores`` has one row per rated question (file_name, label, score).
    """
    by_image = {name: (group["label"].to_numpy(np.int64), group["score"].to_numpy(np.float32))
                for name, group in scores.sort_values(["file_name", "label"]).groupby("file_name", sort=False)}
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    rows = []
    for file_name, original in zip(file_names, original_labels):
        labels, values = by_image.get(file_name, empty)
        rows.append({
            "file_name": file_name,
            "original_label": int(original),
            "real_label": sorted(label_sets[file_name]),
            "score_labels": labels.tolist(),
            "scores": values.tolist(),
        })
    return pd.DataFrame(rows)


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


def _to_example(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    image = {}
    if row.get("image_path"):
        image = {"image": _rgb_encoded(row["image_path"])}
    return row["file_name"], {
        **image,
        "file_name": row["file_name"],
        "original_label": row["original_label"],
        "real_label": row["real_label"],
        "label_scores": {"label": row["score_labels"], "score": row["scores"]},
    }


def _write_row_chunks(table: pd.DataFrame, folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    paths = []
    for start in range(0, len(table), ROWS_PER_CHUNK):
        path = folder / f"rows-{start // ROWS_PER_CHUNK:05d}.json"
        path.write_text(table.iloc[start:start + ROWS_PER_CHUNK].to_json(orient="records", double_precision=15))
        paths.append(str(path))
    return paths


def _read_row_chunk(path: str) -> list[dict[str, Any]]:
    with FileSystems.open(path) as f:
        return json.loads(f.read())


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
        ROW_CHUNKS: list[str] = []

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self, description=self.DESCRIPTION, features=release_features(self.CLASS_NAMES, self.WITH_IMAGES),
                homepage=HOMEPAGE, citation=CITATION)

        def _split_generators(self, dl_manager):
            return {SPLIT: self._generate_examples()}

        def _generate_examples(self):
            # A PTransform, so TFDS writes the split with Beam (scales out on Dataflow).
            # Workers read the rows from JSON chunk files rather than from an in-graph
            # beam.Create, which infers a type from every row (~0.5 ms per row) and is
            # pickled into every stage of the job.
            return ("ListRowChunks" >> beam.Create(self.ROW_CHUNKS, reshuffle=True)
                    | "ReadRows" >> beam.FlatMap(_read_row_chunk)
                    | "ToExample" >> beam.Map(_to_example))


def _builder_class(name: str, version: str, release_notes: Mapping[str, str], description: str,
                   row_chunks: list[str], class_names: list[str], table_columns: list[str] = ()) -> type:
    """A builder named ``name`` at ``version`` whose examples are the rows stored in the
    JSON files ``row_chunks``."""
    with tfds.core.registered.skip_registration():
        return type(name, (AuditReleaseBuilder,), {
            "name": name, "__module__": __name__, "VERSION": tfds.core.Version(version),
            "RELEASE_NOTES": dict(release_notes), "DESCRIPTION": description,
            "CLASS_NAMES": class_names, "ROW_CHUNKS": row_chunks,
            "WITH_IMAGES": "image_path" in table_columns})


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_release(out_dir: str | os.PathLike, name: str, version: str, table: pd.DataFrame, *,
                  release_notes: Mapping[str, str], manifest: Mapping[str, Any],
                  counts: Mapping[str, Any], options: PipelineOptions,
                  description: str = "", diff: Mapping[str, Any] | None = None,
                  class_names: list[str] | None = None) -> Path:
    """Write ``table`` (see ``release_table``) as ``<out>/tfds/<name>/<version>``.

    Refuses with ``ReleaseExistsError`` if that version exists. Returns its path.
    """
    final = release_dir(out_dir, name, version)
    if final.exists():
        raise ReleaseExistsError(
            f"{final} already exists: released versions are never overwritten "
            "(bump stages.release.version, or run `label-audit reaudit`)")
    if version not in release_notes:
        raise ValueError(f"release notes have no entry for version {version}")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=final.parent))
    try:
        row_chunks = _write_row_chunks(table, staging / "rows")
        builder_cls = _builder_class(name, version, release_notes,
                                     description or f"Audited labels ({name} {version}).",
                                     row_chunks, class_names or list(imagenet_wnids()),
                                     list(table.columns))
        builder = builder_cls(data_dir=str(staging), file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(beam_options=options))
        built = staging / name / version
        notes = "\n".join(f"## {v}\n\n{release_notes[v]}\n" for v in
                          sorted(release_notes, key=lambda v: tuple(int(x) for x in v.split(".")),
                                 reverse=True))
        (built / "RELEASE_NOTES.md").write_text(f"# {name}\n\n{notes}")
        _write_json(built / "manifest.json", manifest)
        _write_json(built / "counts.json", counts)
        if diff is not None:
            _write_json(built / "diff.json", diff)
        os.rename(built, final)  # atomic: the version appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def read_release(path: str | os.PathLike) -> pd.DataFrame:
    """A release as a table (file_name, original_label, real_label, score_labels, scores)."""
    source = tfds.builder_from_directory(str(path)).as_data_source(split=SPLIT)
    rows = []
    for example in source:
        rows.append({
            "file_name": example["file_name"].decode() if isinstance(example["file_name"], bytes)
            else example["file_name"],
            "original_label": int(example["original_label"]),
            "real_label": [int(v) for v in example["real_label"]],
            "score_labels": [int(v) for v in example["label_scores"]["label"]],
            "scores": [float(v) for v in example["label_scores"]["score"]],
        })
    return pd.DataFrame(rows).sort_values("file_name", ignore_index=True)
