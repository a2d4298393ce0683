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

    from auditing.labelsets import label_set_counts as counts

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
