"""``stages.propose``: label proposals, pooled across models (exact global top-N per
model over logits and probabilities, in Beam: pipelines/propose.py with the rule of
auditing/proposals.py), or the questions of a ReaL raters.npz (``propose.questions``).
With ``stages.select_subset`` only the chosen models are pooled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import AuditConfig, ProposeConfig
from pipelines.stages.base import Artifact, Context, Inputs, Stage, StageError
from pipelines.stages.dataset import original_labels
from pipelines.stages.predict import prediction_paths
from pipelines.stages.select_subset import chosen_models
from pipelines.store import file_digest


def propose_config(config: AuditConfig) -> ProposeConfig:
    # select_subset pools the chosen models' proposals even when propose is not declared.
    return config.stages.propose or ProposeConfig()


class ProposeStage(Stage):
    name = "propose"
    produces = "proposals"
    consumes = ("dataset",)
    consumes_if_present = ("predictions", "selection")

    def enabled(self, config: AuditConfig) -> bool:
        return config.stages.propose is not None or config.stages.select_subset is not None

    def check(self, ctx: Context, available: set[str]) -> None:
        super().check(ctx, available)
        if not propose_config(ctx.config).questions and "predictions" not in available:
            raise StageError("stages.propose needs predictions (stages.predict) or propose.questions")

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        cfg = propose_config(ctx.config)
        if cfg.questions:
            return {"questions": file_digest(ctx.resolve(cfg.questions))}
        return {"top_n": cfg.top_n, "models": chosen_models(inputs), "rows_per_shard": cfg.rows_per_shard,
                "centroid": cfg.centroid.model_dump() if cfg.centroid else None}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        cfg = propose_config(ctx.config)
        if cfg.questions:
            from auditing.votes import read_real_questions

            proposals = read_real_questions(ctx.resolve(cfg.questions))
            proposals.to_parquet(out / "proposals.parquet", index=False)
        else:
            from pipelines import propose

            paths = prediction_paths(inputs["predictions"], chosen_models(inputs))
            counts: dict[str, Any] = {}
            if cfg.centroid:
                name, path, counts["centroid"] = centroid_proposals(ctx, inputs, out)
                paths[name] = path  # a top-1-only proposer in the pool, with its provenance
            with ctx.beam_output(out) as beam_out:
                propose.propose(paths, original_labels(inputs["dataset"]), beam_out, cfg.top_n, ctx.beam_options(),
                                rows_per_shard=cfg.rows_per_shard)
            return json.loads((out / "summary.json").read_text()) | counts  # propose's own counts
        n_images = int(proposals["file_name"].nunique())
        return {"proposals": len(proposals), "images": n_images,
                "proposals_per_image": round(len(proposals) / max(n_images, 1), 2)}

    def describe(self, artifact: Artifact) -> str:
        c = artifact.counts
        return f"{c['proposals']:,} proposals on {c['images']:,} images ({c['proposals_per_image']:.2f} per image)"

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        return {"proposals": str(artifact.file("proposals.parquet"))}


def read_proposals(folder_or_artifact: Artifact | Path) -> pd.DataFrame:
    folder = folder_or_artifact.folder if isinstance(folder_or_artifact, Artifact) else folder_or_artifact
    return pd.read_parquet(folder / "proposals.parquet")


def centroid_proposals(ctx: Context, inputs: Inputs, out: Path) -> tuple[str, str, dict[str, Any]]:
    """The nearest class centroid of each audited image (auditing/centroids.py) as a
    top-1-only predictions file, and its summary (how often it agrees, suspects)."""
    from auditing.centroids import NearestCentroid, suspected_label_errors
    from auditing.predictions import Predictions, load_predictions, save_predictions

    cfg = propose_config(ctx.config).centroid
    all_paths = prediction_paths(inputs["predictions"])
    if cfg.model not in all_paths:
        raise StageError(f"stages.propose.centroid.model {cfg.model!r} is not a model of stages.predict "
                         f"({', '.join(sorted(all_paths))})")
    pred = load_predictions(all_paths[cfg.model])
    if pred.features is None:
        raise StageError(f"stages.propose.centroid: the predictions of {cfg.model} ({all_paths[cfg.model]}) have no "
                         "features; they were stored before features were kept: delete that file and re-run")
    labels = original_labels(inputs["dataset"]).set_index("file_name")["label"]
    own = labels.reindex(pred.file_names.astype(str)).fillna(-1).to_numpy(np.int64)
    example_features = example_labels = None
    if cfg.reference != "audited":
        example_features, example_labels = _example_features(ctx, cfg)
    model = NearestCentroid(reference=cfg.reference).fit(pred.features.astype(np.float32), own,
                                                         example_features, example_labels)
    name = f"centroid-{cfg.model}"
    found = model.labels_ >= 0
    save_predictions(out / "centroid" / f"{name}.npz",
                     Predictions(file_names=pred.file_names[found], top1=model.labels_[found], source=name))
    top1 = {n: _aligned_top1(load_predictions(p), pred.file_names) for n, p in all_paths.items()}
    suspects = suspected_label_errors(own, model.labels_, top1)
    np.save(out / "centroid" / "suspected_label_errors.npy", pred.file_names[suspects].astype(str))
    summary = {"model": cfg.model, "reference": cfg.reference,
               "nearest_is_original": float(np.mean(model.labels_ == own)),
               "suspected_label_errors": int(suspects.sum())}
    return name, str(out / "centroid" / f"{name}.npz"), summary


def _aligned_top1(pred, file_names: np.ndarray) -> np.ndarray:
    rows = pd.Index(pred.file_names.astype(str)).get_indexer(file_names.astype(str))
    if (rows < 0).any():
        raise StageError(f"{pred.source}: no prediction for {int((rows < 0).sum())} of the audited images")
    return np.asarray(pred.top1_labels())[rows]


def centroid_files(artifact: Artifact) -> tuple[str | None, list[str]]:
    """The centroid proposer's predictions file and the suspected label errors, if any."""
    folder = artifact.file("centroid")
    if not folder.is_dir():
        return None, []
    npz = next(iter(sorted(folder.glob("centroid-*.npz"))), None)
    suspects = np.load(folder / "suspected_label_errors.npy").tolist()
    return (str(npz) if npz else None), suspects


def _example_features(ctx: Context, cfg) -> tuple[np.ndarray, np.ndarray]:
    """The examples folder predicted by the centroid's model (stored like any predictions)."""
    from auditing.imagenet import load_classes
    from auditing.predictions import load_predictions
    from auditing.task_labels import example_class
    from models.registry import get_model
    from pipelines import predict
    from pipelines.images import ImageFiles

    folder = ImageFiles.from_folder(ctx.resolve(cfg.examples), split="examples")
    runner = ctx.config.runner
    path = predict.run_predictions([get_model(cfg.model)], folder, ctx.store.root, runner=runner.name,
                                   num_workers=runner.num_workers, beam_args=ctx.beam_args())[cfg.model]
    examples = load_predictions(path)
    classes = load_classes()
    return examples.features.astype(np.float32), np.array([example_class(n, classes) for n in examples.file_names])


def proposals_from_file(ctx: Context, ref: str) -> Artifact:
    """``inputs.proposals``: (image, label) pairs to ask about, from a Parquet / CSV file
    with ``file_name`` and ``label`` (``count`` and ``sources`` optional), or the
    questions of a ReaL raters.npz."""
    from pipelines.stages.base import load_artifact, write_json
    from pipelines.store import content_key, file_digest

    path = ctx.resolve(ref)

    def fill(out: Path) -> None:
        if path.endswith(".npz"):
            from auditing.votes import read_real_questions

            frame = read_real_questions(path)
        else:
            frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
        missing = [c for c in ("file_name", "label") if c not in frame.columns]
        if missing:
            raise StageError(f"inputs.proposals: {path} lacks the column(s) {missing}")
        frame.to_parquet(out / "proposals.parquet", index=False)
        n_images = int(frame["file_name"].nunique())
        write_json(out / "summary.json", {"proposals": len(frame), "images": n_images,
                                          "proposals_per_image": round(len(frame) / max(n_images, 1), 2)})

    folder = ctx.store.get_or_compute("proposals_input", content_key(proposals=file_digest(path)), fill,
                                      describe={"params": {"file": path}})
    return load_artifact("proposals", folder)
