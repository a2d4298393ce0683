"""``stages.tasks``: crowd tasks of at most ``max_labels`` WordNet-grouped labels per
image (auditing/tasks.py), exported as JSONL and CSV. Images where every model's
top-1 is the original label are skipped; in a re-audit, pairs asked before are not
asked again (auditing/reaudit.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditing import reaudit
from pipelines.stages.base import Artifact, Context, Inputs, Stage
from pipelines.stages.dataset import original_labels
from pipelines.stages.predict import prediction_paths
from pipelines.stages.propose import read_proposals
from pipelines.stages.select_subset import chosen_models


def top1_by_model(paths: dict[str, str]) -> dict[str, pd.DataFrame]:
    """model -> DataFrame[file_name, label] of its top-1 predictions."""
    from auditing.predictions import load_predictions

    top1 = {}
    for name, path in paths.items():
        pred = load_predictions(path)
        top1[name] = pd.DataFrame({"file_name": pred.file_names, "label": np.asarray(pred.top1_labels())})
    return top1


class TasksStage(Stage):
    name = "tasks"
    produces = "tasks"
    consumes = ("dataset", "proposals")
    consumes_if_present = ("predictions", "selection")

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        cfg = ctx.config.stages.tasks
        previous = ctx.previous_manifest()
        return {"max_labels": cfg.max_labels, "image_uri_template": cfg.image_uri_template,
                "asked_before": previous["content_key"] if previous else None}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        from auditing import tasks as tasks_lib

        cfg = ctx.config.stages.tasks
        proposals = read_proposals(inputs["proposals"])
        top1 = None
        if "predictions" in inputs:
            top1 = top1_by_model(prediction_paths(inputs["predictions"], chosen_models(inputs)))
        if ctx.previous_release is not None:
            from pipelines import release as release_lib

            proposals = reaudit.unasked(proposals, reaudit.asked_pairs(
                release_lib.read_release(ctx.previous_release)))
        built = tasks_lib.build_tasks(proposals, original_labels=original_labels(inputs["dataset"]),
                                      top1=top1, max_labels=cfg.max_labels)
        tasks_lib.write_tasks_jsonl(built, out / "tasks.jsonl", image_uri_template=cfg.image_uri_template)
        tasks_lib.write_tasks_csv(built, out / "tasks.csv", image_uri_template=cfg.image_uri_template)
        return tasks_lib.summarize_tasks(built)

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        return {"tasks": str(artifact.file("tasks.jsonl"))}


def read_tasks(artifact: Artifact) -> pd.DataFrame:
    from auditing import tasks as tasks_lib

    return tasks_lib.read_tasks_jsonl(artifact.file("tasks.jsonl"))
