"""``stages.predict``: every model predicts every image (Beam RunInference over Flax
models, pipelines/predict.py), plus predictions computed elsewhere
(``stages.predict.predictions``: NPZ, or the published top-1 CSV format).

Each model's predictions are stored once per (weights, images, dtype) under
``store/predictions/`` with per-shard resume; this stage's artifact is the map
model name -> predictions file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.stages.base import Artifact, Context, Inputs, Stage, write_json
from pipelines.stages.dataset import image_source
from pipelines.store import file_digest


class PredictStage(Stage):
    name = "predict"
    produces = "predictions"

    def _specs(self, ctx: Context):
        from models.registry import get_model

        cfg = ctx.config.stages.predict
        return [get_model(m.name, checkpoint=ctx.resolve(m.checkpoint) if m.checkpoint else None)
                for m in cfg.models]

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        cfg = ctx.config.stages.predict
        params: dict[str, Any] = {"external": {n: file_digest(ctx.resolve(p)) for n, p in sorted(cfg.predictions.items())}}
        if cfg.models:
            from pipelines.predict import model_key

            source = image_source(ctx.config)
            params |= {"images": [source.dataset_id, source.split], "dtype": cfg.dtype,
                       "models": [model_key(spec, cfg.dtype) for spec in self._specs(ctx)]}
        return params

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        cfg = ctx.config.stages.predict
        paths = {name: ctx.resolve(p) for name, p in cfg.predictions.items()}
        if cfg.models:
            from pipelines import predict  # JAX is imported only when a model runs

            runner = ctx.config.runner
            computed = predict.run_predictions(
                self._specs(ctx), image_source(ctx.config), ctx.store.root, batch_size=cfg.batch_size,
                dtype=cfg.dtype, runner=runner.name, num_workers=runner.num_workers, beam_args=runner.options)
            paths.update({name: str(p) for name, p in computed.items()})
        write_json(out / "predictions.json", dict(sorted(paths.items())))
        return {"models": sorted(paths)}

    def describe(self, artifact: Artifact) -> str:
        models = artifact.counts["models"]
        return f"{len(models)} model(s): {', '.join(models)}"


def prediction_paths(artifact: Artifact, models: list[str] | None = None) -> dict[str, str]:
    """model name -> predictions file; only ``models`` if given (a chosen subset)."""
    paths = json.loads(artifact.file("predictions.json").read_text())
    return paths if models is None else {m: paths[m] for m in models}
