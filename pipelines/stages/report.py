"""``stages.report``: report.json and a self-contained index.html (pipelines/report.py
for the I/O; the figures are pure functions of auditing/report.py, metrics.py and
cooccurrence.py). Stored like every stage, then published to ``<out>/report/``.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from auditing import atomic, labelsets
from pipelines.stages.aggregate import read_label_sets, read_scores
from pipelines.stages.base import Artifact, Context, Inputs, Stage, cyclic_gc_paused
from pipelines.stages.dataset import image_source, original_labels
from pipelines.stages.predict import prediction_paths
from pipelines.store import file_digest


class ReportStage(Stage):
    name = "report"
    produces = "report"
    consumes = ("dataset", "label_sets")
    consumes_if_present = ("predictions", "proposals", "tasks", "votes", "release")

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        cfg = ctx.config.stages.report
        images = ctx.config.dataset.images
        return {"published_labels": file_digest(ctx.resolve(cfg.published_labels)) if cfg.published_labels else None,
                "predictions": {n: file_digest(ctx.resolve(p)) for n, p in sorted(cfg.predictions.items())},
                "class_folder_predictions": {n: [file_digest(ctx.resolve(r.top1)), file_digest(ctx.resolve(r.index))]
                                             for n, r in sorted(cfg.class_folder_predictions.items())},
                "paper_questions": file_digest(ctx.resolve(cfg.paper_questions)) if cfg.paper_questions else None,
                "images": images.model_dump(mode="json") if images is not None else None,
                "dataset": [ctx.config.dataset.name, ctx.config.dataset.split], "model_zoo": cfg.model_zoo}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        # The report builds ~10^5 small objects that all stay alive (label-set dicts, the
        # report dict): full collections would traverse them all for nothing.
        with cyclic_gc_paused():
            return self._compute(ctx, inputs, out)

    def _compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
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
            from pipelines import commit

            release = str(inputs["release"].folder)
            extra["release_name"], extra["release_version"] = release.rstrip("/").split("/")[-2:]
            if commit.exists(commit.join(release, "diff.json")):
                diff = commit.read_json(commit.join(release, "diff.json"))
                extra["diff"] = {k: v for k, v in diff.items()
                                 if k not in ("changed", "images_added", "images_removed")}
        scores = read_scores(inputs["label_sets"])
        # real.json format: label lists in ImageNet val file order.
        published = labelsets.read_real_json(ctx.resolve(cfg.published_labels)) if cfg.published_labels else None
        if published is not None and scores is not None:
            from auditing.metrics import agreement_with_published

            originals = dict(zip(labels["file_name"], labels["label"]))
            extra["agreement_with_published"] = agreement_with_published(scores, sets, published, originals)
        counts = inputs["label_sets"].counts
        if counts.get("pairs_awaiting_votes"):
            extra["awaiting_votes"] = (f"{counts['pairs_awaiting_votes']:,} pairs awaiting votes on "
                                       f"{counts['images_awaiting_votes']:,} images")
        paths = prediction_paths(inputs["predictions"]) if "predictions" in inputs else {}
        paths.update({n: ctx.resolve(p) for n, p in cfg.predictions.items()})
        predictions = {n: load_predictions(p) for n, p in paths.items()}
        if cfg.class_folder_predictions:
            from auditing.predictions import read_class_folder_top1

            predictions |= {n: read_class_folder_top1(ctx.resolve(ref.top1), ctx.resolve(ref.index))
                            for n, ref in cfg.class_folder_predictions.items()}
        zoo = report.local_model_zoo() if cfg.model_zoo else None
        examples = None
        images = ctx.config.dataset.images
        if images is not None and images.type in ("files", "folder"):
            from pipelines.images import EncodedImages

            examples = EncodedImages(image_source(ctx.config))
        from pipelines.stages import report_sections

        def sections(names, original, aligned_sets) -> list[dict[str, Any]]:
            extra_sections = report_sections.rater_quality_sections(ctx, inputs, sets)
            if published is not None and predictions and len(names) < len(published):
                # An audit of some of the validation images: each model here and on all of them.
                # Published predictions over all validation images: their full-val figures
                # are computed on every image the file covers, not only on these.
                predict = ctx.config.stages.predict
                full = {n: load_predictions(ctx.resolve(predict.predictions[n])) if predict and n in predict.predictions
                        else p for n, p in predictions.items()}
                extra_sections.append(report_sections.accuracy_section(names, original, aligned_sets,
                                                                       full, published, zoo))
            if published is not None and "proposals" in inputs and cfg.paper_questions:
                from auditing.metrics import sets_from_mapping
                from auditing.votes import read_real_questions
                from pipelines.stages.propose import read_proposals

                reference = sets_from_mapping(list(names), published, aligned_sets.num_classes)
                extra_sections.append(report_sections.proposal_section(
                    list(names), original, read_proposals(inputs["proposals"]),
                    read_real_questions(ctx.resolve(cfg.paper_questions)), reference, aligned_sets.num_classes))
            return extra_sections

        suspects: list[str] = []
        if "proposals" in inputs:
            from pipelines.stages.propose import centroid_files

            centroid_path, suspects = centroid_files(inputs["proposals"])
            if centroid_path:
                extra["centroid"] = dict(inputs["proposals"].counts.get("centroid", {}))
        report.write_report(out, label_sets=sets, original_labels=labels, predictions=predictions,
                            extra_summary=extra, example_images=examples, model_zoo=zoo, sections=sections,
                            suspects=suspects)
        return {"models": sorted(predictions), "images": len(sets)}

    def finish(self, ctx: Context, artifact: Artifact) -> None:
        publish(ctx, artifact)

    def describe(self, artifact: Artifact) -> str:
        return f"{artifact.counts['images']:,} images, {len(artifact.counts['models'])} model(s)"

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        from pipelines import commit

        folder = published_dir(ctx.config)
        return {"report.html": commit.join(folder, "index.html"), "report.json": commit.join(folder, "report.json")}


def publish(ctx: Context, artifact: Artifact) -> None:
    """Copy the stored report to ``<out>/report/`` (or ``stages.report.out_dir``)
    unless that is already this one."""
    publish_folder(artifact.folder, published_dir(ctx.config), artifact.key, ("report.json", "index.html"))


def published_dir(config) -> str:
    from pipelines import commit

    out_dir = config.stages.report.out_dir
    return config.resolve(out_dir) if out_dir else commit.join(config.output_dir, "report")


def publish_folder(source: Path, target: str, key: str, names: tuple[str, ...] | None = None) -> None:
    """Copy a stored output's files to where people look for them (``<out>/report/``,
    a folder or an object-store prefix), unless the ``.key`` there says it is this one.
    Each file is written whole (write-then-rename locally; an object appears whole)."""
    from pipelines import commit

    files = [source / n for n in names] if names else sorted(p for p in source.rglob("*") if p.is_file())
    # The key and the bytes: an output recomputed under the same key is published again.
    key = key + ":" + hashlib.sha256("".join(file_digest(p) for p in files).encode()).hexdigest()
    marker = commit.join(target, ".key")
    if commit.exists(marker) and commit.read_text(marker) == key:
        return
    for path in files:
        destination = commit.join(target, path.relative_to(source).as_posix())
        if commit.is_uri(destination):
            commit.write_bytes(destination, path.read_bytes())
        else:
            with atomic.atomic_path(destination) as tmp:
                shutil.copyfile(path, tmp)
    if commit.is_uri(marker):
        commit.write_text(marker, key)
    else:
        atomic.write_text(marker, key)
