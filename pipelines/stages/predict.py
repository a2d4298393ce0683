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

import numpy as np
import pandas as pd

from pipelines.stages.base import Artifact, Context, Inputs, Stage, write_json
from pipelines.stages.dataset import image_source
from pipelines.store import file_digest


class PredictStage(Stage):
    name = "predict"
    produces = "predictions"
    consumes = ("dataset",)

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
        names = dataset_file_names(inputs["dataset"])
        paths = {name: restrict_to_dataset(name, ctx.resolve(p), names, out)
                 for name, p in cfg.predictions.items()}
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
    paths = {name: path if Path(path).is_absolute() or "://" in path else str(artifact.file(path))
             for name, path in json.loads(artifact.file("predictions.json").read_text()).items()}
    return paths if models is None else {m: paths[m] for m in models}


def dataset_file_names(artifact: Artifact) -> np.ndarray:
    from pipelines.stages.dataset import original_labels

    return original_labels(artifact)["file_name"].astype(str).to_numpy()


def restrict_to_dataset(name: str, path: str, file_names: np.ndarray, out: Path) -> str:
    """External predictions (NPZ or published top-1 CSV, auditing/predictions.py) on the
    dataset's images only, as NPZ in this stage's folder: published predictions cover
    all 50,000 validation images, an audit of a sample only some of them."""
    from auditing.predictions import Predictions, PredictionsFormatError, load_predictions, save_predictions

    pred = load_predictions(path)
    index = pd.Index(pred.file_names.astype(str))
    rows = index.get_indexer(file_names)
    if (rows < 0).any():
        missing = file_names[rows < 0]
        raise PredictionsFormatError(f"stages.predict.predictions.{name}: {path} has no prediction for "
                                     f"{missing.size} image(s) of the dataset, e.g. {missing[:3].tolist()}")
    if len(rows) == len(index) and (rows == np.arange(len(rows))).all():
        return path
    take = lambda a: None if a is None else a[rows]  # noqa: E731
    subset = Predictions(file_names=pred.file_names[rows], logits=take(pred.logits), top1=take(pred.top1),
                         features=take(pred.features), labels=take(pred.labels), source=path)
    save_predictions(out / "external" / f"{name}.npz", subset)
    return f"external/{name}.npz"  # relative: the folder is renamed into the store
