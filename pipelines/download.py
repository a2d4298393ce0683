"""Downloads of the pinned public files declared in ``auditing/sources.py``.

The auditing layer only declares the files (URL at a pinned commit, sha256) and finds
local copies; this module is the network half, registered with it when ``pipelines``
is imported. A download goes to a temporary file, is checked against its sha256, and
only then renamed into the cache; a mismatch is deleted and refused.
"""
from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

from auditing import sources


def download(name: str, source: sources.Source, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".download-")
    os.close(fd)
    try:
        try:
            urllib.request.urlretrieve(source.url, tmp)
        except OSError as e:
            raise sources.SourceError(
                f"{name}: no local copy of {source.path} (looked in {[str(r) for r in sources.data_roots()]}) "
                f"and the download from {source.url} failed: {e}") from e
        got = sources.sha256_file(tmp)
        if got != source.sha256:
            raise sources.SourceError(f"{name}: {source.url} has sha256 {got}, expected {source.sha256}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
