"""Release round-trip through tfds, immutability, and atomicity."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds

from pipelines import release
from pipelines.beam_options import make_options


def _table() -> pd.DataFrame:
    scores = pd.DataFrame({"file_name": ["b.JPEG", "b.JPEG", "c.JPEG"],
                           "label": [7, 3, 5], "score": [0.95, 0.2, 0.1]})
    sets = {"a.JPEG": frozenset({1}), "b.JPEG": frozenset({7}), "c.JPEG": frozenset()}
    return release.release_table(["a.JPEG", "b.JPEG", "c.JPEG"], np.array([1, 3, 5]), sets, scores)


def test_release_table_orders_scores_and_keeps_unrated_images():
    table = _table().set_index("file_name")
    assert table.loc["b.JPEG", "score_labels"] == [3, 7]
    assert table.loc["b.JPEG", "scores"] == pytest.approx([0.2, 0.95])
    assert table.loc["a.JPEG", "score_labels"] == []
    assert table.loc["c.JPEG", "real_label"] == []


def test_release_round_trips_through_tfds_and_is_never_overwritten(tmp_path):
    kwargs = dict(release_notes={"1.0.0": "First audit."}, manifest={"inputs": {}},
                  counts={"images": 3}, options=make_options("direct"))
    path = release.write_release(tmp_path, "tiny_audit", "1.0.0", _table(), **kwargs)
    assert path == tmp_path / "tfds" / "tiny_audit" / "1.0.0"
    source = tfds.builder_from_directory(str(path)).as_data_source(split="validation")
    assert len(source) == 3
    by_name = {ex["file_name"].decode(): ex for ex in source}
    assert list(by_name["b.JPEG"]["real_label"]) == [7]
    assert list(by_name["b.JPEG"]["label_scores"]["label"]) == [3, 7]
    assert int(by_name["c.JPEG"]["original_label"]) == 5
    builder = tfds.builder_from_directory(str(path))
    assert builder.info.features["original_label"].names[0] == "n01440764"
    assert json.loads((path / "counts.json").read_text()) == {"images": 3}
    assert "First audit." in (path / "RELEASE_NOTES.md").read_text()
    assert release.read_release(path)["real_label"].tolist() == [[1], [7], []]
    assert release.released_versions(tmp_path, "tiny_audit") == ["1.0.0"]
    with pytest.raises(release.ReleaseExistsError, match="never overwritten"):
        release.write_release(tmp_path, "tiny_audit", "1.0.0", _table(), **kwargs)
    # No staging leftovers beside the version.
    assert sorted(p.name for p in path.parent.iterdir()) == ["1.0.0"]


def test_release_with_images_stores_rgb_photos(tmp_path):
    from models.sample_photos import photo_path

    table = _table()
    # A grayscale PNG, an RGBA PNG and an RGB JPEG: all come back as RGB uint8 arrays.
    table["image_path"] = [str(photo_path(n)) for n in ("camera", "horse", "china")]
    path = release.write_release(tmp_path, "photo_audit", "1.0.0", table, release_notes={"1.0.0": "x"},
                                 manifest={}, counts={}, options=make_options("direct"))
    source = tfds.builder_from_directory(str(path)).as_data_source(split="validation")
    images = {ex["file_name"].decode(): ex["image"] for ex in source}
    assert images["a.JPEG"].shape == (512, 512, 3) and images["a.JPEG"].dtype == np.uint8
    assert images["b.JPEG"].shape[2] == 3 and images["c.JPEG"].shape == (427, 640, 3)


def test_fast_record_serialization_gives_tfds_bytes():
    """serialize_row is byte for byte TFDS's encode_example + serialization, empty lists included."""
    from tensorflow_datasets.core import example_serializer

    features = release.release_features([f"c{i}" for i in range(1000)])
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    rows = _table().to_dict(orient="records") + [
        {"file_name": "ü.JPEG", "original_label": 999, "real_label": [0, 999], "score_labels": [0, 5, 999],
         "scores": [1 / 3, 0.8000000000000002, 1e-300]}]
    for row in rows:
        example = {"file_name": row["file_name"], "original_label": row["original_label"],
                   "real_label": row["real_label"],
                   "label_scores": {"label": row["score_labels"], "score": row["scores"]}}
        generic = serializer.get_tf_example(features.encode_example(example)).SerializeToString(deterministic=True)
        assert bytes(release.serialize_row(row, 1000)) == generic
    with pytest.raises(ValueError, match="ü.JPEG: label 999 outside"):
        release.serialize_row(rows[-1], 999)
