"""``stages.report``: report.json and a self-contained index.html (pipelines/report.py
for the I/O; the figures are pure functions of auditing/report.py, metrics.py and
cooccurrence.py). Stored like every stage, then published to ``<out>/report/``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from auditing import atomic, labelsets
from pipelines.stages.aggregate import read_label_sets, read_scores
from pipelines.stages.base import Artifact, Context, Inputs, Stage
from pipelines.stages.dataset import image_source, original_labels
from pipelines.stages.predict import prediction_paths
from pipelines.store import file_digest


class ReportStage(Stage):
    name = "report"
    produces = "report"
    consumes = ("dataset", "label_sets")
    consumes_if_present = ("predictions", "tasks", "votes", "release")

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        cfg = ctx.config.stages.report
        images = ctx.config.dataset.images
        return {"published_labels": file_digest(ctx.resolve(cfg.published_labels)) if cfg.published_labels else None,
                "predictions": {n: file_digest(ctx.resolve(p)) for n, p in sorted(cfg.predictions.items())},
                "images": images.model_dump(mode="json") if images is not None else None,
                "dataset": [ctx.config.dataset.name, ctx.config.dataset.split], "model_zoo": cfg.model_zoo}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        from auditing.predictions import load_predictions
        from pipelines import report

        cfg = ctx.config.stages.report
        sets = read_label_sets(inputs["label_sets"])
        labels = original_labels(inputs["dataset"])
        counts = inputs["release"].counts if "release" in inputs else inputs["label_sets"].counts
        extra: dict[str, Any] = {"dataset": f"{ctx.config.dataset.name} ({ctx.config.dataset.split})",
                                 "counts": {k: v for k, v in counts.items() if not isinstance(v, (list, dict))}}
        if "votes" in inputs:
            votes = inputs["votes"].counts
            extra["votes"] = {k: v for k, v in votes.items() if k != "quarantined_by_reason"}
            extra["votes"] |= {f"quarantined ({reason})": n for reason, n in
                               votes.get("quarantined_by_reason", {}).items() if n}
        if "tasks" in inputs:
            extra["tasks"] = dict(inputs["tasks"].counts)
        if "release" in inputs:
            release = inputs["release"].folder
            extra["release_name"], extra["release_version"] = release.parent.name, release.name
            if (release / "diff.json").is_file():
                diff = json.loads((release / "diff.json").read_text())
                extra["diff"] = {k: v for k, v in diff.items()
                                 if k not in ("changed", "images_added", "images_removed")}
        scores = read_scores(inputs["label_sets"])
        if cfg.published_labels and scores is not None:
            from auditing.metrics import agreement_with_published

            # real.json format: label lists in ImageNet val file order.
            published = labelsets.read_real_json(ctx.resolve(cfg.published_labels))
            originals = dict(zip(labels["file_name"], labels["label"]))
            extra["agreement_with_published"] = agreement_with_published(scores, sets, published, originals)
        paths = prediction_paths(inputs["predictions"]) if "predictions" in inputs else {}
        paths.update({n: ctx.resolve(p) for n, p in cfg.predictions.items()})
        examples = None
        images = ctx.config.dataset.images
        if images is not None and images.type in ("files", "folder"):
            from pipelines.images import EncodedImages

            examples = EncodedImages(image_source(ctx.config))
        report.write_report(out, label_sets=sets, original_labels=labels,
                            predictions={n: load_predictions(p) for n, p in paths.items()},
                            extra_summary=extra, example_images=examples,
                            model_zoo=report.local_model_zoo() if cfg.model_zoo else None)
        return {"models": sorted(paths), "images": len(sets)}

    def finish(self, ctx: Context, artifact: Artifact) -> None:
        publish(ctx, artifact)

    def describe(self, artifact: Artifact) -> str:
        return f"{artifact.counts['images']:,} images, {len(artifact.counts['models'])} model(s)"

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        folder = published_dir(ctx.config)
        return {"report.html": str(folder / "index.html"), "report.json": str(folder / "report.json")}


def publish(ctx: Context, artifact: Artifact) -> None:
    """Copy the stored report to ``<out>/report/`` (or ``stages.report.out_dir``)
    unless that is already this one."""
    target = published_dir(ctx.config)
    marker = target / ".key"
    if marker.is_file() and marker.read_text() == artifact.key:
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "index.html"):
        with atomic.atomic_path(target / name) as tmp:
            shutil.copyfile(artifact.file(name), tmp)
    atomic.write_text(marker, artifact.key)


def published_dir(config) -> Path:
    out_dir = config.stages.report.out_dir
    return Path(config.resolve(out_dir)) if out_dir else Path(config.output_dir) / "report"
