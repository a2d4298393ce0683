"""``stages.aggregate``: votes -> one score P(label present) per (image, label)
question (auditing/aggregation/: ``method`` names the algorithm, ``params`` its typed
parameters) -> label sets by the ReaL rule (score > ``threshold``; unrated images keep
their original label). Label sets can instead be given as a file
(``inputs.label_sets``: real.json, or a gold TSV / JSON).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.stages.base import Artifact, Context, Inputs, Stage, StageError
from pipelines.stages.dataset import original_labels
from pipelines.stages.tasks import QUESTIONS_FILE, read_tasks
from pipelines.stages.votes import calibrated_confusions, read_gold, read_votes
from pipelines.store import content_key, file_digest


SCORE_SHARDS = "scores"  # the Beam engine's score shards, a folder of the artifact


class AggregateStage(Stage):
    name = "aggregate"
    produces = "label_sets"
    consumes = ("dataset", "votes")
    consumes_if_present = ("tasks",)

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        cfg = ctx.config.stages.aggregate
        history = ctx.resolve(cfg.rater_history) if cfg.rater_history else None
        return {"method": cfg.method, "params": cfg.params, "threshold": cfg.threshold, "engine": cfg.engine,
                "votes_per_shard": cfg.votes_per_shard if cfg.engine != "in-memory" else None,
                "rater_history": file_digest(history) if history else None,
                "rater_history_strength": cfg.rater_history_strength if history else None}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        from auditing import aggregation

        cfg = ctx.config.stages.aggregate
        params = dict(cfg.params)
        if cfg.rater_history:
            params["rater_history"] = calibrated_confusions(ctx, cfg.rater_history)
            params["rater_history_strength"] = cfg.rater_history_strength
        labels = original_labels(inputs["dataset"])
        # Original labels are an input of the method (a class prior, or the original label
        # as a pseudo-rater whose confusion is counted on gold questions): every label the
        # label file has, also of images outside the audited set (the gold images).
        from auditing import labelsets

        all_labels = labelsets.load_original_labels(ctx.resolve(ctx.config.dataset.original_labels))
        gold = read_gold(inputs["votes"])
        if use_beam(cfg, inputs["votes"]):
            # Score shards stay shards (scores/): the launcher reads one at a time.
            paths, engine = beam_score_shards(ctx, inputs, params, all_labels, gold, out), "beam"

            def score_parts():
                return (pd.read_parquet(path) for path in paths)
        else:
            scores = aggregation.aggregate(read_votes(inputs["votes"], categorical=True), method=cfg.method,
                                           original_labels=all_labels, gold=gold, **params).scores_
            engine = "in-memory"
            scores.to_parquet(out / "scores.parquet", index=False)

            def score_parts():
                return iter([scores])
        questions_scored = 0

        def counted(parts):
            nonlocal questions_scored
            for part in parts:
                questions_scored += len(part)
                yield part

        sets = aggregation.label_sets_of_shards(counted(score_parts()), labels, threshold=cfg.threshold)
        counts = write_label_sets(out, sets, labels) | {"questions": questions_scored, "engine": engine}
        if "tasks" in inputs:
            # Proposed pairs nobody has answered yet are awaiting a crowd: they make no
            # label (never a silent "no"), and their images are flagged in the release.
            # Duplicates dropped from the few pairs left, not from all the tasks' pairs.
            awaiting = unasked_in(task_pairs(inputs["tasks"]), score_parts()).drop_duplicates()
            awaiting = awaiting[awaiting["file_name"].isin(set(labels["file_name"]))]
            awaiting.to_parquet(out / "awaiting.parquet", index=False)
            counts |= {"pairs_awaiting_votes": int(len(awaiting)),
                       "images_awaiting_votes": int(awaiting["file_name"].nunique())}
        return counts

    def describe(self, artifact: Artifact) -> str:
        c = artifact.counts
        outside = c.get("rated_images_not_in_dataset", 0)
        note = f"; {outside:,} rated image(s) not in the dataset left out" if outside else ""
        if c.get("pairs_awaiting_votes"):
            note += f"; {c['pairs_awaiting_votes']:,} pairs awaiting votes on {c['images_awaiting_votes']:,} images"
        return f"{c['questions']:,} questions scored; {c['labels']:,} labels, {c['empty_sets']:,} empty sets{note}"

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        whole = artifact.file("scores.parquet")
        return {"scores": str(whole if whole.is_file() else artifact.file(SCORE_SHARDS))}


def use_beam(cfg, votes: Artifact) -> bool:
    """The engine of ``stages.aggregate.engine``: ``auto`` takes Beam from
    ``SHARDED_MIN_VOTES`` votes, for the methods it has (dawid-skene, gold-confusion;
    with or without gold)."""
    if cfg.engine != "auto":
        return cfg.engine == "beam"
    from pipelines.beam_aggregation import SHARDED_MIN_VOTES, SHARDED_METHODS

    return cfg.method in SHARDED_METHODS and votes.counts.get("votes_used", 0) >= SHARDED_MIN_VOTES


def beam_score_shards(ctx: Context, inputs: Inputs, params: dict[str, Any], original: pd.DataFrame, gold,
                      out: Path) -> list[Path]:
    """The method over vote shards in Beam (pipelines/beam_aggregation.py), on the
    runner of the run; the score shards are written through FileSystems into
    ``out/scores/`` (``scores-SSSSS-of-NNNNN.parquet``: file_name, label, score; every
    question of an image in one shard). Returns their paths."""
    from pipelines.beam_aggregation import aggregate_sharded

    import tempfile

    cfg = ctx.config.stages.aggregate
    (out / SCORE_SHARDS).mkdir(parents=True, exist_ok=True)
    # The vote shards and the EM state are scratch: only the scores are kept.
    with tempfile.TemporaryDirectory(prefix="sharded-") as scratch, ctx.beam_output(Path(scratch)) as prefix, \
            ctx.beam_output(out / SCORE_SHARDS) as scores_prefix:
        aggregate_sharded([str(inputs["votes"].file("votes.parquet"))], cfg.method, params,
                          out_prefix=str(prefix).rstrip("/") + "/", options=ctx.beam_options(),
                          original_labels=original, gold=gold, vote_format="parquet",
                          votes_per_shard=cfg.votes_per_shard, scores_prefix=str(scores_prefix).rstrip("/") + "/")
    return score_shard_paths(out / SCORE_SHARDS)


def task_pairs(tasks: Artifact) -> pd.DataFrame:
    """The (file_name, label) pair of each question of the tasks (repeated where
    several tasks ask it); from the questions file only those two columns are read
    (its image URIs and task ids are most of its reading time)."""
    path = tasks.file(QUESTIONS_FILE)
    return pd.read_parquet(path, columns=["file_name", "label"]) if path.is_file() else \
        read_tasks(tasks)[["file_name", "label"]]


def unasked_in(questions: pd.DataFrame, score_parts) -> pd.DataFrame:
    """The (file_name, label) ``questions`` that no part of the scores has
    (``reaudit.unasked`` one part at a time)."""
    from auditing.reaudit import unasked

    for part in score_parts:
        questions = unasked(questions, part)
    return questions


def write_label_sets(out: Path, sets: dict[str, frozenset[int]], labels: pd.DataFrame,
                     every_image: bool = True) -> dict[str, Any]:
    """label_sets.parquet (file_name, labels) for the dataset's images, in its order.

    Votes about images that are not in the dataset (another split, a typo) make no
    label set: the release and its counts hold the dataset's images only. Label sets
    given as a file may cover only some images (``every_image=False``)."""
    from auditing.labelsets import label_set_counts

    names = labels["file_name"].astype(str).tolist()
    outside = sorted(set(sets) - set(names))
    missing = [n for n in names if n not in sets]
    if missing and every_image:
        raise StageError(f"no label set for {len(missing)} image(s) of the dataset, e.g. {missing[:3]}")
    names = [n for n in names if n in sets]
    pd.DataFrame({"file_name": names, "labels": [sorted(sets[n]) for n in names]}).to_parquet(
        out / "label_sets.parquet", index=False)
    return label_set_counts({n: sets[n] for n in names}) | {
        "rated_images_not_in_dataset": len(outside), "outside_examples": outside[:3]}


def read_label_sets(artifact: Artifact) -> dict[str, frozenset[int]]:
    import pyarrow.parquet as pq

    # Arrow's lists straight to Python ints: via pandas each set would be a numpy array
    # whose elements are converted one by one (~2x slower on the 50,000 sets).
    table = pq.read_table(artifact.file("label_sets.parquet"), columns=["file_name", "labels"])
    return dict(zip(table.column("file_name").to_pylist(), map(frozenset, table.column("labels").to_pylist())))


def score_shard_paths(folder: Path) -> list[Path]:
    """The score shards ``scores-SSSSS-of-NNNNN.parquet`` in ``folder``, in order. A set
    with a shard missing is refused: its images would silently have no scores."""
    found = sorted(folder.glob("scores-*-of-*.parquet"))
    numbered = [re.fullmatch(r"scores-(\d+)-of-(\d+)\.parquet", p.name) for p in found]
    totals = {int(m[2]) for m in numbered if m}
    if found and (None in numbered or len(totals) != 1
                  or sorted(int(m[1]) for m in numbered) != list(range(max(totals)))):
        raise StageError(f"{folder}: not a complete set of score shards scores-SSSSS-of-NNNNN.parquet: "
                         f"{', '.join(p.name for p in found[:4])}{', ...' if len(found) > 4 else ''}")
    return found


def score_shards(artifact: Artifact) -> list[Path] | None:
    """The label_sets artifact's score shards (its Beam engine's), in order; None where
    it has none (its scores are one scores.parquet, or there are no scores)."""
    return score_shard_paths(artifact.file(SCORE_SHARDS)) or None


def read_scores(artifact: Artifact) -> pd.DataFrame | None:
    """file_name, label, score per rated question (the Beam engine's shards concatenated,
    in shard order: for small consumers); None for label sets given as a file."""
    path = artifact.file("scores.parquet")
    if path.is_file():
        return pd.read_parquet(path)
    paths = score_shards(artifact)
    if not paths:
        return None
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


def label_sets_from_file(ctx: Context, ref: str) -> Artifact:
    """``inputs.label_sets``: a TFDS release folder, real.json (file order), or a gold
    TSV / JSON (pipelines/report.py ``read_label_sets``), as the artifact."""
    from auditing import labelsets
    from pipelines.report import read_label_sets as read_label_file
    from pipelines.stages.base import load_artifact, write_json

    path = ctx.resolve(ref)
    labels = labelsets.load_original_labels(ctx.resolve(ctx.config.dataset.original_labels))

    def fill(out: Path) -> None:
        sets, _ = read_label_file(path)
        write_json(out / "summary.json", write_label_sets(out, sets, labels, every_image=False) | {"questions": 0})

    digest = file_digest(path) if Path(path).is_file() else content_key(folder=path)
    key = content_key(label_sets=digest, dataset=file_digest(ctx.resolve(ctx.config.dataset.original_labels)))
    folder = ctx.store.get_or_compute("label_sets_input", key, fill, describe={"params": {"file": path}})
    return load_artifact("label_sets", folder)


def images_awaiting_votes(artifact: Artifact) -> set[str]:
    """Images with proposed pairs that no rater has answered yet."""
    path = artifact.file("awaiting.parquet")
    return set(pd.read_parquet(path)["file_name"]) if path.is_file() else set()
