"""``stages.votes``: read and validate the raters' votes (auditing/votes.py: ReaL npz,
CSV, JSONL, Parquet) with a counted quarantine; or answer the tasks with a clearly
labelled SIMULATED crowd (auditing/simulated_crowd.py). In a re-audit the votes of
the latest release are carried over and merged (auditing/reaudit.py: a vote read
again counts once; a corrected vote file wins over the carried vote).
"""
from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditing import reaudit
from auditing.imagenet import NUM_CLASSES
from pipelines.stages.base import Artifact, Context, Inputs, Stage, StageError
from pipelines.stages.tasks import read_tasks
from pipelines.store import content_key, file_digest


def previous_votes(ctx: Context) -> Path | None:
    """The votes file of the latest release's audit, for a re-audit; None otherwise."""
    previous = ctx.previous_manifest()
    key = (previous or {}).get("stage_keys", {}).get("votes")
    if not key:
        return None
    folder = ctx.store.folder("votes", key)
    path = (folder or ctx.store.path("votes", key)) / "votes.parquet"
    if not path.is_file():
        # Pairs asked before are not asked again, so their votes must carry over.
        raise StageError(f"re-audit of {ctx.previous_release}: its votes ({path}) are missing from the "
                         "store; restore them, or run a new audit into another output_dir")
    return path


def calibrated_confusions(ctx: Context, votes_ref: str) -> dict[str, np.ndarray]:
    """Per rater, the 2 x 3 confusion matrix measured on the votes of ``votes_ref``
    (auditing/simulated_crowd.py); stored, as it costs a full aggregation."""
    from auditing import simulated_crowd
    from auditing import votes as votes_lib

    path = ctx.resolve(votes_ref)

    def calibrate(out: Path) -> None:
        kept, _ = votes_lib.read_and_validate([path])
        confusions = simulated_crowd.calibrated_confusions(kept)
        np.savez(out / "confusions.npz", raters=np.array(sorted(confusions)),
                 matrices=np.stack([confusions[r] for r in sorted(confusions)]))

    folder = ctx.store.get_or_compute("crowd_calibration", content_key(calibration=file_digest(path)),
                                      calibrate, describe={"params": {"calibration_votes": file_digest(path)}})
    with np.load(folder / "confusions.npz") as f:
        return dict(zip(f["raters"].tolist(), f["matrices"]))


class VotesStage(Stage):
    name = "votes"
    produces = "votes"
    consumes_if_present = ("tasks",)

    def check(self, ctx: Context, available: set[str]) -> None:
        if ctx.config.stages.votes.simulate and "tasks" not in available:
            raise StageError("stages.votes.simulate answers the tasks: it needs stages.tasks")

    def vote_files(self, ctx: Context) -> list[str]:
        """The configured vote files, plus the answers pulled from the Label Studio
        project of stages.tasks (every answer so far: a re-audit sees new ones as a
        changed file)."""
        paths = [ctx.resolve(p) for p in ctx.config.stages.votes.paths]
        tasks = ctx.config.stages.tasks
        if tasks is not None and tasks.label_studio is not None:
            if ctx.pulled_votes is None:  # once per run: params and compute both ask
                from pipelines.label_studio import LabelStudioProject

                from auditing.sources import cache_dir
                from pipelines import commit

                local = (cache_dir() / "label_studio" / content_key(out=ctx.config.output_dir)
                         if commit.is_uri(ctx.config.output_dir) else Path(ctx.config.output_dir) / "inputs")
                _, pulled = LabelStudioProject(**tasks.label_studio.model_dump()).pull(local / "label_studio.parquet")
                ctx.pulled_votes = str(pulled["votes"])
            paths.append(ctx.pulled_votes)
        return paths

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        cfg = ctx.config.stages.votes
        simulate = None
        if cfg.simulate:
            simulate = cfg.simulate.model_dump() | {
                "truth": file_digest(ctx.resolve(cfg.simulate.truth)),
                "calibration_votes": file_digest(ctx.resolve(cfg.simulate.calibration_votes))}
        carried = previous_votes(ctx)
        gold = None
        if cfg.gold:
            gold = cfg.gold.model_dump() | {k: file_digest(ctx.resolve(getattr(cfg.gold, k)))
                                            for k in ("experts", "truth") if getattr(cfg.gold, k)}
            gold["raters"] = [file_digest(ctx.resolve(p)) for p in cfg.gold.raters]
        return {"votes": [file_digest(p) for p in self.vote_files(ctx)], "format": cfg.format,
                "simulate": simulate, "gold": gold, "previous_votes": file_digest(carried) if carried else None}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from auditing import labelsets
        from auditing import votes as votes_lib

        cfg = ctx.config.stages.votes
        validated = votes_lib.read_and_validate(self.vote_files(ctx), num_classes=NUM_CLASSES,
                                                format=None if cfg.format == "auto" else cfg.format,
                                                categorical=True)
        summary = validated.summary.as_dict()
        frames = [validated.kept]
        if cfg.simulate:
            from auditing import simulated_crowd

            simulated = simulated_crowd.simulate_task_votes(
                read_tasks(inputs["tasks"]), labelsets.read_gold_label_sets(ctx.resolve(cfg.simulate.truth)),
                calibrated_confusions(ctx, cfg.simulate.calibration_votes),
                raters_per_task=cfg.simulate.raters_per_task, seed=cfg.simulate.seed)
            frames.append(simulated)
            summary["simulated"] = int(len(simulated))
        carried = previous_votes(ctx)
        if carried is not None:
            frames.append(pd.read_parquet(carried))  # last: the new files win
            summary["carried_over"] = int(len(frames[-1]))
        # validate_votes keeps one vote per (rater, question): only other sources need merging.
        kept = validated.kept if len(frames) == 1 else reaudit.merge_votes(frames)
        summary["votes_used"] = int(len(kept))
        pq.write_table(votes_table(kept), out / "votes.parquet")
        votes_lib.write_quarantine(validated.quarantine, out / "quarantine.csv")
        if cfg.gold:
            summary["gold"] = write_gold(ctx, out, known_raters=set(map(str, kept["rater_id"].unique())))
        return summary

    def describe(self, artifact: Artifact) -> str:
        s = artifact.counts
        extra = "".join(f", {what.replace('_', ' ')} {s[what]:,}" for what in ("simulated", "carried_over")
                        if what in s)
        if "gold" in s:
            g = s["gold"]
            extra += (f"; gold: {g['questions']:,} questions ({g['present']:,} present), "
                      f"{g['kept']['raters']:,} rater answers, {sum(map(sum, map(dict.values, g['quarantined'].values()))):,} "
                      "gold rows quarantined")
        return (f"read {s['read']:,} votes: kept {s['kept']:,}, quarantined {s['quarantined']:,}{extra}; "
                f"{s['votes_used']:,} votes used")

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        return {"quarantine": str(artifact.file("quarantine.csv"))}


def votes_table(votes: pd.DataFrame):
    """``votes`` as the Arrow table of votes.parquet: the table ``to_parquet`` writes
    for the votes with text columns of Python strings, also where ``file_name`` or
    ``rater_id`` are Categoricals (``validate_votes(categorical=True)``), which Arrow
    converts on their codes: each distinct string once, not once per vote."""
    import json

    import pyarrow as pa

    text = [c for c in ("file_name", "rater_id") if c in votes.columns and isinstance(votes[c].dtype, pd.CategoricalDtype)]
    if not len(votes) or not all(pd.api.types.is_string_dtype(votes[c].cat.categories) for c in text):
        # As Python strings (empty columns of them are Arrow's null type).
        votes, text = votes.astype({c: object for c in text}), []
    # Converted on one thread: the column threads of from_pandas only wait on the GIL.
    table = pa.Table.from_pandas(votes, preserve_index=False, nthreads=1)
    if not text:
        return table
    schema = pa.schema([pa.field(f.name, pa.string()) if f.name in text else f for f in table.schema])
    # The pandas metadata of a column of Python strings, as from_pandas writes it for one.
    pandas_meta = json.loads(table.schema.metadata[b"pandas"])
    for column in pandas_meta["columns"]:
        if column["name"] in text:
            column.update(pandas_type="unicode", numpy_type="object", metadata=None)
    return table.cast(schema).replace_schema_metadata(
        table.schema.metadata | {b"pandas": json.dumps(pandas_meta).encode()})


def read_votes(artifact: Artifact, file_names: Collection[str] | None = None,
               categorical: bool = False) -> pd.DataFrame:
    """The kept votes; only those on ``file_names`` if given (filtered while reading).

    File names and rater ids are decoded once per distinct value (a Parquet dictionary)
    and shared, not made once per vote (924,810 of each on the ReaL votes): ~4x faster.
    ``categorical=True`` leaves them Categoricals (for code that works on their codes,
    as the aggregation does)."""
    import pyarrow.parquet as pq

    filters = None
    if file_names is not None:
        import pyarrow as pa
        import pyarrow.compute as pc

        filters = pc.field("file_name").isin(pa.array(sorted(map(str, file_names)), pa.string()))
    strings = ["file_name", "rater_id"]
    frame = pq.read_table(artifact.file("votes.parquet"), filters=filters, read_dictionary=strings).to_pandas()
    if categorical:
        return frame
    return frame.astype({c: object for c in strings if isinstance(frame[c].dtype, pd.CategoricalDtype)})


def write_gold(ctx: Context, out: Path, known_raters: set[str]) -> dict[str, Any]:
    """``stages.votes.gold`` validated (auditing/gold.py) into the votes artifact:
    gold_questions.parquet, gold_votes.parquet and gold_quarantine.csv."""
    from auditing import gold as gold_lib

    cfg = ctx.config.stages.votes.gold
    fmt = None if cfg.format == "auto" else cfg.format
    gold = gold_lib.read_gold(
        raters=[ctx.resolve(p) for p in cfg.raters],
        experts=ctx.resolve(cfg.experts) if cfg.experts else None,
        truth=ctx.resolve(cfg.truth) if cfg.truth else None,
        rule=cfg.present_if, known_raters=known_raters, format=fmt)
    gold.questions.to_parquet(out / "gold_questions.parquet", index=False)
    gold.rater_votes.to_parquet(out / "gold_votes.parquet", index=False)
    gold.quarantine.to_csv(out / "gold_quarantine.csv", index=False)
    summary = gold.summary.as_dict()
    return summary | {"questions": int(len(gold.questions)), "present": int(gold.questions["truth"].sum()),
                      "rule": gold.rule.model_dump() if gold.rule else None}


def read_gold(artifact: Artifact):
    """The votes artifact's gold questions (auditing.gold.Gold), or None."""
    if "gold" not in artifact.counts:
        return None
    from auditing import gold as gold_lib

    counts = artifact.counts["gold"]
    rule = gold_lib.PresenceRule(**counts["rule"]) if counts["rule"] else None
    return gold_lib.Gold(questions=pd.read_parquet(artifact.file("gold_questions.parquet")),
                         rater_votes=pd.read_parquet(artifact.file("gold_votes.parquet")),
                         quarantine=pd.read_csv(artifact.file("gold_quarantine.csv")), rule=rule,
                         read=counts["read"])
