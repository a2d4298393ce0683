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
from pipelines.stages.base import Artifact, Context, Inputs, Stage
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
        labels = original_labels(inputs["dataset"])
        with ctx.beam_output(out) as beam_out:
            propose.propose(prediction_paths(inputs["predictions"]), labels, beam_out, top_n(ctx), ctx.beam_options(),
                            gold=gold_label_sets(ctx.resolve(cfg.gold), labels["file_name"]),
                            recall_target=cfg.recall_target)
        selection = json.loads((out / "selection.json").read_text())
        return {key: selection[key] for key in ("selected_models", "precision", "recall", "target_met")}

    def describe(self, artifact: Artifact) -> str:
        c = artifact.counts
        return f"chose {c['selected_models']} (precision {c['precision']:.3f}, recall {c['recall']:.3f})"

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        return {"subset_selection": str(artifact.file("selection.json"))}


def gold_label_sets(path: str, file_names) -> dict[str, frozenset[int]]:
    """Gold label sets: a gold TSV / JSON {file_name: labels}; or a real.json (published
    label sets in validation file order), of which the audited images with a non-empty
    set are the gold (for a sample of the validation images: the paper's 256
    expert-labelled images are not public, and its golden questions cover few images)."""
    text_start = Path(path).read_text()[:64].lstrip() if Path(path).suffix == ".json" else ""
    if not text_start.startswith("["):
        return labelsets.read_gold_label_sets(path)
    published = labelsets.read_real_json(path)
    return {f: published[f] for f in file_names if published.get(f)}


def chosen_models(inputs: Inputs) -> list[str] | None:
    """The models the selection chose, or None (all) when no selection ran."""
    if "selection" not in inputs:
        return None
    return json.loads(inputs["selection"].file("selection.json").read_text())["selected_models"]
