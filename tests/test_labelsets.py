"""Label files and ImageNet class metadata, on the real files."""
from __future__ import annotations

import numpy as np
import pytest

from auditing import imagenet, labelsets


def test_label_tsv_with_header_extra_columns_and_wnids(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text("file_name\tlabel\twnid\na.JPEG\t65\tn01751748\nb.JPEG\tn01440764\n")
    frame = labelsets.read_label_tsv(path)
    assert frame.to_dict("list") == {"file_name": ["a.JPEG", "b.JPEG"], "label": [65, 0]}


@pytest.mark.parametrize("text, expected", [
    ("a.JPEG\t1000\n", r"row 1, field 'label': 1000 is outside"),
    ("a.JPEG\t1\nb.JPEG\tcat\n", r"row 2, field 'label': 'cat' is neither"),
    ("a.JPEG\n", r"row 1: expected file_name<TAB>label"),
    ("a.JPEG\t1\na.JPEG\t2\n", r"'a.JPEG' appears on more than one row"),
])
def test_label_tsv_errors_name_row_and_field(tmp_path, text, expected):
    path = tmp_path / "labels.tsv"
    path.write_text(text)
    with pytest.raises(labelsets.LabelFileError, match=expected):
        labelsets.read_label_tsv(path)


def test_gold_sets_from_tsv_and_json(tmp_path):
    tsv = tmp_path / "gold.tsv"
    tsv.write_text("a.JPEG\t1\na.JPEG\t2\nb.JPEG\t3\n")
    js = tmp_path / "gold.json"
    js.write_text('{"a.JPEG": [1, 2], "b.JPEG": ["n01440764"]}')
    assert labelsets.read_gold_label_sets(tsv) == {"a.JPEG": {1, 2}, "b.JPEG": {3}}
    assert labelsets.read_gold_label_sets(js) == {"a.JPEG": {1, 2}, "b.JPEG": {0}}


def test_real_json_counts_and_order(shared_data):
    sets = labelsets.read_real_json(shared_data / "reassessed_imagenet" / "real.json")
    assert len(sets) == 50_000
    assert sum(1 for s in sets.values() if not s) == 3163
    assert sets["ILSVRC2012_val_00000002.JPEG"] == {970, 795}


def test_wheel_labels_agree_with_the_derived_tsv(shared_data):
    wheel = labelsets.original_val_labels()
    tsv = labelsets.read_label_tsv(shared_data / "derived" / "imagenet_val_labels_by_filename.tsv")
    assert (wheel["file_name"] == tsv["file_name"]).all()
    assert (wheel["label"] == tsv["label"]).all()


def test_classes_names_and_subsets_from_wordnet(shared_data):
    classes = imagenet.load_classes()
    assert classes.names[0] == "tench" and classes.wnids[0] == "n01440764"
    assert classes.index_of("n03180011") == 527 and classes.names[527] == "desktop computer"
    subsets = imagenet.class_subsets()
    assert {k: len(v) for k, v in subsets.items()} == {"dogs": 118, "organisms": 410, "objects": 590}
    assert np.intersect1d(subsets["organisms"], subsets["objects"]).size == 0
    assert set(subsets["dogs"]) <= set(subsets["organisms"])
    hierarchy = imagenet.load_hierarchy()
    # A tabby and a tiger cat meet at "domestic cat".
    assert hierarchy.name(hierarchy.lowest_common_ancestor(classes.wnids[281], classes.wnids[282])) == "domestic cat"
