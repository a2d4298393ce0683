"""``dataset``: the original labels of the audited images (always runs).

``dataset.original_labels`` is a label TSV or ``tfds-wheel`` (auditing/labelsets.py);
``dataset.images`` is read by the predict stage (pipelines/images.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from auditing import labelsets
from pipelines.config import AuditConfig
from pipelines.stages.base import Artifact, Context, Inputs, Stage, StageError
from pipelines.store import file_digest


class DatasetStage(Stage):
    name = "dataset"
    produces = "dataset"

    def enabled(self, config: AuditConfig) -> bool:
        return True

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        return {"original_labels": file_digest(ctx.resolve(ctx.config.dataset.original_labels))}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        labels = labelsets.load_original_labels(ctx.resolve(ctx.config.dataset.original_labels))
        labels.to_parquet(out / "labels.parquet", index=False)
        return {"images": len(labels)}

    def describe(self, artifact: Artifact) -> str:
        return f"{artifact.counts['images']:,} images with original labels"


def original_labels(artifact: Artifact) -> pd.DataFrame:
    """file_name, label (int64), one row per image, in the dataset's order."""
    return pd.read_parquet(artifact.file("labels.parquet"))


def image_source(config: AuditConfig):
    """The ``dataset.images`` section as a sharded image source (pipelines/images.py)."""
    from pipelines import images as images_lib

    cfg = config.dataset.images
    if cfg is None:
        raise StageError("this stage needs dataset.images (a folder, files or a TFDS dataset)")
    return images_lib.make_image_source(
        cfg.type, path=config.resolve(cfg.path) if cfg.path else None,
        paths=[config.resolve(p) for p in cfg.paths], name=cfg.name, data_dir=cfg.data_dir,
        split=cfg.split, labels_path=config.resolve(cfg.labels) if cfg.labels else None)
