"""``label-audit run CONFIG``: every stage the config declares, in the method's order.

    read dataset -> predict -> propose -> select subset -> build tasks -> read votes
    -> aggregate -> release -> report

Each stage is one function below that reads its config section, calls the stage's
module (see ``pipelines/config.py`` for the key -> module map) and stores its output
content-addressed (``pipelines/store.py``), so a re-run with nothing changed
recomputes nothing and writes no new version.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditing import labelsets
from auditing.imagenet import NUM_CLASSES
from pipelines import release as release_lib
from pipelines.beam_options import make_options
from pipelines.config import AuditConfig, ConfigError, ProposeConfig, file_refs, load_config
from pipelines.store import Store, content_key, file_digest

log = logging.getLogger("label-audit")

STAGE_ORDER = ("dataset", "predict", "propose", "select_subset", "tasks", "votes", "aggregate",
               "release", "report")


@dataclasses.dataclass
class RunState:
    """What the stages hand each other. Keys are content keys of stored outputs."""

    config: AuditConfig
    store: Store
    original_labels: pd.DataFrame | None = None  # file_name, label (file order)
    dataset_key: str = ""
    predictions: dict[str, str] = dataclasses.field(default_factory=dict)  # model -> NPZ path
    # Every model that predicted, also those the subset selection left out (the report
    # evaluates them all).
    all_predictions: dict[str, str] = dataclasses.field(default_factory=dict)
    predictions_key: str = ""
    subset_selected: bool = False
    proposals: pd.DataFrame | None = None
    proposals_key: str = ""
    tasks: pd.DataFrame | None = None
    tasks_key: str = ""
    tasks_summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    votes: pd.DataFrame | None = None
    votes_summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    votes_key: str = ""
    scores: pd.DataFrame | None = None
    label_sets: dict[str, frozenset[int]] | None = None
    release_table: pd.DataFrame | None = None
    images_outside_dataset: list[str] = dataclasses.field(default_factory=list)
    labels_key: str = ""
    release_path: Path | None = None
    release_status: str = ""
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Re-audits: the latest release, whose asked pairs and votes are carried over.
    previous_release: Path | None = None
    diff: dict[str, Any] | None = None

    @classmethod
    def for_config(cls, config: AuditConfig, previous_release: Path | None = None) -> "RunState":
        return cls(config=config, store=Store(Path(config.output_dir) / "store"),
                   previous_release=previous_release)

    def previous_manifest(self) -> dict[str, Any] | None:
        if self.previous_release is None:
            return None
        return json.loads((self.previous_release / "manifest.json").read_text())


class StageError(RuntimeError):
    """A stage cannot run with what the config gives it."""


# ---------------------------------------------------------------- stage 0: dataset

def stage_dataset(state: RunState) -> str:
    cfg = state.config.dataset
    ref = state.config.resolve(cfg.original_labels)
    if ref == "tfds-wheel":
        state.original_labels = labelsets.original_val_labels()
        state.dataset_key = content_key(original_labels="tfds-wheel:imagenet2012/validation_labels.txt")
    else:
        state.original_labels = labelsets.read_label_tsv(ref)
        state.dataset_key = content_key(original_labels=file_digest(ref))
    return f"{len(state.original_labels):,} images with original labels"


# ---------------------------------------------------------------- stage 1: predict

def stage_predict(state: RunState) -> str:
    cfg = state.config.stages.predict
    from pipelines import predict  # JAX is imported only when a model runs

    paths = {name: state.config.resolve(p) for name, p in cfg.predictions.items()}
    if cfg.models:
        from models.registry import get_model

        specs = [get_model(m.name, checkpoint=state.config.resolve(m.checkpoint) if m.checkpoint else None)
                 for m in cfg.models]
        runner = state.config.runner
        computed = predict.run_predictions(
            specs, image_source(state.config), state.store.root,
            batch_size=cfg.batch_size, dtype=cfg.dtype, top_k=cfg.top_k, runner=runner.name,
            num_workers=runner.num_workers, beam_args=runner.options)
        paths.update({name: str(p) for name, p in computed.items()})
    state.predictions = paths
    state.all_predictions = dict(paths)
    state.predictions_key = content_key(**{name: file_digest(p) for name, p in sorted(paths.items())})
    return f"{len(paths)} model(s): " + ", ".join(sorted(paths))


def image_source(config: AuditConfig):
    """The ``dataset.images`` section as a sharded image source (pipelines/images.py)."""
    from pipelines import images as images_lib

    cfg = config.dataset.images
    if cfg is None:
        raise StageError("stages.predict.models needs dataset.images (a folder, files or a TFDS dataset)")
    return images_lib.make_image_source(
        cfg.type, path=config.resolve(cfg.path) if cfg.path else None,
        paths=[config.resolve(p) for p in cfg.paths], name=cfg.name, data_dir=cfg.data_dir,
        split=cfg.split, labels_path=config.resolve(cfg.labels) if cfg.labels else None)


# ---------------------------------------------------------------- stage 2: propose

def _propose_config(state: RunState) -> ProposeConfig:
    # select_subset pools the chosen models' proposals even when propose is not declared.
    return state.config.stages.propose or ProposeConfig()


def stage_propose(state: RunState) -> str:
    cfg = _propose_config(state)
    if state.config.stages.select_subset is not None and not state.subset_selected:
        # Pooling all models would be thrown away: select_subset pools the chosen ones.
        return "pooled after the model-subset selection"
    if cfg.questions:
        from auditing.votes import read_real_questions

        path = state.config.resolve(cfg.questions)
        key = content_key(questions=file_digest(path))

        def compute(out: Path) -> None:
            read_real_questions(path).to_parquet(out / "proposals.parquet", index=False)
    else:
        if not state.predictions:
            raise StageError("stages.propose needs predictions (stages.predict) or propose.questions")
        from pipelines import propose

        key = content_key(predictions=state.predictions_key, dataset=state.dataset_key, top_n=cfg.top_n)

        def compute(out: Path) -> None:
            proposals = propose.run_proposals(
                prediction_paths=state.predictions, original_labels=state.original_labels,
                top_n=cfg.top_n, options=_options(state.config))
            proposals.to_parquet(out / "proposals.parquet", index=False)

    folder = state.store.get_or_compute("proposals", key, compute)
    state.proposals = pd.read_parquet(folder / "proposals.parquet")
    state.proposals_key = key
    state.outputs["proposals"] = str(folder / "proposals.parquet")
    n_images = state.proposals["file_name"].nunique()
    return (f"{len(state.proposals):,} proposals on {n_images:,} images "
            f"({len(state.proposals) / max(n_images, 1):.2f} per image)")


# ---------------------------------------------------------------- stage 3: select subset

def stage_select_subset(state: RunState) -> str:
    cfg = state.config.stages.select_subset
    gold_path = state.config.resolve(cfg.gold)
    top_n = _propose_config(state).top_n
    key = content_key(predictions=state.predictions_key, gold=file_digest(gold_path),
                      recall_target=cfg.recall_target, top_n=top_n, dataset=state.dataset_key)

    def compute(out: Path) -> None:
        from pipelines import propose

        result = propose.run_subset_selection(
            prediction_paths=state.predictions, original_labels=state.original_labels,
            gold=labelsets.read_gold_label_sets(gold_path), recall_target=cfg.recall_target, top_n=top_n)
        (out / "selection.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    folder = state.store.get_or_compute("select_subset", key, compute)
    selection = json.loads((folder / "selection.json").read_text())
    state.outputs["subset_selection"] = str(folder / "selection.json")
    chosen = selection["selected_models"]
    state.subset_selected = True
    # Proposals from now on come from the chosen subset only.
    state.predictions = {m: state.predictions[m] for m in chosen}
    state.predictions_key = content_key(**{m: file_digest(p) for m, p in sorted(state.predictions.items())})
    stage_propose(state)
    return f"chose {chosen} (precision {selection['precision']:.3f}, recall {selection['recall']:.3f})"


# ---------------------------------------------------------------- stage 4: tasks

def stage_tasks(state: RunState) -> str:
    cfg = state.config.stages.tasks
    from auditing import tasks as tasks_lib

    if state.proposals is None:
        raise StageError("stages.tasks needs proposals (stages.propose)")
    previous = state.previous_manifest()
    key = content_key(proposals=state.proposals_key, predictions=state.predictions_key,
                      dataset=state.dataset_key, max_labels=cfg.max_labels,
                      image_uri_template=cfg.image_uri_template,
                      asked_before=previous["content_key"] if previous else None)

    def compute(out: Path) -> None:
        top1 = _top1_by_model(state)
        proposals = state.proposals
        if state.previous_release is not None:
            # Re-audit: only (image, label) pairs never asked become new tasks.
            asked = asked_pairs(state.previous_release)
            merged = proposals.merge(asked, on=["file_name", "label"], how="left", indicator=True)
            proposals = proposals[(merged["_merge"] == "left_only").to_numpy()]
        built = tasks_lib.build_tasks(proposals, original_labels=state.original_labels,
                                      top1=top1, max_labels=cfg.max_labels)
        tasks_lib.write_tasks_jsonl(built, out / "tasks.jsonl", image_uri_template=cfg.image_uri_template)
        tasks_lib.write_tasks_csv(built, out / "tasks.csv", image_uri_template=cfg.image_uri_template)
        (out / "summary.json").write_text(json.dumps(tasks_lib.summarize_tasks(built), indent=2) + "\n")

    folder = state.store.get_or_compute("tasks", key, compute)
    state.tasks_summary = json.loads((folder / "summary.json").read_text())
    state.tasks = tasks_lib.read_tasks_jsonl(folder / "tasks.jsonl")
    state.tasks_key = key
    state.outputs["tasks"] = str(folder / "tasks.jsonl")
    s = state.tasks_summary
    return ", ".join(f"{k.replace('_', ' ')}: {v:,}" if isinstance(v, int) else f"{k.replace('_', ' ')}: {v}"
                     for k, v in s.items())


def asked_pairs(release_path: Path) -> pd.DataFrame:
    """(file_name, label) pairs that have votes in a release (its label_scores)."""
    table = release_lib.read_release(release_path)
    exploded = table[["file_name", "score_labels"]].explode("score_labels").dropna()
    return pd.DataFrame({"file_name": exploded["file_name"].astype(str),
                         "label": exploded["score_labels"].astype("int64")}).drop_duplicates()


def _top1_by_model(state: RunState) -> dict[str, pd.DataFrame]:
    from auditing.predictions import load_predictions

    top1 = {}
    for name, path in state.predictions.items():
        pred = load_predictions(path)
        labels = pred.top1 if pred.top1 is not None else np.argmax(pred.logits, axis=1)
        top1[name] = pd.DataFrame({"file_name": pred.file_names, "label": labels})
    return top1


# ---------------------------------------------------------------- stage 5: votes

def stage_votes(state: RunState) -> str:
    cfg = state.config.stages.votes
    from auditing import votes as votes_lib

    paths = [state.config.resolve(p) for p in cfg.paths]
    previous = state.previous_manifest()
    previous_votes = None
    if previous and previous.get("stage_keys", {}).get("votes"):
        previous_votes = state.store.path("votes", previous["stage_keys"]["votes"]) / "votes.parquet"
        if not previous_votes.is_file():
            # Pairs asked before are not asked again, so their votes must carry over.
            raise StageError(f"re-audit of {state.previous_release}: its votes ({previous_votes}) are "
                             "missing from the store; restore them, or run a new audit into another "
                             "output_dir")
    simulate = None
    if cfg.simulate:
        simulate = cfg.simulate.model_dump() | {
            "truth": file_digest(state.config.resolve(cfg.simulate.truth)),
            "calibration_votes": file_digest(state.config.resolve(cfg.simulate.calibration_votes))}
    key = content_key(votes=[file_digest(p) for p in paths], format=cfg.format, simulate=simulate,
                      tasks=state.tasks_key if cfg.simulate else None,
                      previous_votes=file_digest(previous_votes) if previous_votes else None)

    def compute(out: Path) -> None:
        fmt = None if cfg.format == "auto" else cfg.format
        validated = votes_lib.read_and_validate(paths, num_classes=NUM_CLASSES, format=fmt)
        summary = validated.summary.as_dict()
        frames = [validated.kept]
        if cfg.simulate:
            if state.tasks is None:
                raise StageError("stages.votes.simulate answers the tasks: it needs stages.tasks")
            simulated = simulate_crowd_votes(state, cfg.simulate)
            frames.append(simulated)
            summary["simulated"] = int(len(simulated))
        if previous_votes is not None:
            # Re-audit: earlier audits' votes are kept and merged with the new ones; they
            # come last, so a vote file that corrects an answer wins over the old answer.
            carried = pd.read_parquet(previous_votes)
            frames.append(carried)
            summary["carried_over"] = int(len(carried))
        # The same vote read again (a re-audit re-reads its vote files) counts once.
        kept = pd.concat(frames, ignore_index=True).drop_duplicates(
            ["rater_id", "file_name", "label"], keep="first", ignore_index=True)
        summary["votes_used"] = int(len(kept))
        kept.to_parquet(out / "votes.parquet", index=False)
        votes_lib.write_quarantine(validated.quarantine, out / "quarantine.csv")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    folder = state.store.get_or_compute("votes", key, compute)
    state.votes = pd.read_parquet(folder / "votes.parquet")
    state.votes_summary = json.loads((folder / "summary.json").read_text())
    state.votes_key = key
    state.outputs["quarantine"] = str(folder / "quarantine.csv")
    s = state.votes_summary
    extra = "".join(f", {what.replace('_', ' ')} {s[what]:,}" for what in ("simulated", "carried_over")
                    if what in s)
    return (f"read {s['read']:,} votes: kept {s['kept']:,}, quarantined {s['quarantined']:,}{extra}; "
            f"{s['votes_used']:,} votes used")


def calibrated_confusions(state: RunState, votes_ref: str) -> dict[str, np.ndarray]:
    """Per rater, the 2 x 3 confusion matrix measured on the votes of ``votes_ref``
    (auditing/simulated_crowd.py: Dawid-Skene posteriors, then counts); stored."""
    from auditing import aggregation, simulated_crowd
    from auditing import votes as votes_lib

    path = state.config.resolve(votes_ref)

    def calibrate(out: Path) -> None:
        kept, _ = votes_lib.read_and_validate([path])
        posteriors = aggregation.aggregate(kept).scores_
        confusions = simulated_crowd.rater_confusions(kept, posteriors)
        np.savez(out / "confusions.npz", raters=np.array(sorted(confusions)),
                 matrices=np.stack([confusions[r] for r in sorted(confusions)]))

    folder = state.store.get_or_compute("crowd_calibration", content_key(calibration=file_digest(path)),
                                        calibrate)
    with np.load(folder / "confusions.npz") as f:
        return dict(zip(f["raters"].tolist(), f["matrices"]))


def simulate_crowd_votes(state: RunState, cfg) -> pd.DataFrame:
    """Votes of the clearly labelled simulated crowd (auditing/simulated_crowd.py) on the tasks."""
    from auditing import simulated_crowd

    confusions = calibrated_confusions(state, cfg.calibration_votes)
    truth = labelsets.read_gold_label_sets(state.config.resolve(cfg.truth))
    return simulated_crowd.simulate_task_votes(state.tasks, truth, confusions,
                                               raters_per_task=cfg.raters_per_task, seed=cfg.seed)


# ---------------------------------------------------------------- stage 6: aggregate

def stage_aggregate(state: RunState) -> str:
    cfg = state.config.stages.aggregate
    from auditing import aggregation

    if state.votes is None:
        raise StageError("stages.aggregate needs votes (stages.votes)")
    history_path = state.config.resolve(cfg.rater_history) if cfg.rater_history else None
    key = content_key(votes=state.votes_key, method=cfg.method, params=cfg.params,
                      dataset=state.dataset_key, strength=cfg.rater_history_strength,
                      rater_history=file_digest(history_path) if history_path else None)

    def compute(out: Path) -> None:
        params = dict(cfg.params)
        if history_path:
            params["rater_history"] = calibrated_confusions(state, cfg.rater_history)
            params["rater_history_strength"] = cfg.rater_history_strength
        # Original labels are an input of the method (a class prior may depend on them).
        result = aggregation.aggregate(state.votes, method=cfg.method,
                                       original_labels=state.original_labels, **params)
        result.scores_.to_parquet(out / "scores.parquet", index=False)

    folder = state.store.get_or_compute("aggregate", key, compute)
    state.scores = pd.read_parquet(folder / "scores.parquet")
    sets = aggregation.label_sets(state.scores, state.original_labels, threshold=cfg.threshold)
    in_dataset = set(state.original_labels["file_name"])
    # Votes about images that are not in the dataset (another split, a typo) make no
    # label set: the release and its counts hold the dataset's images only.
    state.images_outside_dataset = sorted(set(sets) - in_dataset)
    state.label_sets = {name: labels for name, labels in sets.items() if name in in_dataset}
    labels = state.original_labels
    state.release_table = release_lib.release_table(labels["file_name"].tolist(), labels["label"].to_numpy(),
                                                    state.label_sets, state.scores)
    image_digests = None
    if state.config.stages.release and state.config.stages.release.include_images:
        paths = release_image_paths(state)
        state.release_table["image_path"] = state.release_table["file_name"].map(paths)
        image_digests = [file_digest(paths[f]) for f in state.release_table["file_name"]]
    # What a release holds, not how it was computed: a re-audit that reaches the
    # same labels and scores by another path has nothing new to release.
    labels_only = state.release_table.drop(columns=["image_path"], errors="ignore")
    state.labels_key = content_key(
        table=hashlib.sha256(labels_only.to_json(orient="records", double_precision=15).encode()).hexdigest(),
        images=image_digests)
    state.outputs["scores"] = str(folder / "scores.parquet")
    sets = state.label_sets
    n_labels = sum(len(s) for s in sets.values())
    n_empty = sum(1 for s in sets.values() if not s)
    outside = state.images_outside_dataset
    note = (f"; {len(outside):,} rated image(s) not in the dataset left out, e.g. {outside[0]}"
            if outside else "")
    return f"{len(state.scores):,} questions scored; {n_labels:,} labels, {n_empty:,} empty sets{note}"


def release_image_paths(state: RunState) -> dict[str, str]:
    """file_name -> image file, for ``stages.release.include_images``."""
    images = state.config.dataset.images
    if images is None or images.type not in ("files", "folder"):
        raise StageError("stages.release.include_images needs dataset.images of type files or folder")
    source = image_source(state.config)
    paths = dict(zip(source.file_names, source.paths))
    missing = sorted(set(state.release_table["file_name"]) - set(paths))
    if missing:
        raise StageError(f"stages.release.include_images: no image file for {len(missing)} image(s), "
                         f"e.g. {missing[:3]}")
    return paths


# ---------------------------------------------------------------- stage 7: release

def label_counts(label_sets: dict[str, frozenset[int]]) -> dict[str, int]:
    sizes = np.array([len(s) for s in label_sets.values()])
    return {"images": int(sizes.size), "labels": int(sizes.sum()), "empty_sets": int((sizes == 0).sum()),
            "multi_label_images": int((sizes > 1).sum())}


def _manifest(state: RunState) -> dict[str, Any]:
    cfg = state.config
    inputs = {}
    for key, ref in file_refs(cfg):  # every file the config names
        resolved = cfg.resolve(ref)
        inputs[key] = {"ref": ref, "sha256": None if resolved == "tfds-wheel" else file_digest(resolved)}
    for name, path in state.all_predictions.items():  # also models the subset selection left out
        inputs[f"predictions.{name}"] = {"ref": Path(path).name, "sha256": file_digest(path)}
    config_dump = cfg.model_dump(exclude={"base_dir", "output_dir"}, mode="json")
    stage_keys = {"dataset": state.dataset_key, "proposals": state.proposals_key,
                  "tasks": state.tasks_key, "votes": state.votes_key,
                  "predictions": {name: file_digest(p) for name, p in sorted(state.predictions.items())}}
    return {"content_key": state.labels_key, "inputs": inputs, "stage_keys": stage_keys,
            "dataset": {"name": cfg.dataset.name, "split": cfg.dataset.split},
            "config": config_dump, "config_sha256": content_key(config=config_dump)}


def stage_release(state: RunState) -> str:
    cfg = state.config.stages.release
    if state.label_sets is None:
        raise StageError("stages.release needs label sets (stages.aggregate)")
    out = Path(state.config.output_dir)
    existing = release_lib.release_dir(out, cfg.name, cfg.version)
    if existing.exists():
        manifest = json.loads((existing / "manifest.json").read_text())
        if manifest.get("content_key") == state.labels_key:
            state.release_path, state.release_status = existing, "unchanged"
            return f"{cfg.name} {cfg.version} is up to date ({existing}); nothing written"
        raise release_lib.ReleaseExistsError(
            f"{existing} exists with different content: released versions are never overwritten; "
            "bump stages.release.version or run `label-audit reaudit`")
    write_release_version(state, cfg.version, {cfg.version: cfg.release_notes}, diff=None)
    return f"wrote {state.release_path}"


def write_release_version(state: RunState, version: str, release_notes: dict[str, str],
                          diff: dict[str, Any] | None) -> Path:
    cfg = state.config.stages.release
    table = state.release_table
    counts = label_counts(state.label_sets) | {
        "questions": int(len(state.scores)),
        "votes_read": state.votes_summary.get("read"),
        "votes_quarantined": state.votes_summary.get("quarantined"),
        "rated_images_not_in_dataset": len(state.images_outside_dataset)}
    state.counts = counts
    state.release_path = release_lib.write_release(
        state.config.output_dir, cfg.name, version, table, release_notes=release_notes,
        manifest=_manifest(state) | {"version": version}, counts=counts, options=_options(state.config),
        description=cfg.description, diff=diff)
    state.release_status = "written"
    state.outputs["release"] = str(state.release_path)
    return state.release_path


def describe_changes(manifest: dict[str, Any], state: RunState) -> str:
    """A sentence for the release notes: what differs from the previous manifest."""
    before = manifest.get("stage_keys", {})
    old_models = set(before.get("predictions", {}))
    new_models = set(state.predictions)
    parts = []
    if new_models - old_models:
        parts.append("added model(s) " + ", ".join(sorted(new_models - old_models)))
    if old_models - new_models:
        parts.append("removed model(s) " + ", ".join(sorted(old_models - new_models)))
    changed = [m for m in sorted(old_models & new_models)
               if before["predictions"][m] != file_digest(state.predictions[m])]
    if changed:
        parts.append("new predictions for " + ", ".join(changed))
    if before.get("votes") != state.votes_key:
        parts.append("votes changed")
    if manifest.get("config_sha256") != _manifest(state)["config_sha256"]:
        parts.append("config changed")
    return "; ".join(parts) or "inputs changed"


# ---------------------------------------------------------------- stage 8: report

def stage_report(state: RunState) -> str:
    cfg = state.config.stages.report
    from auditing.predictions import load_predictions
    from pipelines import report

    if state.label_sets is None:
        raise StageError("stages.report needs label sets (stages.aggregate)")
    out_dir = Path(state.config.output_dir) / "report"
    extra: dict[str, Any] = {"dataset": f"{state.config.dataset.name} ({state.config.dataset.split})",
                             "counts": state.counts or label_counts(state.label_sets)}
    if state.votes_summary:
        extra["votes"] = {k: v for k, v in state.votes_summary.items() if k != "quarantined_by_reason"}
        extra["votes"] |= {f"quarantined ({reason})": n for reason, n in
                           state.votes_summary.get("quarantined_by_reason", {}).items() if n}
    if state.tasks_summary:
        extra["tasks"] = state.tasks_summary
    if state.config.stages.release and state.release_path is not None:
        extra["release_name"] = state.config.stages.release.name
        extra["release_version"] = state.release_path.name
    if state.diff is not None:
        extra["diff"] = {k: v for k, v in state.diff.items() if k not in ("changed", "images_added",
                                                                          "images_removed")}
    if cfg.published_labels:
        from auditing.metrics import agreement_with_published

        # real.json format: label lists in ImageNet val file order.
        published = labelsets.read_real_json(state.config.resolve(cfg.published_labels))
        originals = dict(zip(state.original_labels["file_name"], state.original_labels["label"]))
        extra["agreement_with_published"] = agreement_with_published(state.scores, state.label_sets,
                                                                     published, originals)
    paths = dict(state.all_predictions or state.predictions)
    paths.update({n: state.config.resolve(p) for n, p in cfg.predictions.items()})
    examples = None
    if state.config.dataset.images is not None and state.config.dataset.images.type in ("files", "folder"):
        from pipelines.images import EncodedImages

        examples = EncodedImages(image_source(state.config))
    written = report.write_report(out_dir, label_sets=state.label_sets,
                                  original_labels=state.original_labels,
                                  predictions={n: load_predictions(p) for n, p in paths.items()},
                                  extra_summary=extra, example_images=examples,
                                  model_zoo=report.local_model_zoo())
    state.outputs.update({f"report.{k}": str(v) for k, v in written.items()})
    return f"wrote {out_dir}"


# ---------------------------------------------------------------- driver

def _options(config: AuditConfig):
    return make_options(config.runner.name, config.runner.num_workers, config.runner.options)


STAGES = {
    "dataset": stage_dataset, "predict": stage_predict, "propose": stage_propose,
    "select_subset": stage_select_subset, "tasks": stage_tasks, "votes": stage_votes,
    "aggregate": stage_aggregate, "release": stage_release, "report": stage_report,
}


def declared_stages(config: AuditConfig) -> list[str]:
    return ["dataset"] + [name for name in STAGE_ORDER[1:] if getattr(config.stages, name) is not None]


def execute(config: AuditConfig, stages: list[str] | None = None, echo=print,
            state: RunState | None = None) -> RunState:
    """Run ``stages`` (default: all declared) and return the final state."""
    state = state or RunState.for_config(config)
    names = stages or declared_stages(config)
    started = time.monotonic()
    for i, name in enumerate(names, start=1):
        t0 = time.monotonic()
        echo(f"[{i}/{len(names)}] {name} ...", flush=True)
        message = STAGES[name](state)
        echo(f"[{i}/{len(names)}] {name}: {message} ({time.monotonic() - t0:.1f} s)", flush=True)
    computed = sorted({stage for stage, _ in state.store.computed})
    echo(f"done in {time.monotonic() - started:.1f} s; stored outputs computed this run: "
         f"{', '.join(computed) or 'none (all reused)'}")
    for what, path in sorted(state.outputs.items()):
        echo(f"  {what:<20} {path}")
    return state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--out", help="output directory (overrides the config's output_dir)")


# Errors that mean "this input cannot be used" (exit 2, one line naming the file, row,
# field or key), by module; a module not imported by this run cannot have raised its own.
_INPUT_ERRORS = {
    "auditing.labelsets": ["LabelFileError"], "auditing.sources": ["SourceError"],
    "auditing.votes": ["VoteFileError"], "auditing.predictions": ["PredictionsFormatError"],
    "auditing.tasks": ["TaskFileError"], "pipelines.images": ["ImageSourceError"],
    "models.registry": ["UnknownModelError"], "models.checkpoints": ["CheckpointError"],
    "models.torch_checkpoint": ["TorchCheckpointError", "UnsafeCheckpointError"],
}


def input_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError, StageError, release_lib.ReleaseExistsError]
    for module_name, names in _INPUT_ERRORS.items():
        module = sys.modules.get(module_name)
        errors += [getattr(module, name) for name in names if module and hasattr(module, name)]
    return tuple(errors)


def report_input_error(error: BaseException) -> int:
    print(f"label-audit: error: {error}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, output_dir=args.out)
        execute(config)
    except Exception as e:
        if isinstance(e, input_errors()):
            return report_input_error(e)
        raise
    return 0
