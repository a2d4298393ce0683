"""Release versions: semantic versions that mean data, as in TFDS.

- MAJOR: existing records changed (a label set, a score): results computed on the
  previous version may not hold on this one.
- MINOR: features were added to records that are otherwise unchanged.
- PATCH: the same records, re-serialised (metadata, notes).
"""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

MAJOR, MINOR, PATCH = "major", "minor", "patch"


def version_key(version: str) -> tuple[int, int, int]:
    """``"1.10.0"`` -> ``(1, 10, 0)``, for sorting versions numerically."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"{version!r}: a release version is MAJOR.MINOR.PATCH")
    major, minor, patch = (int(p) for p in parts)
    return major, minor, patch


def sorted_versions(versions: Iterable[str]) -> list[str]:
    """Oldest first, by number (1.10.0 after 1.9.0)."""
    return sorted(versions, key=version_key)


def next_version(version: str, change: str) -> str:
    major, minor, patch = version_key(version)
    if change == MAJOR:
        return f"{major + 1}.0.0"
    if change == MINOR:
        return f"{major}.{minor + 1}.0"
    if change == PATCH:
        return f"{major}.{minor}.{patch + 1}"
    raise ValueError(f"{change!r}: a version change is one of {MAJOR}, {MINOR}, {PATCH}")


def version_change(previous: pd.DataFrame, new: pd.DataFrame, key: str = "file_name") -> str:
    """How ``new`` differs from ``previous`` (one row per record, keyed by ``key``):
    MAJOR if a record was added, removed or changed in a column both have; MINOR if
    only columns were added; PATCH otherwise."""
    shared = [c for c in previous.columns if c in new.columns]
    if set(previous.columns) - set(new.columns):
        return MAJOR  # a feature was removed: existing data changed
    old = previous[shared].sort_values(key, ignore_index=True)
    now = new[shared].sort_values(key, ignore_index=True)
    if len(old) != len(now) or not old[key].equals(now[key]):
        return MAJOR
    for column in shared:
        if [_plain(v) for v in old[column]] != [_plain(v) for v in now[column]]:
            return MAJOR
    return MINOR if set(new.columns) - set(previous.columns) else PATCH


def _plain(value):
    """Lists and arrays compared by their values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else value
