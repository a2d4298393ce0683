"""Content-addressed stage outputs, so that a re-run recomputes only what changed.

Each stage output lives in ``<out>/store/<stage>/<key>/`` where ``key`` is the sha256
of everything the output depends on: the sha256 of its input files, the keys of the
upstream stages and the stage's parameters. A stage whose key folder exists is not
run again. Outputs are computed into a temporary folder and renamed into place, so
a crash never leaves a folder that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from auditing.labelsets import TFDS_WHEEL
from auditing.sources import sha256_file

_FILE_HASHES: dict[tuple[str, float, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (path, mtime, size) within the process. The
    built-in ImageNet labels (``tfds-wheel``) are named by what they are."""
    if str(path) == TFDS_WHEEL:
        return "tfds-wheel:imagenet2012/validation_labels.txt"
    stat = os.stat(path)
    memo_key = (str(Path(path).resolve()), stat.st_mtime, stat.st_size)
    if memo_key not in _FILE_HASHES:
        _FILE_HASHES[memo_key] = sha256_file(path)
    return _FILE_HASHES[memo_key]


def content_key(**parts: Any) -> str:
    """sha256 of a canonical JSON of ``parts`` (sorted keys, no whitespace)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Store:
    """``<root>/<stage>/<key>/`` folders, created atomically."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        # (stage, key) of every output computed (not reused) by this process.
        self.computed: list[tuple[str, str]] = []

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def has(self, stage: str, key: str) -> bool:
        return self.path(stage, key).is_dir()

    def keys(self, stage: str) -> list[dict[str, Any]]:
        """The ``_key.json`` of every stored output of ``stage``, oldest first."""
        folder = self.root / stage
        records = [(p.stat().st_mtime, json.loads(p.read_text()))
                   for p in folder.glob("[!.]*/_key.json")] if folder.is_dir() else []
        return [record for _, record in sorted(records, key=lambda r: r[0])]

    def get_or_compute(self, stage: str, key: str, compute: Callable[[Path], None],
                       describe: dict[str, Any] | None = None) -> Path:
        """The output folder of (stage, key); ``compute(tmp_dir)`` fills it if absent.

        ``describe`` (the input artifacts' keys and the parameters the key was made of)
        is kept in ``_key.json``, so ``label-audit explain`` can say why a stage re-ran."""
        final = self.path(stage, key)
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
        try:
            compute(staging)
            (staging / "_key.json").write_text(
                json.dumps({"stage": stage, "key": key, **(describe or {})},
                           indent=2, sort_keys=True, default=str) + "\n")
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():  # lost a race to an identical computation: fine
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.computed.append((stage, key))
        return final
