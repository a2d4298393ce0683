"""Commit protocol for outputs on local disk or object storage (no rename needed).

A *prefix* (a stage output, a release version) is a folder or an object-store prefix
(``gs://``, ``s3://`` where Beam's filesystem for it is installed). Everything goes
through ``apache_beam.io.filesystems.FileSystems``, so one code path serves all of them.

- A prefix exists only once its marker ``_COMMITTED.json`` exists. The marker is written
  last and lists every file of the prefix with its size and sha256; readers ignore
  prefixes without one, and ``verify`` checks the files against it.
- One writer at a time: a writer first *claims* the prefix by writing a claim object
  with a unique name under ``_claims/`` and then listing ``_claims/``; it holds the
  prefix only if no other live claim is listed. Two writers cannot both hold it: the one
  that lists second sees the other's claim (this needs strong read-after-write and list
  consistency, which local disks, GCS and S3 give). Unique claim names mean a stale claim
  is deleted by name, never a newer one by mistake. Object-store preconditions
  (``if_generation_match=0``) would do the same on GCS, but the GCS emulator the tests
  run against ignores them, and S3 has none: listing works on all three.
- A claim is stale when its process is gone (same host, pid not alive) or it is older
  than ``stale_after_s``; stale claims and the leftovers of their crashed writers are
  removed by the next writer of that prefix or by ``sweep_uncommitted``.
- A committed prefix is never overwritten: the next writer finds the marker and gets
  ``AlreadyCommittedError``; the marker itself is created create-only (``os.link`` of a
  complete temporary file locally; on object stores an object appears whole on upload).
"""
from __future__ import annotations

from auditing.errors import InputError
import hashlib
import io
import json
import os
import random
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from apache_beam.io.filesystems import FileSystems

MARKER = "_COMMITTED.json"
CLAIMS = "_claims"
MARKER_FORMAT = "label-audit-commit/1"
STALE_AFTER_S = 6 * 3600
_CHUNK = 8 << 20


class CommitError(RuntimeError):
    """A prefix could not be written, committed or verified (one line naming it)."""


class AlreadyCommittedError(CommitError, FileExistsError):
    """The prefix is committed: committed prefixes are never overwritten."""


class PrefixBusyError(CommitError):
    """Another live writer holds the prefix."""


class NotCommittedError(CommitError, FileNotFoundError):
    """The prefix has no commit marker."""


class VerifyError(CommitError, InputError):
    """A file of a committed prefix differs from its marker (missing, resized, altered)."""


# ------------------------------------------------------------------ path helpers

def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` paths (object stores), False for local paths."""
    return "://" in str(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    return FileSystems.join(str(base), *parts) if parts else str(base)


def exists(path: str | os.PathLike) -> bool:
    return FileSystems.exists(str(path))


def open_read(path: str | os.PathLike):
    return FileSystems.open(str(path), compression_type="uncompressed")


def open_write(path: str | os.PathLike):
    """A binary stream; parent folders are made locally, objects appear whole on close."""
    return FileSystems.create(str(path), compression_type="uncompressed")


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_read(path) as f:
        return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with open_write(path) as f:
        f.write(data)


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_bytes(path))


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_parquet(path: str | os.PathLike, **kwargs):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(path)), **kwargs)


def write_parquet(frame, path: str | os.PathLike, **kwargs) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, **kwargs)
    write_bytes(path, buffer.getvalue())


def list_files(prefix: str | os.PathLike) -> dict[str, int]:
    """Every file below ``prefix`` (recursively), as relative path -> size."""
    prefix = str(prefix).rstrip("/")
    result = FileSystems.match([join(prefix, "**")])[0]
    start = len(prefix) + 1
    return {m.path[start:].replace(os.sep, "/"): m.size_in_bytes for m in result.metadata_list}


def delete_prefix(prefix: str | os.PathLike) -> None:
    """Delete ``prefix`` and everything below it (nothing if it does not exist)."""
    prefix = str(prefix).rstrip("/")
    if not is_uri(prefix):
        if os.path.lexists(prefix):
            FileSystems.delete([prefix])  # recursive for folders
        return
    delete_files([join(prefix, rel) for rel in list_files(prefix)])


def delete_files(paths: list[str]) -> None:
    """Delete ``paths``; one that is already gone (another writer removed it) is fine."""
    for start in range(0, len(paths), 100):
        batch = paths[start:start + 100]
        try:
            FileSystems.delete(batch)
        except OSError:
            still_there = [p for p in batch if exists(p)]
            if still_there:
                FileSystems.delete(still_there)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open_read(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _map_files(fn, paths: list[str]) -> list:
    # Object-store reads are latency-bound: a few in flight hide the round trips.
    if len(paths) < 2:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(fn, paths))


# ------------------------------------------------------------------ readers

def is_committed(uri: str | os.PathLike) -> bool:
    return exists(join(uri, MARKER))


def read_marker(uri: str | os.PathLike) -> dict[str, Any]:
    """The commit marker of ``uri``: ``{"format", "files": {path: {"size", "sha256"}}, ...}``."""
    path = join(uri, MARKER)
    if not exists(path):
        raise NotCommittedError(f"{uri}: not committed (no {MARKER}); an unfinished or crashed write is ignored")
    marker = json.loads(read_bytes(path))
    if marker.get("format") != MARKER_FORMAT:
        raise CommitError(f"{path}: unknown marker format {marker.get('format')!r}")
    return marker


def data_files(listing: dict[str, int]) -> dict[str, int]:
    return {rel: size for rel, size in listing.items()
            if rel != MARKER and not rel.startswith(CLAIMS + "/")}


def verify(uri: str | os.PathLike) -> dict[str, Any]:
    """Check every file of committed ``uri`` against its marker; returns the marker.

    Raises ``VerifyError`` naming the first file that is missing, has another size or
    another sha256, or is not in the marker."""
    marker = read_marker(uri)
    expected = marker["files"]
    present = data_files(list_files(uri))
    for rel in sorted(expected):
        if rel not in present:
            raise VerifyError(f"{join(uri, rel)}: listed in {MARKER} but missing")
        if present[rel] != expected[rel]["size"]:
            raise VerifyError(f"{join(uri, rel)}: {present[rel]} bytes, {MARKER} says {expected[rel]['size']}")
    extra = sorted(set(present) - set(expected))
    if extra:
        raise VerifyError(f"{join(uri, extra[0])}: not listed in {MARKER} (added after the commit)")
    names = sorted(expected)
    for rel, digest in zip(names, _map_files(sha256_of, [join(uri, rel) for rel in names])):
        if digest != expected[rel]["sha256"]:
            raise VerifyError(f"{join(uri, rel)}: sha256 {digest} differs from {MARKER} ({expected[rel]['sha256']})")
    return marker


def _children(parent: str) -> set[str]:
    return {rel.split("/", 1)[0] for rel in list_files(parent) if "/" in rel}


def committed_children(parent: str | os.PathLike) -> list[str]:
    """Names of the committed prefixes directly below ``parent`` (sorted by name)."""
    parent = str(parent).rstrip("/")
    return sorted(name for name in _children(parent) if is_committed(join(parent, name)))


# ------------------------------------------------------------------ claims

def _write_whole(path: str, data: bytes) -> None:
    """A file that readers see whole or not at all: locally written beside it and renamed
    (its temporary name does not end in .json, so listings of claims skip it); an
    object store shows an object only once its upload is complete."""
    if is_uri(path):
        write_bytes(path, data)
        return
    temporary = f"{path}.{uuid.uuid4().hex}.part"
    write_bytes(temporary, data)
    os.replace(temporary, path)


def _claim_is_stale(claim: dict[str, Any], stale_after_s: float) -> bool:
    if time.time() - claim.get("started", 0) > stale_after_s:
        return True
    if claim.get("host") == socket.gethostname():
        try:
            os.kill(int(claim["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
    return False


def _live_claims(uri: str, stale_after_s: float, ignore: str = "") -> list[dict[str, Any]]:
    """Claims on ``uri`` that are not stale (stale ones are deleted on the way)."""
    live = []
    for rel in sorted(list_files(join(uri, CLAIMS))):
        path = join(uri, CLAIMS, rel)
        if rel == ignore or not rel.endswith(".json"):
            continue
        try:
            claim = json.loads(read_bytes(path))
        except Exception:  # noqa: BLE001 (each store has its own not-found error)
            if not exists(path):
                continue  # withdrawn meanwhile
            # Claims appear whole (an object on upload, a local file by rename): one that
            # cannot be read is the torn write of a killed writer, so it holds nothing.
            claim = {"started": 0, "host": "", "pid": -1, "attempt": rel}
        if _claim_is_stale(claim, stale_after_s):
            delete_files([path])
        else:
            live.append(claim)
    return live


def sweep_uncommitted(parent: str | os.PathLike, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the prefixes directly below ``parent`` that have no marker and no live
    writer (leftovers of crashed runs). Returns the names removed."""
    parent = str(parent).rstrip("/")
    if not exists(parent) and not list_files(parent):
        return []
    removed = []
    for name in sorted(_children(parent)):
        uri = join(parent, name)
        if is_committed(uri):
            continue
        if not _live_claims(uri, stale_after_s):
            delete_prefix(uri)
            removed.append(name)
    return removed


# ------------------------------------------------------------------ writer

class PrefixWriter:
    """Write the files of one prefix, then ``commit()``; a context manager.

    ``with PrefixWriter(uri) as w: w.write_bytes("a.bin", data); ...; w.commit()``.
    Entering claims the prefix (``AlreadyCommittedError`` if it is committed,
    ``PrefixBusyError`` if a live writer holds it) and removes a crashed writer's
    leftovers; leaving without ``commit()`` (an exception) removes what was written.
    Files may also be written by other processes (Beam workers) under ``path(rel)``
    while the claim is held; ``commit()`` lists and hashes whatever is there.
    """

    def __init__(self, uri: str | os.PathLike, stale_after_s: float = STALE_AFTER_S, claim_tries: int = 6):
        self.uri = str(uri).rstrip("/")
        self.stale_after_s = stale_after_s
        self.claim_tries = claim_tries
        self.attempt = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        self._claim_rel = f"{self.attempt}.json"
        self._held = False
        self.marker: dict[str, Any] | None = None

    # -- claim
    def __enter__(self) -> "PrefixWriter":
        self.claim()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._held and self.marker is None:
            self.abort()

    def claim(self) -> None:
        claim = {"attempt": self.attempt, "host": socket.gethostname(), "pid": os.getpid(),
                 "started": time.time()}
        others: list[dict[str, Any]] = []
        for attempt in range(self.claim_tries):
            if is_committed(self.uri):
                raise AlreadyCommittedError(f"{self.uri} is committed: committed outputs are never overwritten")
            _write_whole(join(self.uri, CLAIMS, self._claim_rel), (json.dumps(claim) + "\n").encode())
            others = _live_claims(self.uri, self.stale_after_s, ignore=self._claim_rel)
            if not others:
                # A writer that committed and dropped its claim before our listing
                # left its marker, written before: look again before touching files.
                if is_committed(self.uri):
                    self._drop_claim()
                    raise AlreadyCommittedError(f"{self.uri} is committed: committed outputs are never overwritten")
                self._held = True
                self._remove_leftovers()
                return
            self._drop_claim()
            # Two writers that listed each other both back off; random waits break the tie.
            time.sleep(random.uniform(0.05, 0.2) * 2 ** attempt)
        if is_committed(self.uri):
            raise AlreadyCommittedError(f"{self.uri} is committed: committed outputs are never overwritten")
        other = others[0]
        raise PrefixBusyError(
            f"{self.uri} is being written by attempt {other.get('attempt')} (host {other.get('host')}, "
            f"pid {other.get('pid')}, started {time.ctime(other.get('started', 0))}); if that run died, "
            f"its claim expires after {self.stale_after_s:.0f} s")

    def _drop_claim(self) -> None:
        delete_files([join(self.uri, CLAIMS, self._claim_rel)])

    def _remove_leftovers(self) -> None:
        delete_files([join(self.uri, rel) for rel in data_files(list_files(self.uri))])

    def _check_held(self) -> None:
        if not self._held:
            raise CommitError(f"{self.uri}: not claimed (use PrefixWriter as a context manager)")

    # -- files
    def path(self, rel: str) -> str:
        """Where file ``rel`` of this prefix goes (for writers in other processes)."""
        if rel == MARKER or rel.split("/", 1)[0] == CLAIMS:
            raise ValueError(f"{rel}: reserved name in a committed prefix")
        return join(self.uri, rel)

    def open(self, rel: str):
        self._check_held()
        return open_write(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._check_held()
        write_bytes(self.path(rel), data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, data: Any) -> None:
        self.write_text(rel, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def write_parquet(self, rel: str, frame, **kwargs) -> None:
        self._check_held()
        write_parquet(frame, self.path(rel), **kwargs)

    # -- commit
    def commit(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Hash every file written, then write the marker (last). Returns the marker."""
        self._check_held()
        if not exists(join(self.uri, CLAIMS, self._claim_rel)):
            raise CommitError(f"{self.uri}: this writer's claim is gone (judged stale by another run?); "
                              "not committing")
        listing = data_files(list_files(self.uri))
        names = sorted(listing)
        digests = _map_files(sha256_of, [join(self.uri, rel) for rel in names])
        # Nothing run-specific (no attempt id, no time): the same files give the same marker.
        marker = {"format": MARKER_FORMAT, **(extra or {}),
                  "files": {rel: {"size": listing[rel], "sha256": d} for rel, d in zip(names, digests)}}
        data = (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode()
        _create_only(join(self.uri, MARKER), data, staging=join(self.uri, CLAIMS, f"{self.attempt}.marker"))
        delete_prefix(join(self.uri, CLAIMS))
        self.marker = marker
        self._held = False
        return marker

    def abort(self) -> None:
        """Remove everything this writer wrote, and its claim."""
        if self._held:
            self._remove_leftovers()
            self._drop_claim()
            self._held = False


def _create_only(path: str, data: bytes, staging: str) -> None:
    """Write ``path`` whole, failing if it exists."""
    if is_uri(path):
        if exists(path):
            raise AlreadyCommittedError(f"{path} exists: committed outputs are never overwritten")
        write_bytes(path, data)  # only the claim holder gets here; uploads appear whole
        return
    write_bytes(staging, data)
    try:
        os.link(staging, path)  # create-only and atomic: readers never see half a marker
    except FileExistsError as e:
        raise AlreadyCommittedError(f"{path} exists: committed outputs are never overwritten") from e
    finally:
        os.remove(staging)

