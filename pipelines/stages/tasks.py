"""``stages.tasks``: crowd tasks of at most ``max_labels`` WordNet-grouped labels per
image (auditing/tasks.py), exported as JSONL and CSV, and kept in long form
(questions.parquet) for the stages that read them back. Images where every model's
top-1 is the original label are skipped; in a re-audit, pairs asked before are not
asked again (auditing/reaudit.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import logging

from auditing import reaudit
from pipelines.stages.base import Artifact, Context, Inputs, Stage, cyclic_gc_paused
from pipelines.stages.dataset import original_labels
from pipelines.stages.predict import prediction_paths
from pipelines.stages.propose import read_proposals
from pipelines.stages.select_subset import chosen_models


if TYPE_CHECKING:
    from auditing.tasks import TaskSet

log = logging.getLogger(__name__)
QUESTIONS_FILE = "questions.parquet"  # tasks.jsonl in long form (auditing.tasks.task_questions_table)


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
                "examples": sorted(os.listdir(ctx.resolve(cfg.examples))) if cfg.examples else None,
                "asked_before": previous["content_key"] if previous else None}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        # The WordNet hierarchy (75,000 edges) and the task texts are such objects.
        with cyclic_gc_paused():
            return self._compute(ctx, inputs, out)

    def _compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
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
        # The original labels only serve to compare with models' top-1s.
        built = tasks_lib.build_tasks(proposals, original_labels=original_labels(inputs["dataset"]) if top1 else None,
                                      top1=top1, max_labels=cfg.max_labels)
        if cfg.examples:
            # Each label with its name, gloss and an example image of its class.
            from auditing import atomic
            from auditing.imagenet import load_classes
            from auditing.task_labels import examples_by_class, with_example_images

            examples = examples_by_class(os.listdir(ctx.resolve(cfg.examples)), load_classes())
            records = with_example_images(tasks_lib.task_records(built, cfg.image_uri_template), examples)
            atomic.write_text(out / "tasks.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        else:
            tasks_lib.write_tasks_jsonl(built, out / "tasks.jsonl", image_uri_template=cfg.image_uri_template)
        tasks_lib.write_tasks_csv(built, out / "tasks.csv", image_uri_template=cfg.image_uri_template)
        write_questions(built, cfg.image_uri_template, out)
        return tasks_lib.summarize_tasks(built)

    def finish(self, ctx: Context, artifact: Artifact) -> None:
        # New tasks go to the labelling tool; re-pushing imports only task ids it lacks,
        # so this is no part of the stored output.
        cfg = ctx.config.stages.tasks.label_studio
        if cfg is not None:
            from pipelines.label_studio import LabelStudioProject

            result = LabelStudioProject(**cfg.model_dump()).push(artifact.file("tasks.jsonl"))
            log.info("Label Studio %s: %s", cfg.url, result.as_dict())

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        return {"tasks": str(artifact.file("tasks.jsonl"))}


def write_questions(built: TaskSet, image_uri_template: str, out: Path) -> None:
    """The tasks of tasks.jsonl in long form, for read_tasks: parsing the JSONL back
    takes a second on the ReaL questions."""
    import pyarrow.parquet as pq

    from auditing import tasks as tasks_lib

    pq.write_table(tasks_lib.task_questions_table(built, image_uri_template), out / QUESTIONS_FILE)


def read_tasks(artifact: Artifact) -> pd.DataFrame:
    """The tasks as long questions (``auditing.tasks.read_tasks_jsonl``'s frame)."""
    questions = artifact.file(QUESTIONS_FILE)
    if questions.is_file():
        return pd.read_parquet(questions)
    from auditing import tasks as tasks_lib

    return tasks_lib.read_tasks_jsonl(artifact.file("tasks.jsonl"))  # stored before QUESTIONS_FILE was
