"""Remote inputs (``gs://``, ``s3://``... any scheme Beam's FileSystems knows) as local
files, so that every reader of the pipeline works on them unchanged.

A URI is copied once through ``apache_beam.io.filesystems.FileSystems`` (install the
``dataflow`` extra for ``gs://``) into ``<cache>/remote/``, keyed by the URI, its size
and its modification time, so a changed remote file is fetched again.
"""
from __future__ import annotations

from auditing.errors import InputError
import hashlib
import os
import shutil
from pathlib import Path

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from auditing import atomic, sources


class RemoteInputError(InputError):
    """A URI that cannot be read; the message names it."""


def is_uri(ref: str) -> bool:
    return "://" in ref


def localize(uri: str) -> Path:
    """A local copy of ``uri`` (fetched at most once per remote version)."""
    try:
        matches = FileSystems.match([uri])[0].metadata_list
    except Exception as e:  # noqa: BLE001 - Beam raises BeamIOError/ValueError by scheme
        raise RemoteInputError(f"{uri}: cannot be read ({e})") from e
    if not matches:
        raise RemoteInputError(f"{uri}: no such file")
    meta = matches[0]
    version = f"{uri}\t{meta.size_in_bytes}\t{getattr(meta, 'last_updated_in_seconds', 0.0)}"
    key = hashlib.sha256(version.encode()).hexdigest()[:24]
    target = sources.cache_dir() / "remote" / key / os.path.basename(uri.rstrip("/"))
    if target.is_file():
        return target
    # The bytes as stored: Beam would otherwise decompress a .gz under its .gz name.
    with (atomic.atomic_path(target) as tmp,
          FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as src,
          open(tmp, "wb") as dst):
        shutil.copyfileobj(src, dst, 1 << 20)
    return target
