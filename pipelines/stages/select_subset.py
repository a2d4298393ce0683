"""``stages.select_subset``: the most precise model subset whose pooled proposals reach
the recall target on gold label sets (auditing/subset_selection.py, exhaustive over
subsets), computed from every model's exact top-N selections in Beam
(pipelines/propose.py). The propose stage then pools the chosen models only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from auditing import labelsets
from pipelines.stages.base import Artifact, Context, Inputs, Stage, write_json
from pipelines.stages.dataset import original_labels
from pipelines.stages.predict import prediction_paths
from pipelines.store import file_digest


def top_n(ctx: Context) -> int | None:
    propose = ctx.config.stages.propose
    return propose.top_n if propose is not None else None


class SelectSubsetStage(Stage):
    name = "select_subset"
    produces = "selection"
    consumes = ("dataset", "predictions")

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        cfg = ctx.config.stages.select_subset
        return {"gold": file_digest(ctx.resolve(cfg.gold)), "recall_target": cfg.recall_target,
                "top_n": top_n(ctx)}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        from pipelines import propose

        cfg = ctx.config.stages.select_subset
        selection = propose.run_subset_selection(
            prediction_paths=prediction_paths(inputs["predictions"]),
            original_labels=original_labels(inputs["dataset"]),
            gold=labelsets.read_gold_label_sets(ctx.resolve(cfg.gold)), recall_target=cfg.recall_target,
            top_n=top_n(ctx), options=ctx.beam_options())
        write_json(out / "selection.json", selection)
        return {key: selection[key] for key in ("selected_models", "precision", "recall", "target_met")}

    def describe(self, artifact: Artifact) -> str:
        c = artifact.counts
        return f"chose {c['selected_models']} (precision {c['precision']:.3f}, recall {c['recall']:.3f})"

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        return {"subset_selection": str(artifact.file("selection.json"))}


def chosen_models(inputs: Inputs) -> list[str] | None:
    """The models the selection chose, or None (all) when no selection ran."""
    if "selection" not in inputs:
        return None
    return json.loads(inputs["selection"].file("selection.json").read_text())["selected_models"]
