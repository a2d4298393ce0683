"""``label-audit release pull URI [--to DIR]``: a committed release version, local and verified.

array_record's reader (C++) opens local files only, so a version on ``gs://`` or
``s3://`` is read from a local copy: ``load_release(uri)`` copies a committed version
into a cache folder, checks every file against its commit marker (size and sha256; a
tampered, missing or extra file is refused with ``VerifyError``), and returns the TFDS
builder::

    builder = load_release("gs://bucket/audits/tfds/imagenet2012_real_audit/2.0.0")
    source = builder.as_data_source(split="validation")

A bucket mounted as a folder (GCSFuse, ``gcsfuse --implicit-dirs BUCKET /mnt/b``) is a
local path: ``tfds.builder_from_directory('/mnt/b/.../2.0.0')`` reads it in place.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import tensorflow_datasets as tfds

from pipelines import commit

CACHE_ENV = "LABEL_AUDIT_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "label-audit" / "releases")


def _local_name(uri: str, marker: dict) -> Path:
    release = marker.get("release") or {}
    parts = uri.rstrip("/").split("/")
    return Path(release.get("name") or parts[-2]) / (release.get("version") or parts[-1])


def _copy_verified(source: str, destination: Path, expected: dict) -> None:
    """Copy one file, hashing it on the way; refuse it if it differs from the marker."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with commit.open_read(source) as src, open(destination, "wb") as dst:
        while chunk := src.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    if size != expected["size"] or digest.hexdigest() != expected["sha256"]:
        raise commit.VerifyError(
            f"{source}: {size} bytes with sha256 {digest.hexdigest()}, but {commit.MARKER} says "
            f"{expected['size']} bytes with sha256 {expected['sha256']}: the file was changed after the "
            "release was committed; refusing it")


def pull(uri: str, to: str | os.PathLike | None = None) -> Path:
    """Copy committed version ``uri`` into ``to`` (default: the cache, by name/version),
    verified file by file; returns the local version folder. A verified copy already
    there is reused."""
    marker = commit.read_marker(uri)
    destination = Path(to) if to is not None else default_cache_dir() / _local_name(uri, marker)
    if destination.is_dir() and commit.is_committed(destination):
        if commit.read_marker(destination)["files"] == marker["files"]:
            commit.verify(destination)
            return destination
        raise commit.CommitError(f"{destination} holds another copy than {uri}; remove it or pull --to elsewhere")
    # Into a private folder first, renamed into place (a local disk has rename): an
    # interrupted pull leaves no folder that looks complete.
    partial = destination.parent / f".pull-{destination.name}-{uuid.uuid4().hex[:8]}"
    try:
        for rel in sorted(marker["files"]):
            _copy_verified(commit.join(uri, rel), partial / rel, marker["files"][rel])
        extra = set(commit.data_files(commit.list_files(uri))) - set(marker["files"])
        if extra:
            raise commit.VerifyError(f"{commit.join(uri, sorted(extra)[0])}: not listed in {commit.MARKER} "
                                     "(added after the commit); refusing the release")
        (partial / commit.MARKER).write_bytes(commit.read_bytes(commit.join(uri, commit.MARKER)))
        os.rename(partial, destination)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return destination


def load_release(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """The TFDS builder of committed release version ``uri`` (local or remote), from a
    verified local copy (remote) or verified in place (local)."""
    uri = str(uri)
    if commit.is_uri(uri):
        marker = commit.read_marker(uri)
        local = pull(uri, None if cache_dir is None else Path(cache_dir) / _local_name(uri, marker))
    else:
        commit.verify(uri)
        local = Path(uri)
    return tfds.builder_from_directory(str(local))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="release_command", required=True, metavar="ACTION")
    pull_parser = actions.add_parser("pull", help="copy a committed release version here, verified")
    pull_parser.add_argument("uri", help="a release version: gs://.../tfds/NAME/VERSION (or a local folder)")
    pull_parser.add_argument("--to", help=f"local folder for it (default: ${CACHE_ENV} or "
                                          "~/.cache/label-audit/releases/NAME/VERSION)")


def main(args: argparse.Namespace) -> int:
    try:
        local = pull(args.uri, args.to) if commit.is_uri(args.uri) else Path(args.uri)
        builder = load_release(local)
    except commit.CommitError as e:
        print(f"error: {e}")
        return 2
    splits = ", ".join(f"{name}: {split.num_examples:,} examples" for name, split in builder.info.splits.items())
    print(f"{local}\n{builder.info.name} {builder.info.version} ({splits})")
    return 0
