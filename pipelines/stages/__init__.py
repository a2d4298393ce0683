"""The stages of an audit, one module each, in the method's order.

    config key            module                          produces
    dataset               stages/dataset.py               dataset (original labels)
    stages.predict        stages/predict.py               predictions
    stages.select_subset  stages/select_subset.py         selection
    stages.propose        stages/propose.py               proposals
    stages.tasks          stages/tasks.py                 tasks
    stages.votes          stages/votes.py                 votes
    stages.aggregate      stages/aggregate.py             label_sets (+ scores)
    stages.release        stages/release.py               release (TFDS version)
    stages.report         stages/report.py                report
    stages.sensitivity    stages/sensitivity.py           sensitivity (transform audit)

A new stage is one new module here and one line in ``STAGES``.
"""
from __future__ import annotations

from pipelines.stages.aggregate import AggregateStage, label_sets_from_file
from pipelines.stages.base import PRODUCERS, Artifact, Context, Stage, StageError
from pipelines.stages.dataset import DatasetStage
from pipelines.stages.predict import PredictStage
from pipelines.stages.propose import ProposeStage, proposals_from_file
from pipelines.stages.release import ReleaseStage
from pipelines.stages.report import ReportStage
from pipelines.stages.select_subset import SelectSubsetStage
from pipelines.stages.sensitivity import SensitivityStage
from pipelines.stages.tasks import TasksStage
from pipelines.stages.votes import VotesStage

STAGES: list[Stage] = [DatasetStage(), PredictStage(), SelectSubsetStage(), ProposeStage(), TasksStage(),
                       VotesStage(), AggregateStage(), ReleaseStage(), ReportStage(), SensitivityStage()]
PRODUCERS.update({stage.produces: f"stages.{stage.name}" for stage in STAGES})

# Artifacts that can be given as a file (config ``inputs:``) instead of computed.
SUPPLIERS = {"label_sets": label_sets_from_file, "proposals": proposals_from_file}

__all__ = ["STAGES", "SUPPLIERS", "Artifact", "Context", "Stage", "StageError"]
