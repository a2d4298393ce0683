"""``stages.propose``: label proposals, pooled across models (exact global top-N per
model over logits and probabilities, in Beam: pipelines/propose.py with the rule of
auditing/proposals.py), or the questions of a ReaL raters.npz (``propose.questions``).
With ``stages.select_subset`` only the chosen models are pooled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
        return {"top_n": cfg.top_n, "models": chosen_models(inputs), "rows_per_shard": cfg.rows_per_shard}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        cfg = propose_config(ctx.config)
        if cfg.questions:
            from auditing.votes import read_real_questions

            proposals = read_real_questions(ctx.resolve(cfg.questions))
            proposals.to_parquet(out / "proposals.parquet", index=False)
        else:
            from pipelines import propose

            propose.propose(prediction_paths(inputs["predictions"], chosen_models(inputs)),
                            original_labels(inputs["dataset"]), out, cfg.top_n, ctx.beam_options(),
                            rows_per_shard=cfg.rows_per_shard)
            return json.loads((out / "summary.json").read_text())  # propose's own counts
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
