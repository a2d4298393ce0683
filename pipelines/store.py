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
import time
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
    if os.path.isdir(path):  # a folder (of images): its listing, names and sizes
        listing = sorted((p.relative_to(path).as_posix(), p.stat().st_size)
                         for p in Path(path).rglob("*") if p.is_file())
        return "folder:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
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
    """``<root>/<stage>/<key>/`` outputs, created atomically, on local disk or on an
    object store.

    Locally a stage computes into a hidden temporary folder that is renamed into place.
    An object store cannot rename: the output is computed into a local folder, uploaded
    through Beam's FileSystems, and exists only once its commit marker (written last,
    listing every file with its size and sha256: pipelines/commit.py) is there; a prefix
    without one (a crashed run's) is ignored and removed by the next writer. Committed
    outputs are read through a local mirror, each file checked against the marker."""

    def __init__(self, root: str | os.PathLike):
        from pipelines import commit

        self.remote = commit.is_uri(root)
        self.root = str(root).rstrip("/") if self.remote else Path(root)
        # (stage, key) of every output computed (not reused) by this process.
        self.computed: list[tuple[str, str]] = []

    def uri(self, stage: str, key: str) -> str:
        from pipelines import commit

        return commit.join(str(self.root), stage, key)

    def path(self, stage: str, key: str) -> Path:
        """The local folder of (stage, key): the output itself, or its local mirror."""
        if self.remote:
            return mirror_dir(str(self.root)) / stage / key
        return self.root / stage / key

    def has(self, stage: str, key: str) -> bool:
        if self.remote:
            from pipelines import commit

            return commit.is_committed(self.uri(stage, key))
        return self.path(stage, key).is_dir()

    def folder(self, stage: str, key: str) -> Path | None:
        """The local folder of a stored output (a verified mirror of a remote one), or None."""
        if not self.has(stage, key):
            return None
        return self._mirror(stage, key) if self.remote else self.path(stage, key)

    def keys(self, stage: str) -> list[dict[str, Any]]:
        """The ``_key.json`` of every stored output of ``stage``, oldest first."""
        if self.remote:
            from pipelines import commit

            parent = commit.join(str(self.root), stage)
            keys = commit.committed_children(parent)
            when = {key: commit.read_marker(commit.join(parent, key)).get("committed_at", 0) for key in keys}
            return [commit.read_json(commit.join(parent, key, "_key.json")) for key in sorted(keys, key=when.get)]
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
        if self.remote and self.has(stage, key):
            return self._mirror(stage, key)
        if not self.remote and final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
        try:
            compute(staging)
            (staging / "_key.json").write_text(
                json.dumps({"stage": stage, "key": key, **(describe or {})},
                           indent=2, sort_keys=True, default=str) + "\n")
            if self.remote:
                self._upload(staging, stage, key)
            shutil.rmtree(final, ignore_errors=True)  # a stale mirror of a crashed run
            try:
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():  # lost a race to an identical computation: fine
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.computed.append((stage, key))
        return final

    def _upload(self, folder: Path, stage: str, key: str) -> None:
        from pipelines import commit

        writer = commit.PrefixWriter(self.uri(stage, key))
        try:
            writer.claim()
        except commit.AlreadyCommittedError:
            return  # an identical computation committed first: fine
        try:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                with open(path, "rb") as src, writer.open(path.relative_to(folder).as_posix()) as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
            writer.commit({"stage": stage, "key": key, "committed_at": time.time()})
        finally:
            writer.abort()  # nothing once committed; else this attempt's files

    def _mirror(self, stage: str, key: str) -> Path:
        """A committed remote output as a local folder, every file verified."""
        from pipelines import commit

        final = self.path(stage, key)
        if (final / "_key.json").is_file():
            return final
        uri = self.uri(stage, key)
        marker = commit.read_marker(uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
        try:
            for rel, meta in sorted(marker["files"].items()):
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(commit.read_bytes(commit.join(uri, rel)))
                if sha256_file(target) != meta["sha256"]:
                    raise commit.VerifyError(f"{uri}/{rel}: its sha256 differs from the commit marker's")
            shutil.rmtree(final, ignore_errors=True)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final


def mirror_dir(root: str) -> Path:
    """The local mirror of a remote store: ``$LABEL_AUDIT_CACHE/stores/<sha256 of root>``."""
    from auditing.sources import cache_dir

    return cache_dir() / "stores" / hashlib.sha256(root.encode()).hexdigest()[:16]
