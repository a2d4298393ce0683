"""``stages.release``: the label sets as a versioned TFDS dataset (pipelines/release.py:
array_record through TFDS's Beam writer), with release notes, a manifest of every input
and counts. A version is never overwritten. Its key is what it holds (labels, scores,
images), not how it was computed: a re-audit that reaches the same release by another
path writes nothing.

Versions follow TFDS's semantics: a re-audit that changes existing records (a label
set or a score) is a new MAJOR version; one that only adds features to unchanged
records is MINOR; the same records re-serialised are PATCH (auditing/release_diff.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditing.release_diff import diff_label_sets
from auditing.versions import next_version, version_change
from pipelines.config import file_refs
from pipelines.stages.aggregate import images_awaiting_votes, read_scores, score_shards
from pipelines.stages.base import Artifact, Context, Inputs, Stage, StageError, cyclic_gc_paused
from pipelines.stages.dataset import image_source, original_labels
from pipelines.stages.predict import prediction_paths
from pipelines.store import content_key, file_digest


def image_rows(ctx: Context, inputs: Inputs) -> pd.DataFrame:
    """One row per image of the dataset, without its scores (pipelines/release.py
    ``image_table``), with the awaiting-votes flag and image files if the release has them."""
    from pipelines import release as release_lib

    labels = original_labels(inputs["dataset"])
    table = release_lib.image_table(labels["file_name"].tolist(), labels["label"].to_numpy(),
                                    label_set_lists(inputs["label_sets"]))
    if "pairs_awaiting_votes" in inputs["label_sets"].counts:
        table["awaiting_votes"] = table["file_name"].isin(images_awaiting_votes(inputs["label_sets"]))
    if ctx.config.stages.release.include_images:
        paths = release_image_paths(ctx, table)
        table["image_path"] = table["file_name"].map(paths)
    return table


def read_all_scores(artifact: Artifact) -> pd.DataFrame:
    """Every rated question (file_name, label, score): the shards', or scores.parquet's."""
    from pipelines import release as release_lib

    scores = read_scores(artifact)
    return release_lib.NO_SCORES if scores is None else scores


def release_table(ctx: Context, inputs: Inputs) -> pd.DataFrame:
    """One row per image of the dataset, with its scores (pipelines/release.py ``release_table``)."""
    from pipelines import release as release_lib

    return release_lib.with_scores(image_rows(ctx, inputs), read_all_scores(inputs["label_sets"]))


def release_inputs(ctx: Context, inputs: Inputs) -> tuple[pd.DataFrame, list[Path] | None]:
    """What the release is written from: (``release_table``, None), or, where the scores
    are shards, (``image_rows``, the shards), so that the scores reach the writer's
    workers shard by shard and the launcher never holds them all."""
    shards = score_shards(inputs["label_sets"])
    if shards is None:
        return release_table(ctx, inputs), None
    return image_rows(ctx, inputs), shards


def worker_paths(ctx: Context, artifact: Artifact, files: list[Path]) -> list[str]:
    """Files of a stored output as the writer's workers reach them: the files, or on an
    object store their URIs (the launcher's folder is a local mirror of the output)."""
    if not ctx.store.remote:
        return [str(p) for p in files]
    from pipelines import commit

    uri = ctx.store.uri(artifact.folder.parent.name, artifact.folder.name)
    return [commit.join(uri, p.relative_to(artifact.folder).as_posix()) for p in files]


def label_set_lists(artifact: Artifact) -> dict[str, list[int]]:
    """file_name -> its labels, sorted: label_sets.parquet (aggregate.write_label_sets)
    read by pyarrow into lists directly (``read_label_sets``' frozensets, then sorted
    again, cost ~0.8 s for 50,000 images)."""
    import pyarrow.parquet as pq

    frame = pq.read_table(artifact.file("label_sets.parquet"), columns=["file_name", "labels"])
    # The list column cut into Python lists at its offsets (to_pylist builds each list
    # through Arrow's scalars, ~5x slower). Null lists stay None, as to_pylist gives them.
    column = frame["labels"].combine_chunks()
    offsets = column.offsets.to_numpy().tolist()
    flat = column.flatten().to_pylist()
    valid = column.is_valid().to_numpy(zero_copy_only=False).tolist()
    lists = [flat[a:b] if ok else None for a, b, ok in zip(offsets[:-1], offsets[1:], valid)]
    return dict(zip(frame["file_name"].to_pylist(), lists))


def release_image_paths(ctx: Context, table: pd.DataFrame) -> dict[str, str]:
    """file_name -> image file, for ``stages.release.include_images``."""
    images = ctx.config.dataset.images
    if images is None or images.type not in ("files", "folder"):
        raise StageError("stages.release.include_images needs dataset.images of type files or folder")
    source = image_source(ctx.config)
    paths = dict(zip(source.file_names, source.paths))
    missing = sorted(set(table["file_name"]) - set(paths))
    if missing:
        raise StageError(f"stages.release.include_images: no image file for {len(missing)} image(s), "
                         f"e.g. {missing[:3]}")
    return paths


def table_key(table: pd.DataFrame) -> str:
    """The content key of a release: its records (every column, floats by their exact
    bytes, so a score that changes in its last bit changes the key), and the bytes of
    its images."""
    digest = hashlib.sha256()
    for column in sorted(c for c in table.columns if c != "image_path"):
        values = table[column]
        digest.update(column.encode() + b"\0")
        if values.dtype == object and len(values) and isinstance(values.iloc[0], (list, np.ndarray)):
            lengths = np.fromiter((len(v) for v in values), np.int64, len(values))
            # The cells' values in one array, as np.concatenate of the cells gives it
            # (an empty cell is a float64 array there, which makes int labels float64;
            # kept, so that the keys of releases already written do not change),
            # without an array per cell.
            first = next((v for v in values if len(v)), None)
            dtype = np.result_type(np.asarray(first).dtype, *([np.float64] if (lengths == 0).any() else []))
            flat = (np.fromiter(itertools.chain.from_iterable(values), dtype, int(lengths.sum()))
                    if first is not None else np.zeros(0))
            digest.update(lengths.tobytes() + str(flat.dtype).encode() + np.ascontiguousarray(flat).tobytes())
        elif values.dtype == object:
            digest.update("\0".join(map(str, values)).encode())
        else:
            digest.update(str(values.dtype).encode() + np.ascontiguousarray(values.to_numpy()).tobytes())
    images = [file_digest(p) for p in table["image_path"]] if "image_path" in table else None
    return content_key(table=digest.hexdigest(), images=images)


class ReleaseStage(Stage):
    name = "release"
    produces = "release"
    consumes = ("dataset", "label_sets")
    consumes_if_present = ("predictions", "proposals", "tasks", "votes")

    def __init__(self) -> None:
        # (context, inputs, release_inputs) of the run in progress: the table params()
        # keys the release by is the one write() writes (built once: ~1 s for 50,000 images).
        self._inputs: tuple[Context, tuple, tuple[pd.DataFrame, list[Path] | None]] | None = None

    def _release_inputs(self, ctx: Context, inputs: Inputs) -> tuple[pd.DataFrame, list[Path] | None]:
        which = tuple((name, a.key, str(a.folder)) for name, a in sorted(inputs.items()))
        if self._inputs is None or self._inputs[0] is not ctx or self._inputs[1] != which:
            with cyclic_gc_paused():  # a few lists per image
                self._inputs = (ctx, which, release_inputs(ctx, inputs))
        return self._inputs[2]

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        table, shards = self._release_inputs(ctx, inputs)
        if shards is None:
            return {"content": table_key(table)}
        # Without the scores in hand: the records but for their scores, and the shards'
        # bytes. (The same records from one scores.parquet have another key.)
        return {"content": content_key(records=table_key(table), score_shards=[file_digest(p) for p in shards])}

    def lookup(self, ctx: Context, key: str, params: dict[str, Any]) -> Artifact | None:
        # The runner's key also covers the input artifacts' keys (how the labels were
        # computed); a release is identified by what it holds only.
        from pipelines import release as release_lib

        cfg = ctx.config.stages.release
        content = params["content"]
        if ctx.mode == "reaudit" and ctx.previous_release is not None:
            manifest = ctx.previous_manifest()
            return _artifact(ctx.previous_release) if manifest.get("content_key") == content else None
        from pipelines import commit

        existing = release_lib.release_dir(ctx.config.output_dir, cfg.name, cfg.version)
        if not commit.is_committed(existing) and not (isinstance(existing, Path) and (existing / "manifest.json").is_file()):
            return None
        if commit.read_json(commit.join(str(existing), "manifest.json")).get("content_key") == content:
            return _artifact(existing)
        raise release_lib.ReleaseExistsError(
            f"{existing} exists with different content: released versions are never overwritten; "
            "bump stages.release.version or run `label-audit reaudit`")

    def write(self, ctx: Context, inputs: Inputs, key: str, params: dict[str, Any]) -> Artifact:
        from pipelines import release as release_lib

        cfg = ctx.config.stages.release
        table, shards = self._release_inputs(ctx, inputs)
        # Written in this process: its records (~4 objects each) are held until the
        # shards are written. A Beam job runs as long as it needs to, its collector on.
        in_process = release_lib.choose_writer(cfg.writer, ctx.beam_options(), len(table)) == "local"
        with cyclic_gc_paused() if in_process else contextlib.nullcontext():
            return self._write(ctx, inputs, params, table, shards)

    def _write(self, ctx: Context, inputs: Inputs, params: dict[str, Any], table: pd.DataFrame,
               shards: list[Path] | None) -> Artifact:
        from pipelines import release as release_lib

        cfg = ctx.config.stages.release
        notes = {cfg.version: cfg.release_notes}
        version, diff = cfg.version, None
        if ctx.mode == "reaudit" and ctx.previous_release is not None:
            # The records are compared with the previous version's, read whole here too.
            if shards is not None:
                table, shards = release_lib.with_scores(table, read_all_scores(inputs["label_sets"])), None
            previous = release_lib.read_release(ctx.previous_release)
            latest = _name(ctx.previous_release)
            version = next_version(latest, version_change(previous, table.drop(columns=["image_path"],
                                                                                  errors="ignore")))
            old = {r.file_name: frozenset(r.real_label) for r in previous.itertuples()}
            new = {r.file_name: frozenset(r.real_label) for r in table.itertuples()}
            diff = diff_label_sets(old, new, latest, version)
            from pipelines import commit

            builder_notes = commit.read_json(commit.join(str(ctx.previous_release), "dataset_info.json")).get(
                "releaseNotes", {})
            notes = dict(builder_notes) | {version: (
                f"Re-audit of {latest}: {describe_changes(ctx, inputs)}. {diff['images_changed']:,} images "
                f"changed label set ({diff['labels_added']:,} labels added, {diff['labels_removed']:,} removed).")}
        sets = inputs["label_sets"].counts
        votes = inputs["votes"].counts if "votes" in inputs else {}
        counts = {k: sets[k] for k in ("images", "labels", "empty_sets", "multi_label_images")} | {
            "questions": int(sets.get("questions", 0)), "votes_read": votes.get("read"),
            "votes_quarantined": votes.get("quarantined"),
            "rated_images_not_in_dataset": sets.get("rated_images_not_in_dataset", 0)}
        path = release_lib.write_release(
            ctx.config.output_dir, cfg.name, version, table, release_notes=notes,
            manifest=manifest(ctx, inputs, params["content"]) | {"version": version}, counts=counts,
            options=ctx.beam_options(), description=cfg.description, diff=diff, writer=cfg.writer,
            score_shards=None if shards is None else worker_paths(ctx, inputs["label_sets"], shards))
        return _artifact(path)

    def finish(self, ctx: Context, artifact: Artifact) -> None:
        self._inputs = None

    def describe(self, artifact: Artifact) -> str:
        return f"{_name(artifact.folder, 1)} {_name(artifact.folder)}: {artifact.folder}"

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        return {"release": str(artifact.folder)}


def _artifact(version_dir: Path | str) -> Artifact:
    """A written version (a local folder, or a committed prefix on an object store)."""
    from pipelines import commit

    manifest = commit.read_json(commit.join(str(version_dir), "manifest.json"))
    counts = commit.read_json(commit.join(str(version_dir), "counts.json"))
    return Artifact("release", manifest["content_key"], version_dir, counts)


def _name(path: Path | str, up: int = 0) -> str:
    """The last (or ``up`` levels above it) name of a folder or a URI."""
    return str(path).rstrip("/").split("/")[-1 - up]


def manifest(ctx: Context, inputs: Inputs, content: str) -> dict[str, Any]:
    """What a release was made of: every input file's sha256, the stage keys, the config."""
    cfg = ctx.config
    files = {key: {"ref": ref, "sha256": file_digest(cfg.resolve(ref))} for key, ref in file_refs(cfg)}
    models = prediction_paths(inputs["predictions"]) if "predictions" in inputs else {}
    for name, path in models.items():  # also models the subset selection left out
        files[f"predictions.{name}"] = {"ref": Path(path).name, "sha256": file_digest(path)}
    config_dump = cfg.model_dump(exclude={"base_dir", "output_dir"}, mode="json")
    stage_keys = {name: inputs[name].key for name in ("dataset", "proposals", "tasks", "votes", "label_sets")
                  if name in inputs}
    stage_keys["predictions"] = {name: file_digest(p) for name, p in sorted(models.items())}
    return {"content_key": content, "inputs": files, "stage_keys": stage_keys,
            "dataset": {"name": cfg.dataset.name, "split": cfg.dataset.split},
            "config": config_dump, "config_sha256": content_key(config=config_dump)}


def describe_changes(ctx: Context, inputs: Inputs) -> str:
    """A sentence for the release notes: what differs from the previous manifest."""
    previous = ctx.previous_manifest()
    before = previous.get("stage_keys", {})
    now = manifest(ctx, inputs, "")
    old_models, new_models = set(before.get("predictions", {})), set(now["stage_keys"]["predictions"])
    parts = []
    if new_models - old_models:
        parts.append("added model(s) " + ", ".join(sorted(new_models - old_models)))
    if old_models - new_models:
        parts.append("removed model(s) " + ", ".join(sorted(old_models - new_models)))
    changed = [m for m in sorted(old_models & new_models)
               if before["predictions"][m] != now["stage_keys"]["predictions"][m]]
    if changed:
        parts.append("new predictions for " + ", ".join(changed))
    if before.get("votes") != now["stage_keys"].get("votes"):
        parts.append("votes changed")
    if previous.get("config_sha256") != now["config_sha256"]:
        parts.append("config changed")
    return "; ".join(parts) or "inputs changed"
