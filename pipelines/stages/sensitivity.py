"""``stages.sensitivity``: the transform-sensitivity audit (pipelines/sensitivity.py):
every model predicts every image under every transform, inside one jitted call on the
decoded batch (models/transforms.py); per (model, transform) accuracy and its change,
class-wise and per-model t-tests (auditing/sensitivity.py), images that look stored
transformed by accident. Predictions are stored per (model, transform), so adding a
transform computes only that one. Published to ``<out>/sensitivity/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.stages.aggregate import read_label_sets
from pipelines.stages.base import Artifact, Context, Inputs, Stage
from pipelines.stages.dataset import image_source


class SensitivityStage(Stage):
    name = "sensitivity"
    produces = "sensitivity"
    consumes = ("dataset",)
    consumes_if_present = ("label_sets",)  # ReaL-style sets where the audit has them

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        source = image_source(ctx.config)
        return {"section": ctx.config.stages.sensitivity, "images": [source.dataset_id, source.split]}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        from pipelines.sensitivity import run_sensitivity

        runner = ctx.config.runner
        sets = read_label_sets(inputs["label_sets"]) if "label_sets" in inputs else None
        result = run_sensitivity(ctx.config.stages.sensitivity, labelled_source(ctx, inputs, out), str(out),
                                 label_sets=sets, store_dir=str(ctx.store.root), runner=runner.name,
                                 num_workers=runner.num_workers, beam_args=ctx.beam_args())
        return result.counts | {"class_counts": result.class_counts}

    def finish(self, ctx: Context, artifact: Artifact) -> None:
        from pipelines import commit
        from pipelines.stages.report import publish_folder

        publish_folder(artifact.file("sensitivity"), commit.join(ctx.config.output_dir, "sensitivity"), artifact.key)

    def describe(self, artifact: Artifact) -> str:
        c = artifact.counts
        return (f"{c['images_audited']:,} images x {c['pairs']} (model, transform) pairs "
                f"({c['pairs_computed']} computed); {c['accidental_candidates']} accidental-transform candidates")

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        from pipelines import commit

        return {"sensitivity.html": commit.join(ctx.config.output_dir, "sensitivity", "index.html")}


def labelled_source(ctx: Context, inputs: Inputs, out: Path):
    """The images with the dataset's original labels (what accuracy is measured against)."""
    from pipelines import images as images_lib
    from pipelines.stages.dataset import original_labels

    cfg = ctx.config.dataset.images
    if cfg.type == "tfds":
        return image_source(ctx.config)  # a TFDS dataset carries its labels
    labels = out / "original_labels.tsv"
    original_labels(inputs["dataset"])[["file_name", "label"]].to_csv(labels, sep="\t", index=False)
    if cfg.type == "folder":
        return images_lib.ImageFiles.from_folder(ctx.resolve(cfg.path), labels_path=labels, split=cfg.split)
    import dataclasses

    source = image_source(ctx.config)
    by_name = dict(zip(*original_labels(inputs["dataset"])[["file_name", "label"]].T.values))
    return dataclasses.replace(source, labels=tuple(int(by_name.get(n, -1)) for n in source.file_names))
