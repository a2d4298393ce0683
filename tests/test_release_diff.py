import pytest

from auditing.release_diff import diff_label_sets
from auditing.versions import next_version, version_key


def test_diff_lists_changed_images_and_counts():
    old = {"a": frozenset({1}), "b": frozenset({2, 3}), "c": frozenset()}
    new = {"a": frozenset({1}), "b": frozenset({2, 4}), "c": frozenset({5}), "d": frozenset({6})}
    diff = diff_label_sets(old, new, "1.0.0", "1.1.0")
    assert diff["images_changed"] == 2
    assert diff["labels_added"] == 2 and diff["labels_removed"] == 1
    assert diff["changed"][0] == {"file_name": "b", "added": [4], "removed": [3],
                                  "before": [2, 3], "after": [2, 4]}
    assert diff["images_added"] == ["d"] and diff["images_removed"] == []
    assert diff["counts_before"] == {"images": 3, "labels": 3, "empty_sets": 1, "multi_label_images": 1}
    assert diff["counts_after"]["empty_sets"] == 0


def test_identical_sets_have_an_empty_diff():
    sets = {"a": frozenset({1, 2})}
    diff = diff_label_sets(sets, dict(sets), "1.0.0", "1.1.0")
    assert diff["images_changed"] == 0 and diff["changed"] == []


def test_next_minor_version():
    assert next_version("1.0.0", "minor") == "1.1.0"
    assert next_version("2.9.3", "minor") == "2.10.0"


def test_next_version_follows_tfds_semantics():
    assert next_version("1.2.3", "major") == "2.0.0"  # a label set changed
    assert next_version("1.2.3", "minor") == "1.3.0"  # features added, records unchanged
    assert next_version("1.2.3", "patch") == "1.2.4"  # same records re-serialised
    assert sorted(["1.10.0", "1.9.0", "10.0.0", "2.0.0"], key=version_key) == ["1.9.0", "1.10.0", "2.0.0", "10.0.0"]
    with pytest.raises(ValueError, match="one of major, minor, patch"):
        next_version("1.0.0", "huge")
    with pytest.raises(ValueError, match="MAJOR.MINOR.PATCH"):
        version_key("1.0")
