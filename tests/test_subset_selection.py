"""Stage 3: precision/recall of every model subset, and the chosen subset."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from auditing import labelsets, sources
from auditing import proposals as P
from auditing.subset_selection import ModelSubsetSelector


def brute_force_scores(selections, originals, names, gold, subset):
    """Precision and recall of stage 2 re-run on ``subset``, by Python sets."""
    pool = P.pool_proposals(selections, originals, names, models=subset)
    index = {n: i for i, n in enumerate(names)}
    gold_images = {index[f] for f in gold}
    proposed = {(i, l) for i, l in zip(pool.image.tolist(), pool.label.tolist()) if i in gold_images}
    truth = {(index[f], l) for f, labels in gold.items() for l in labels}
    hits = len(proposed & truth)
    return hits / len(proposed), hits / len(truth), len(proposed) / len(gold)


def random_models(rng, num_models, num_images, num_classes):
    logits = rng.normal(size=(num_images, num_classes))
    models = []
    for m in range(num_models):
        noisy = (logits + rng.normal(scale=1.0 + m, size=logits.shape)).astype(np.float32)
        noisy = np.round(noisy)  # ties
        models.append(P.select_model_proposals(f"m{m}", noisy, n=2 * num_images))
    truth = logits.argsort(axis=1)[:, ::-1]
    return models, truth


@pytest.mark.parametrize("seed", range(3))
def test_exhaustive_search_equals_re_running_stage_2_per_subset(seed):
    rng = np.random.default_rng(seed)
    num_images, num_classes, num_models = 40, 7, 5
    models, truth = random_models(rng, num_models, num_images, num_classes)
    names = np.array([f"f{i:02d}" for i in range(num_images)])
    originals = rng.integers(num_classes, size=num_images)
    gold = {names[i]: frozenset(truth[i, :rng.integers(0, 4)].tolist())
            for i in rng.choice(num_images, size=25, replace=False)}
    selector = ModelSubsetSelector(recall_target=0.5).fit(P.candidate_pool(models, originals, names), gold)
    assert selector.search_ == "exhaustive" and len(selector.table_) == 2 ** num_models
    for row in selector.table_.itertuples():
        subset = row.models.split("+") if row.models else []
        precision, recall, per_image = brute_force_scores(models, originals, names, gold, subset)
        assert (row.precision, row.recall, row.proposals_per_image) == pytest.approx(
            (precision, recall, per_image), abs=1e-12), row.models


def test_greedy_search_against_exhaustive_on_small_pools():
    agree = 0
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        models, truth = random_models(rng, 6, 60, 8)
        names = np.array([f"f{i:02d}" for i in range(60)])
        originals = truth[:, 0].copy()
        gold = {names[i]: frozenset(truth[i, :2].tolist()) for i in range(60)}
        pool = P.candidate_pool(models, originals, names)
        exhaustive = ModelSubsetSelector(recall_target=0.8, search="exhaustive").fit(pool, gold)
        greedy = ModelSubsetSelector(recall_target=0.8, search="greedy").fit(pool, gold)
        assert greedy.search_ == "greedy" and len(greedy.table_) < 2 ** 6
        # Greedy scores agree with the exhaustive table on every subset it tried ...
        merged = greedy.table_.merge(exhaustive.table_, on="mask", suffixes=("", "_all"))
        assert np.allclose(merged["precision"], merged["precision_all"])
        # ... and it never beats the exhaustive optimum.
        if greedy.target_met_:
            assert greedy.best_["precision"] <= exhaustive.best_["precision"] + 1e-12
        agree += greedy.best_mask_ == exhaustive.best_mask_
    assert agree >= 3  # it usually finds the optimum on these pools


def test_hand_built_pool_with_a_known_answer():
    # 4 images x 5 classes; gold = {original, class 4} on every image.
    num_images, num_classes = 4, 5
    names = np.array(["a", "b", "c", "d"])
    originals = np.array([0, 1, 2, 3])
    good = [i * num_classes + 4 for i in range(num_images)]  # the missing gold labels
    noise = [i * num_classes + (originals[i] + 1) % 4 for i in range(num_images)]
    top1 = originals.copy()

    def model(name, logits, probs):
        return P.ModelSelections(name, num_classes, np.sort(logits), np.sort(probs), top1)

    models = [model("precise", good, good),  # finds the gold labels, alone (count 2)
              model("noisy", good + noise, good + noise),  # finds them and as many wrong ones
              model("useless", noise, noise)]
    gold = {n: frozenset({int(originals[i]), 4}) for i, n in enumerate(names)}
    selector = ModelSubsetSelector(recall_target=1.0).fit(
        P.candidate_pool(models, originals, names), gold)
    assert selector.best_models_ == ("precise",)
    assert (selector.best_["precision"], selector.best_["recall"]) == (1.0, 1.0)
    by_models = selector.table_.set_index("models")
    assert by_models.loc["", "recall"] == 0.5 and by_models.loc["", "precision"] == 1.0
    assert by_models.loc["noisy", "precision"] == pytest.approx(8 / 12)
    # "precise+useless" keeps precise's pairs but adds useless's noise.
    assert by_models.loc["precise+useless", "precision"] == pytest.approx(8 / 12)
    # No subset reaches an impossible target: the highest-recall subset, flagged.
    strict = ModelSubsetSelector(recall_target=1.0).fit(
        P.candidate_pool(models[2:], originals, names), gold)
    assert not strict.target_met_ and strict.best_["recall"] == 0.5


def test_real_gold_sets_with_a_real_top1_model(shared_data):
    """real.json as gold; the label_errors cross-validated model as a (top-1 only) model."""
    names = np.array(labelsets.imagenet_val_file_names())
    originals_frame = labelsets.read_label_tsv(shared_data / "derived" / "imagenet_val_labels_by_filename.tsv")
    originals = originals_frame.set_index("file_name").loc[names, "label"].to_numpy()
    predicted = np.load(sources.fetch("label_errors_predictions", download=False)).astype(np.int64)
    index = json.loads(sources.fetch("label_errors_index", download=False).read_text())
    position = {n: i for i, n in enumerate(names)}
    top1 = np.empty(len(names), np.int64)
    top1[[position[p.rsplit("/", 1)[1]] for p in index]] = predicted
    gold = labelsets.read_real_json(sources.fetch("real_labels", download=False))
    empty = np.empty(0, np.int64)
    model = P.ModelSelections("label_errors", 1000, empty, empty, top1)
    selector = ModelSubsetSelector(recall_target=0.75).fit(P.candidate_pool([model], originals, names), gold)

    truth = {(position[f], l) for f, labels in gold.items() for l in labels}
    for mask, proposed in [(0, set(enumerate(originals.tolist()))),
                           (1, set(enumerate(originals.tolist())) | set(enumerate(top1.tolist())))]:
        row = selector.table_.set_index("mask").loc[mask]
        hits = len(proposed & truth)
        assert row["precision"] == pytest.approx(hits / len(proposed))
        assert row["recall"] == pytest.approx(hits / len(truth))
    table = selector.table_.set_index("models")
    # Adding a real model's top-1 finds ReaL labels the original labels miss.
    assert table.loc["label_errors", "recall"] > table.loc["", "recall"] + 0.01
    assert table.loc["label_errors", "proposals_per_image"] < 2
    # The original labels alone recall ~73% of the ReaL labels; the model's top-1 lifts it past 75%.
    assert table.loc["", "recall"] < 0.75 <= table.loc["label_errors", "recall"]
    assert selector.best_models_ == ("label_errors",) and selector.target_met_


def test_propose_pipeline_with_gold_pools_the_chosen_subset(tmp_path):
    from pipelines import propose

    rng = np.random.default_rng(7)
    num_images, num_classes = 60, 9
    names = np.array([f"im{i:03d}" for i in range(num_images)])
    truth = rng.integers(num_classes, size=num_images)
    paths = {}
    for m, noise in enumerate([0.5, 3.0, 6.0]):
        logits = rng.normal(scale=noise, size=(num_images, num_classes)).astype(np.float32)
        logits[np.arange(num_images), truth] += 3
        paths[f"m{m}"] = tmp_path / f"m{m}.npz"
        np.savez(paths[f"m{m}"], file_names=names, logits=logits)
    originals = pd.DataFrame({"file_name": names, "label": rng.integers(num_classes, size=num_images)})
    gold = {names[i]: frozenset({int(truth[i])}) for i in range(0, num_images, 2)}
    result = propose.run_subset_selection(paths, originals, gold, recall_target=0.9,
                                          out_dir=tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "subsets.csv", keep_default_na=False)
    assert len(table) == 8 and result["subsets_tried"] == 8
    best = table[table["recall"] >= 0.9].sort_values("precision", ascending=False).iloc[0]
    assert result["selected_models"] == best["models"].split("+")
    assert result["precision"] == pytest.approx(best["precision"])

    selections, file_names = propose.read_selections(tmp_path / "out" / "selections.npz")
    expected = P.pool_proposals(selections, originals["label"].to_numpy(), file_names,
                                models=result["selected_models"]).to_frame()
    got = pd.read_parquet(tmp_path / "out" / "proposals.parquet")
    pd.testing.assert_frame_equal(got.drop(columns="sources"), expected.drop(columns="sources"))


def test_gold_labels_outside_the_models_classes_are_refused():
    rng = np.random.default_rng(0)
    models, _ = random_models(rng, num_models=2, num_images=4, num_classes=10)
    names = np.array([f"f{i}" for i in range(4)])
    originals = rng.integers(10, size=4)
    gold = {names[0]: frozenset({15})}  # would silently count as label 5 of the next image
    with pytest.raises(ValueError, match=r"gold labels \[15\] are outside the models' 10 classes"):
        ModelSubsetSelector().fit(P.candidate_pool(models, originals, names), gold)
