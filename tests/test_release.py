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
         "scores": [1 / 3, 0.8000000000000002, 1e-300]},
        # Lists past 127 bytes: multi-byte lengths; labels from 128 on: two-byte varints.
        {"file_name": "x" * 200 + ".JPEG", "original_label": 128, "real_label": list(range(120, 180)),
         "score_labels": list(range(0, 1000, 20)), "scores": [i / 7 for i in range(50)]},
        {"file_name": "long.JPEG", "original_label": 0, "real_label": [],  # past the lengths' lookup table
         "score_labels": [i % 1000 for i in range(2000)], "scores": [i / 3 for i in range(2000)]}]
    for row in rows:
        example = {"file_name": row["file_name"], "original_label": row["original_label"],
                   "real_label": row["real_label"],
                   "label_scores": {"label": row["score_labels"], "score": row["scores"]}}
        generic = serializer.get_tf_example(features.encode_example(example)).SerializeToString(deterministic=True)
        assert bytes(release.serialize_row(row, 1000)) == generic
    with pytest.raises(ValueError, match="ü.JPEG: label 999 outside"):
        release.serialize_row(rows[-3], 999)
    # The awaiting-votes flag, for audits with proposals nobody has answered yet.
    flagged = release.release_features([f"c{i}" for i in range(1000)], with_awaiting=True)
    serializer = example_serializer.ExampleSerializer(flagged.get_serialized_info())
    for row, flag in zip(rows, [True, False] * len(rows)):
        example = {"file_name": row["file_name"], "original_label": row["original_label"],
                   "real_label": row["real_label"], "awaiting_votes": flag,
                   "label_scores": {"label": row["score_labels"], "score": row["scores"]}}
        generic = serializer.get_tf_example(flagged.encode_example(example)).SerializeToString(deterministic=True)
        assert bytes(release.serialize_row(row | {"awaiting_votes": flag}, 1000)) == generic


def test_record_serializer_reused_for_many_records_gives_each_records_own_bytes():
    """One RecordSerializer refills one message per record: nothing of a longer record
    before (or of the awaiting-votes flag of another row) stays in the next one."""
    rows = [
        {"file_name": "long.JPEG", "original_label": 7, "real_label": list(range(200, 260)),
         "score_labels": list(range(0, 1000, 9)), "scores": [i / 7 for i in range(112)]},
        {"file_name": "short.JPEG", "original_label": 3, "real_label": [3], "score_labels": [3], "scores": [0.5]},
        {"file_name": "empty.JPEG", "original_label": 0, "real_label": [], "score_labels": [], "scores": []},
        {"file_name": "flagged.JPEG", "original_label": 1, "real_label": [1, 2], "score_labels": [1, 2],
         "scores": [1.0, 0.25], "awaiting_votes": True},
        {"file_name": "after.JPEG", "original_label": 2, "real_label": [], "score_labels": [2], "scores": [0.0]}]
    serialize = release.RecordSerializer()
    for row in rows + rows[::-1]:
        reused = serialize(row["file_name"], row["original_label"], row["real_label"], row["score_labels"],
                           row["scores"], row.get("awaiting_votes"), 1000)
        assert reused == release.serialize_row(row, 1000)
    with pytest.raises(ValueError, match="bad.JPEG: label 1000 outside"):
        serialize("bad.JPEG", 1000, [], [], [], None, 1000)
    row = rows[1]
    assert serialize(row["file_name"], 3, [3], [3], [0.5], None, 1000) == release.serialize_row(row, 1000)


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


def _audit_artifacts(root, scores: pd.DataFrame, shards: int | None):
    """A dataset and a label_sets artifact as the dataset and aggregate stages store them,
    the scores as one scores.parquet (``shards=None``) or as ``shards`` score shards
    (images by hash; every score of an image in one shard)."""
    from pipelines.stages.base import Artifact

    names = [f"im{i}.JPEG" for i in range(12)]
    (root / "dataset").mkdir(parents=True)
    (root / "label_sets" / "scores").mkdir(parents=True)
    pd.DataFrame({"file_name": names, "label": np.arange(12) * 7}).to_parquet(root / "dataset" / "labels.parquet")
    sets = {n: sorted({i % 5, (i * 3) % 11} - {4}) for i, n in enumerate(names)}
    pd.DataFrame({"file_name": names, "labels": [sets[n] for n in names]}).to_parquet(
        root / "label_sets" / "label_sets.parquet")
    pd.DataFrame({"file_name": names[::4]}).to_parquet(root / "label_sets" / "awaiting.parquet")
    if shards is None:
        scores.to_parquet(root / "label_sets" / "scores.parquet")
    else:
        shard_of = scores["file_name"].map(lambda n: sum(n.encode()) % shards)
        for s in range(shards):
            scores[shard_of == s].to_parquet(root / "label_sets" / "scores" / f"scores-{s:05d}-of-{shards:05d}.parquet")
    return {"dataset": Artifact("dataset", "d", root / "dataset"),
            "label_sets": Artifact("label_sets", "l", root / "label_sets", {"pairs_awaiting_votes": 3})}


def _scores() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    # Images 0-8 rated (some twice about a label set member), 9-11 not; "elsewhere.JPEG"
    # is rated but not in the dataset (left out of the release, as with one scores.parquet).
    names = [f"im{i}.JPEG" for i in rng.integers(0, 9, 40)] + ["elsewhere.JPEG"]
    labels = rng.integers(0, 20, len(names))
    frame = pd.DataFrame({"file_name": names, "label": labels, "score": rng.random(len(names))})
    return frame.drop_duplicates(["file_name", "label"]).sample(frac=1.0, random_state=1)


def test_score_shards_give_the_release_of_one_scores_file(tmp_path):
    """The Beam writer joins the per-image rows with score shards in its workers (the
    launcher reads no score); the records equal those written from one scores.parquet."""
    from types import SimpleNamespace

    from pipelines.stages import release as stage

    ctx = SimpleNamespace(config=SimpleNamespace(stages=SimpleNamespace(release=SimpleNamespace(include_images=False))))
    scores = _scores()
    single = _audit_artifacts(tmp_path / "single", scores, shards=None)
    sharded = _audit_artifacts(tmp_path / "sharded", scores, shards=3)
    assert stage.score_shards(single["label_sets"]) is None
    shards = stage.score_shards(sharded["label_sets"])
    assert [p.name for p in shards] == [f"scores-0000{s}-of-00003.parquet" for s in range(3)]
    table, none = stage.release_inputs(ctx, single)
    images, listed = stage.release_inputs(ctx, sharded)
    assert none is None and listed == shards
    assert "scores" in table and "scores" not in images
    assert table["awaiting_votes"].sum() == 3 and table["score_labels"].map(len).gt(0).sum() == 9
    kwargs = dict(release_notes={"1.0.0": "x"}, manifest={}, counts={}, options=make_options("direct"),
                  class_names=[f"c{i}" for i in range(100)])
    expected = release.read_release(release.write_release(tmp_path / "one", "audit", "1.0.0", table,
                                                          writer="local", **kwargs))
    assert expected["scores"].map(len).sum() == len(scores) - 1
    for writer in ("beam", "local"):
        path = release.write_release(tmp_path / writer, "audit", "1.0.0", images, writer=writer,
                                     score_shards=[str(p) for p in shards], **kwargs)
        pd.testing.assert_frame_equal(release.read_release(path), expected, check_exact=True)
    # The release stage's full table (a re-audit compares it) is the same from shards.
    pd.testing.assert_frame_equal(stage.release_table(ctx, sharded), table)
    key = stage.ReleaseStage().params(ctx, sharded)["content"]
    # A score changed in a shard changes the records the Beam workers write, and the key.
    changed = pd.read_parquet(shards[0])
    changed.loc[changed.index[0], "score"] += 1e-9
    changed.to_parquet(shards[0])
    path = release.write_release(tmp_path / "changed", "audit", "1.0.0", images, writer="beam",
                                 score_shards=[str(p) for p in shards], **kwargs)
    with pytest.raises(AssertionError):
        pd.testing.assert_frame_equal(release.read_release(path), expected, check_exact=True)
    assert stage.ReleaseStage().params(ctx, sharded)["content"] != key
    # The workers join by image: an image's scores in two shards is an error there.
    pd.concat([changed, changed.iloc[:1]]).to_parquet(shards[1])
    with pytest.raises(Exception, match="scores in 2 shards"):
        release.write_release(tmp_path / "twice", "audit", "1.0.0", images, writer="beam",
                              score_shards=[str(p) for p in shards], **kwargs)


def test_an_incomplete_set_of_score_shards_is_refused(tmp_path):
    from pipelines.stages import release as stage
    from pipelines.stages.base import StageError

    artifacts = _audit_artifacts(tmp_path, _scores(), shards=3)
    (tmp_path / "label_sets" / "scores" / "scores-00001-of-00003.parquet").unlink()
    with pytest.raises(StageError, match="not a complete set of score shards"):
        stage.score_shards(artifacts["label_sets"])


def test_score_lists_are_each_images_scores_by_label_in_row_order_for_ties():
    rng = np.random.default_rng(5)
    scores = pd.DataFrame({"file_name": [f"im{i}.JPEG" for i in rng.integers(0, 30, 400)],
                           "label": rng.integers(0, 12, 400), "score": rng.random(400)})
    ordered = scores.sort_values(["file_name", "label"], kind="stable")  # ties (a question twice): row order
    expected = {name: (group["label"].tolist(), group["score"].tolist())
                for name, group in ordered.groupby("file_name", sort=True)}
    assert release.score_lists(scores) == expected
    assert release.score_lists(release.NO_SCORES) == {}


def test_cyclic_gc_is_paused_inside_the_block_and_restored_after_it_even_on_error():
    import gc

    from pipelines.stages.base import cyclic_gc_paused

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with cyclic_gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with cyclic_gc_paused():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()
