"""Stage 2: exact global top-N per model (also shard by shard in Beam) and pooling."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from auditing import proposals as P
from auditing.predictions import PredictionsFormatError
from pipelines import propose


def brute_force_top_n(values: np.ndarray, row_images: np.ndarray, n: int) -> np.ndarray:
    """Sorted keys of the n first entries after a full sort by (value desc, image, label)."""
    num_classes = values.shape[1]
    keys = (np.asarray(row_images)[:, None] * num_classes + np.arange(num_classes)).ravel()
    order = np.lexsort((keys, -values.astype(np.float64).ravel()))
    return np.sort(keys[order[:n]])


def tied_logits(rng: np.random.Generator, rows: int, classes: int) -> np.ndarray:
    """Integer-valued logits: most entries tie with many others."""
    logits = rng.integers(-3, 4, size=(rows, classes)).astype(np.float32)
    logits[rows // 3] += 5  # one image far more confident: it gets many proposals
    return logits


@pytest.mark.parametrize("seed", range(4))
def test_top_n_exact_with_ties_in_memory_and_by_shards(seed):
    rng = np.random.default_rng(seed)
    rows, classes = int(rng.integers(20, 60)), int(rng.integers(3, 17))
    logits = tied_logits(rng, rows, classes)
    row_images = rng.permutation(rows)  # rows stored in an order other than the image order
    probs = P.softmax64(logits)
    for n in (1, rows, 3 * rows, rows * classes - 1, rows * classes + 5):
        for values in (logits, probs):
            expected = brute_force_top_n(values, row_images, n)
            whole = P.top_n_of_matrix(values, row_images, n)
            assert np.array_equal(np.sort(whole.keys), expected)
            cuts = np.sort(rng.choice(np.arange(1, rows), size=3, replace=False))
            shards = [P.top_n_of_matrix(values[a:b], row_images[a:b], n)
                      for a, b in zip([0, *cuts], [*cuts, rows])]
            merged = P.merge_top_n(shards[::-1], n)
            assert np.array_equal(np.sort(merged.keys), expected)
            assert len(merged) == min(n, rows * classes)


def test_softmax_of_a_shard_equals_the_whole_bit_for_bit():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(101, 1000)) * 4).astype(np.float32)
    whole = P.softmax64(logits)
    for a, b in [(0, 1), (1, 8), (8, 57), (57, 101)]:
        assert np.array_equal(P.softmax64(logits[a:b]), whole[a:b])


def test_global_threshold_gives_some_images_many_pairs_and_others_none():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 10)).astype(np.float32)
    logits[7] += 10
    sel = P.select_model_proposals("m", logits, n=30)
    per_image = np.bincount(sel.logits // 10, minlength=30)
    assert per_image[7] == 10 and per_image.sum() == 30 and (per_image == 0).any()


def test_pool_rules_on_a_hand_built_case():
    # 3 images x 4 classes, keys = image * 4 + label.
    def model(name, logits_keys, probs_keys, top1):
        return P.ModelSelections(name, 4, np.array(logits_keys), np.array(probs_keys), np.array(top1))

    a = model("a", [1, 5, 9], [1, 6, 10], [1, 0, 0])
    b = model("b", [1, 6, 11], [2, 7, 11], [0, 2, 3])
    original = np.array([0, 0, 3])
    pool = P.pool_proposals([a, b], original, ["x", "y", "z"])
    frame = pool.to_frame()
    got = {(r.file_name, r.label): (r.count, list(r.sources)) for r in frame.itertuples()}
    assert got == {
        ("x", 0): (0, ["b:top1", "original"]),  # original label, also b's top-1
        ("x", 1): (3, ["a:logits", "a:probs", "a:top1", "b:logits"]),
        ("y", 0): (0, ["a:top1", "original"]),
        ("y", 2): (2, ["a:probs", "b:logits", "b:top1"]),
        ("z", 0): (0, ["a:top1"]),  # a top-1 is added even though no top-N selected it
        ("z", 3): (2, ["b:logits", "b:probs", "b:top1", "original"]),
    }
    # Pairs selected once (keys 2, 5, 7, 9, 10) are dropped; one model alone keeps a pair it
    # selects by both criteria.
    only_a = P.pool_proposals([a, b], original, ["x", "y", "z"], models=["a"])
    assert set(zip(only_a.image.tolist(), only_a.label.tolist())) == {(0, 0), (0, 1), (1, 0), (2, 0),
                                                                     (2, 3)}
    assert list(frame.columns) == ["file_name", "label", "count", "sources"]


def test_pool_refuses_inconsistent_models():
    a = P.ModelSelections("a", 4, np.array([1]), np.array([1]), np.array([0, 1]))
    b = P.ModelSelections("b", 5, np.array([1]), np.array([1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="covers 2 images x 5 classes"):
        P.candidate_pool([a, b], np.array([0, 0]), ["x", "y"])
    with pytest.raises(ValueError, match="model name"):
        P.ModelSelections("a:b", 4, np.array([1]), np.array([1]), np.array([0, 1]))


# ---------------------------------------------------------------- Beam pipeline and CLI

def write_predictions(path, file_names, logits=None, top1=None, image_index=None, compressed=False):
    arrays = {"file_names": np.asarray(file_names)}
    if logits is not None:
        arrays["logits"] = logits
    if top1 is not None:
        arrays["top1"] = top1
    if image_index is not None:
        arrays["image_index"] = image_index
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def in_memory_pool(models: dict[str, tuple[np.ndarray, np.ndarray]], originals: dict[str, int],
                   n: int) -> pd.DataFrame:
    """Reference: every model's full matrix in memory, rows in sorted file-name order."""
    selections, names = [], None
    for name, (file_names, logits) in models.items():
        order = np.argsort(file_names)
        names = np.asarray(file_names)[order]
        selections.append(P.select_model_proposals(name, logits[order], n))
    return P.pool_proposals(selections, np.array([originals[f] for f in names]), names).to_frame()


def test_pipeline_equals_in_memory_pooling_and_cli_writes_parquet(tmp_path):
    rng = np.random.default_rng(5)
    rows, classes = 97, 11
    names = np.array([f"img_{i:04d}.jpg" for i in range(rows)])
    originals = {f: int(rng.integers(classes)) for f in names}
    models, paths = {}, []
    for m in range(3):
        perm = rng.permutation(rows)  # each file lists the images in its own order
        logits = tied_logits(rng, rows, classes)
        models[f"m{m}"] = (names[perm], logits)
        paths.append(str(write_predictions(tmp_path / f"m{m}.npz", names[perm], logits,
                                           compressed=(m == 1))))
    labels_tsv = tmp_path / "labels.tsv"
    pd.DataFrame({"file_name": names, "label": [originals[f] for f in names]}).to_csv(
        labels_tsv, sep="\t", index=False)
    n = 2 * rows
    expected = in_memory_pool(models, originals, n)

    import argparse
    parser = argparse.ArgumentParser()
    propose.add_arguments(parser)
    args = parser.parse_args(["--predictions", *paths, "--original-labels", str(labels_tsv),
                              "--top-n", str(n), "--rows-per-shard", "10", "--out", str(tmp_path / "out")])
    assert propose.main(args) == 0
    got = pd.read_parquet(tmp_path / "out" / "proposals.parquet")
    pd.testing.assert_frame_equal(got.drop(columns="sources"), expected.drop(columns="sources"))
    assert [list(s) for s in got["sources"]] == [list(s) for s in expected["sources"]]
    selections, file_names = propose.read_selections(tmp_path / "out" / "selections.npz")
    assert [s.name for s in selections] == ["m0", "m1", "m2"] and list(file_names) == sorted(names)
    for s in selections:
        order = np.argsort(models[s.name][0])
        assert np.array_equal(s.logits, brute_force_top_n(models[s.name][1][order], np.arange(rows), n))


def test_pipeline_honours_image_index_and_top1_only_models(tmp_path):
    rng = np.random.default_rng(6)
    rows, classes = 40, 6
    names = np.array([f"z{i:03d}" for i in range(rows)])
    image_index = rng.permutation(rows)  # image order != sorted file names
    logits = tied_logits(rng, rows, classes)
    top1 = rng.integers(classes, size=rows)
    # Fortran-order logits cannot be read by row shards: read whole, with the same result.
    a = write_predictions(tmp_path / "a.npz", names, np.asfortranarray(logits), image_index=image_index)
    b = write_predictions(tmp_path / "b.npz", names, top1=top1, image_index=image_index)
    originals = pd.DataFrame({"file_name": names, "label": np.zeros(rows, np.int64)})
    got = propose.run_proposals({"a": a, "b": b}, originals, top_n=rows, rows_per_shard=7)
    order = np.argsort(image_index)
    expected = P.pool_proposals(
        [P.select_model_proposals("a", logits[order], rows),
         P.ModelSelections("b", classes, np.empty(0, np.int64), np.empty(0, np.int64), top1[order])],
        np.zeros(rows, np.int64), names[order]).to_frame()
    pd.testing.assert_frame_equal(got.drop(columns="sources"), expected.drop(columns="sources"))


def test_pipeline_errors_name_the_file_and_row(tmp_path):
    names = np.array(["a", "b", "c"])
    logits = np.zeros((3, 4), np.float32)
    logits[2, 1] = np.nan
    bad = write_predictions(tmp_path / "bad.npz", names, logits)
    originals = pd.DataFrame({"file_name": names, "label": [0, 0, 0]})
    with pytest.raises(PredictionsFormatError, match=r"bad.npz: 'logits' row 2"):
        propose.run_proposals([bad], originals)
    other = write_predictions(tmp_path / "other.npz", np.array(["a", "b", "d"]), np.zeros((3, 4), np.float32))
    good = write_predictions(tmp_path / "good.npz", names, np.zeros((3, 4), np.float32))
    with pytest.raises(PredictionsFormatError, match="other.npz: its images differ.*1 extra"):
        propose.run_proposals([good, other], originals)
    with pytest.raises(ValueError, match="no label for 1 predicted image"):
        propose.run_proposals([good], originals.iloc[:2])
