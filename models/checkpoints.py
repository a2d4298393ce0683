"""Flax checkpoints: the safe on-disk format, the conversion cache, and loading users' checkpoints.

The project's format is one msgpack file written by ``flax.serialization``
(arrays and strings only, nothing executable):
``{"format": FORMAT, "metadata": {str: str}, "variables": {"params": ..., "batch_stats": ...}}``.

Converted third-party weights are cached as ``<cache>/checkpoints/<sha256 of the
source file>.msgpack`` (``<cache>`` = ``$LABEL_AUDIT_CACHE`` or ``~/.cache/label-audit``),
so a source is converted once per machine and the key records what it came from.

Users' own checkpoints are read from a msgpack file (this format, or any
``flax.serialization.to_bytes`` of a variables dict / a train state holding
``params`` and ``batch_stats``) or from an Orbax checkpoint directory, and are
checked leaf by leaf against the model: ``CheckpointMismatchError`` lists the
missing, unexpected and wrongly shaped parameters.
"""
from __future__ import annotations

from auditing.errors import InputError
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
from flax import traverse_util

from auditing import atomic
from auditing import sources

FORMAT = "label-audit/flax-variables/v1"
# Leaves listed per category in an error message before "... and N more".
_MAX_LISTED = 25

Variables = dict[str, Any]


class CheckpointError(InputError):
    """A checkpoint file cannot be read as Flax variables."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's parameters do not match the model's (names or shapes)."""


def checkpoint_cache_dir() -> Path:
    return sources.cache_dir() / "checkpoints"


def _to_numpy_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def save_checkpoint(path: str | os.PathLike, variables: Variables,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``variables`` (e.g. ``{"params": ..., "batch_stats": ...}``) in the safe msgpack format."""
    path = Path(path)
    payload = {"format": FORMAT, "metadata": dict(metadata or {}), "variables": _to_numpy_tree(variables)}
    atomic.write_bytes(path, flax.serialization.msgpack_serialize(payload))
    return path


def _is_orbax_dir(path: Path) -> bool:
    return (path / "_METADATA").is_file() or (path / "_CHECKPOINT_METADATA").is_file()


def _read_orbax(path: Path) -> Any:
    # A CheckpointManager step folder holds the item in a subfolder ("default", "state"...).
    if not _is_orbax_dir(path):
        items = [p for p in path.iterdir() if p.is_dir() and _is_orbax_dir(p)]
        if len(items) != 1:
            raise CheckpointError(f"{path}: a directory, but not an Orbax checkpoint (no _METADATA, "
                                  f"and {len(items)} checkpoint subfolders)")
        path = items[0]
    try:
        import orbax.checkpoint as ocp  # heavy import, only for Orbax users
    except ModuleNotFoundError:
        raise CheckpointError(f"{path} is an Orbax checkpoint: pip install orbax-checkpoint") from None

    return ocp.StandardCheckpointer().restore(path.resolve())


def read_checkpoint(path: str | os.PathLike) -> tuple[Any, dict[str, str]]:
    """The raw tree stored at ``path`` (msgpack file or Orbax directory) and its metadata."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_orbax(path), {}
    try:
        raw = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise CheckpointError(f"{path}: not a Flax msgpack checkpoint ({e!r})") from e
    if isinstance(raw, Mapping) and raw.get("format") == FORMAT:
        return raw["variables"], dict(raw.get("metadata", {}))
    return raw, {}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_checkpoint(path)[1]


def _select_collections(raw: Any, expected: Mapping[str, Any]) -> Any:
    """The variable collections inside a raw tree: a variables dict, a train state, or bare params."""
    if not isinstance(raw, Mapping):
        return raw
    if "params" in raw:
        return {name: raw[name] for name in raw if name in expected or name == "params"}
    if set(expected) == {"params"}:
        return {"params": raw}
    return raw


def _describe(flat: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in flat.items()}


def _listing(title: str, lines: list[str]) -> str:
    extra = f"\n    ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return f"  {title} ({len(lines)}):\n" + "\n".join(f"    {x}" for x in lines[:_MAX_LISTED]) + extra


def match_variables(loaded: Any, expected: Mapping[str, Any], source: str) -> Variables:
    """``loaded`` checked against ``expected`` (a tree of arrays or ``jax.ShapeDtypeStruct``).

    Returns the loaded tree restricted to the expected structure, each leaf cast to the
    expected dtype. Raises ``CheckpointMismatchError`` listing missing, unexpected and
    wrongly shaped parameters.
    """
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{source}: expected a dict of parameters, got {type(loaded).__name__}")
    want = traverse_util.flatten_dict(expected, sep="/")
    have = traverse_util.flatten_dict(_select_collections(loaded, expected), sep="/")
    want_shapes, have_shapes = _describe(want), _describe(have)
    missing = sorted(k for k in want if k not in have)
    unexpected = sorted(k for k in have if k not in want)
    wrong = sorted(f"{k}: checkpoint {have_shapes[k]} vs model {want_shapes[k]}"
                   for k in want if k in have and have_shapes[k] != want_shapes[k])
    if missing or unexpected or wrong:
        parts = [f"{source}: the checkpoint does not match the model"]
        for title, lines in (("missing from the checkpoint", [f"{k} {want_shapes[k]}" for k in missing]),
                             ("unexpected in the checkpoint", [f"{k} {have_shapes[k]}" for k in unexpected]),
                             ("wrong shape", wrong)):
            if lines:
                parts.append(_listing(title, lines))
        raise CheckpointMismatchError("\n".join(parts))
    cast = {k: np.asarray(have[k]).astype(want[k].dtype, copy=False) for k in want}
    return traverse_util.unflatten_dict(cast, sep="/")


def load_checkpoint(path: str | os.PathLike, expected: Mapping[str, Any], source: str | None = None) -> Variables:
    """Variables from a msgpack file or Orbax directory, checked against ``expected``.

    ``source`` names the checkpoint in errors (default: ``path``).
    """
    raw, _ = read_checkpoint(path)
    return match_variables(raw, expected, source=source or os.fspath(path))


def sha256_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory's sorted (relative name, content) pairs."""
    path = Path(path)
    if path.is_file():
        return sources.sha256_file(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode() + b"\0")
        digest.update(bytes.fromhex(sources.sha256_file(child)))
    return digest.hexdigest()


def cached_conversion(source_path: str | os.PathLike, convert: Callable[[Path], Variables],
                      converter: str, source_sha256: str | None = None) -> Path:
    """The cached safe checkpoint converted from ``source_path``, converting it on first use.

    ``converter`` names the conversion (e.g. "efficientnet_lite/v1"); a cached file made
    by another converter version is converted again.
    """
    source_path = Path(source_path)
    sha = source_sha256 or sources.sha256_file(source_path)
    target = checkpoint_cache_dir() / f"{sha}.msgpack"
    if target.is_file():
        try:
            if read_metadata(target).get("converter") == converter:
                return target
        except CheckpointError:
            pass  # a corrupt cache entry is simply rebuilt
    try:
        variables = convert(source_path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any conversion failure: name the file
        if type(e).__name__ == "UnsafeCheckpointError":
            raise
        raise CheckpointError(f"{source_path}: cannot convert: {e}") from e
    return save_checkpoint(target, variables, metadata={
        "converter": converter, "source": source_path.name, "source_sha256": sha})
