"""What changed between two releases' label sets (machine-readable, for re-audits)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def diff_label_sets(old: Mapping[str, frozenset[int]], new: Mapping[str, frozenset[int]],
                    old_version: str, new_version: str, max_listed: int = 10_000) -> dict[str, Any]:
    """Images whose label set changed, labels added/removed, and count changes.

    Images present in only one release are listed as added/removed images.
    ``changed`` lists at most ``max_listed`` images (sorted by file name); the counts
    are always complete.
    """
    changed = []
    added_labels = removed_labels = 0
    for file_name in sorted(old.keys() & new.keys()):
        before, after = old[file_name], new[file_name]
        if before != after:
            plus, minus = sorted(after - before), sorted(before - after)
            added_labels += len(plus)
            removed_labels += len(minus)
            changed.append({"file_name": file_name, "added": plus, "removed": minus,
                            "before": sorted(before), "after": sorted(after)})

    def counts(sets: Mapping[str, frozenset[int]]) -> dict[str, int]:
        sizes = [len(s) for s in sets.values()]
        return {"images": len(sizes), "labels": sum(sizes), "empty_sets": sizes.count(0),
                "multi_label_images": sum(1 for n in sizes if n > 1)}

    return {
        "from_version": old_version,
        "to_version": new_version,
        "images_changed": len(changed),
        "labels_added": added_labels,
        "labels_removed": removed_labels,
        "images_added": sorted(new.keys() - old.keys()),
        "images_removed": sorted(old.keys() - new.keys()),
        "counts_before": counts(old),
        "counts_after": counts(new),
        "changed": changed[:max_listed],
        "changed_truncated": len(changed) > max_listed,
    }


VERSION_CHANGES = ("major", "minor", "patch")


def version_key(version: str) -> tuple[int, int, int]:
    """``"1.10.0"`` -> ``(1, 10, 0)``, for sorting versions numerically."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"{version!r}: a release version is MAJOR.MINOR.PATCH")
    major, minor, patch = (int(p) for p in parts)
    return major, minor, patch


def next_version(previous: str, change: str) -> str:
    """The version after ``previous`` for a ``change``, with TFDS's semantics:

    - ``major``: existing data changed (a re-audit that changes any image's label set);
    - ``minor``: features added to unchanged records (new fields, same labels);
    - ``patch``: the same records re-serialised (format, metadata, documentation).
    """
    major, minor, patch = version_key(previous)
    if change == "major":
        return f"{major + 1}.0.0"
    if change == "minor":
        return f"{major}.{minor + 1}.0"
    if change == "patch":
        return f"{major}.{minor}.{patch + 1}"
    raise ValueError(f"{change!r}: a version change is one of {', '.join(VERSION_CHANGES)}")


def next_minor_version(version: str) -> str:
    return next_version(version, "minor")
