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
    # The awaiting-votes flag, for audits with proposals nobody has answered yet.
    flagged = release.release_features([f"c{i}" for i in range(1000)], with_awaiting=True)
    serializer = example_serializer.ExampleSerializer(flagged.get_serialized_info())
    for row, flag in zip(rows, [True, False] * len(rows)):
        example = {"file_name": row["file_name"], "original_label": row["original_label"],
                   "real_label": row["real_label"], "awaiting_votes": flag,
                   "label_scores": {"label": row["score_labels"], "score": row["scores"]}}
        generic = serializer.get_tf_example(flagged.encode_example(example)).SerializeToString(deterministic=True)
        assert bytes(release.serialize_row(row | {"awaiting_votes": flag}, 1000)) == generic


def _dataset_info(path) -> dict:
    info = json.loads((path / "dataset_info.json").read_text())
    return {"splits": info["splits"], "features": json.loads((path / "features.json").read_text()),
            "version": info["version"], "fileFormat": info["fileFormat"]}


def test_local_and_beam_writers_write_the_same_release(tmp_path):
    """TFDS's in-process writer and its Beam job: the same records, metadata and bytes."""
    table = _table()
    table["awaiting_votes"] = [False, True, False]
    kwargs = dict(release_notes={"1.0.0": "First audit."}, manifest={}, counts={}, options=make_options("direct"))
    paths = {writer: release.write_release(tmp_path / writer, "tiny_audit", "1.0.0", table, writer=writer, **kwargs)
             for writer in ("local", "beam")}
    # The Beam writer ran a Beam job on the rows (its chunk files are gone again); the local one did not.
    assert not (paths["beam"] / "_rows").exists()
    local, beam = (release.read_release(paths[w]) for w in ("local", "beam"))
    pd.testing.assert_frame_equal(local, beam, check_exact=True)
    assert local["awaiting_votes"].tolist() == [False, True, False]
    assert _dataset_info(paths["local"]) == _dataset_info(paths["beam"])
    assert int(_dataset_info(paths["local"])["splits"][0]["shardLengths"][0]) == 3
    shards = sorted(p.name for p in paths["beam"].glob("*.array_record-*"))
    assert shards == sorted(p.name for p in paths["local"].glob("*.array_record-*"))
    for name in shards:
        assert (paths["local"] / name).read_bytes() == (paths["beam"] / name).read_bytes()
    # The comparison sees a score that differs in its last bit.
    nudged = table.copy()
    nudged.at[1, "scores"] = [0.2, np.nextafter(0.95, 1.0)]
    other = release.write_release(tmp_path / "nudged", "tiny_audit", "1.0.0", nudged, writer="local", **kwargs)
    with pytest.raises(AssertionError):
        pd.testing.assert_frame_equal(release.read_release(other), beam, check_exact=True)


def test_auto_writer_is_local_only_for_small_in_process_runs():
    direct, workers = make_options("direct"), make_options("direct-multiprocess", num_workers=2)
    assert release.choose_writer("auto", direct, 50_000) == "local"
    assert release.choose_writer("auto", direct, release.LOCAL_WRITER_MAX_ROWS) == "beam"
    assert release.choose_writer("auto", workers, 10) == "beam"
    assert release.choose_writer("local", workers, 10) == "local"
    assert release.choose_writer("beam", direct, 10) == "beam"
    with pytest.raises(ValueError, match="expected one of auto, beam, local"):
        release.choose_writer("spark", direct, 10)


def test_content_key_of_a_table_is_the_one_earlier_releases_recorded():
    """A release's manifest holds its content key, and a run finds an existing version by
    it: computing it faster must not change it (the keys below are those of the first
    implementation, np.concatenate of every cell)."""
    from pipelines.stages.release import table_key

    table = _table()
    assert table_key(table) == "be5d1d5b743400268e3210103d56b16bc01e1410dd17c8227949abb5f0e8fa47"
    table["awaiting_votes"] = [False, True, False]
    assert table_key(table) == "2242162d768893af78c8043aa6c638cbd76441672342d33b1c4f9250a6a06481"
    table.at[1, "scores"] = [0.2, np.nextafter(0.95, 1.0)]
    assert table_key(table) != "2242162d768893af78c8043aa6c638cbd76441672342d33b1c4f9250a6a06481"
