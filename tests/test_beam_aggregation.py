"""Sharded aggregation (auditing.aggregation.sharded kernels, pipelines.beam_aggregation)
against the in-memory crowd-kit path, on hand-built votes and on the real ReaL votes."""
from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from crowdkit.aggregation import DawidSkene

from auditing import aggregation, labelsets, sources
from auditing import votes as votes_lib
from auditing.aggregation import sharded
from auditing.aggregation.priors import ANIMAL_WNID
from pipelines import beam_aggregation as B
from pipelines.beam_options import make_options


def hand_built_votes() -> pd.DataFrame:
    """12 questions on 5 images, 4 raters (one who never says maybe), mixed answers."""
    rng = np.random.default_rng(3)
    rows = []
    for image in range(5):
        for label in (image, image + 10, image + 20)[: 2 + image % 2]:
            truth = label == image or rng.random() < 0.2
            for rater in ("r1", "r2", "r3", "strict"):
                if rng.random() < 0.2:
                    continue
                p_yes = 0.8 if truth else 0.15
                answer = rng.choice(["yes", "maybe", "no"], p=[p_yes, 0.1, 0.9 - p_yes])
                if rater == "strict":
                    answer = "yes" if truth else "no"
                rows.append((f"img{image}.JPEG", label, rater, answer))
    frame = pd.DataFrame(rows, columns=["file_name", "label", "rater_id", "answer"])
    return frame.assign(answer=frame["answer"].astype(votes_lib.ANSWER_DTYPE))


def kernel_em(votes: pd.DataFrame, groups: pd.Series | None = None, n_iter: int = 100, tol: float = 1e-5,
              smoothing: float = 1.0, shrinkage: float = 0.0) -> tuple[pd.DataFrame, sharded.EMState]:
    """The kernels' EM on one shard holding every vote."""
    crowd = aggregation.CrowdData.from_votes(votes)
    group_codes = np.zeros(len(crowd.questions), np.int64) if groups is None else pd.factorize(groups)[0]
    shard = sharded.VoteShard(group_codes, crowd.data["task"].to_numpy(), crowd.data["worker"].to_numpy(),
                              pd.Categorical(crowd.data["label"], categories=votes_lib.ANSWERS).codes.astype(np.int64))
    n_raters, n_groups = len(crowd.raters), int(group_codes.max()) + 1
    pseudo = sharded.smoothing_pseudo_counts(n_raters, smoothing)
    state = sharded.initial_state(sharded.shard_statistics(shard, sharded.majority_posteriors(shard), n_raters,
                                                           n_groups), pseudo, shrinkage)
    while not state.done(n_iter):
        state = sharded.advance(state, sharded.e_step_statistics(shard, state, n_raters, n_groups), pseudo,
                                shrinkage, tol)
    return crowd.questions.assign(score=state.current_posteriors(shard)[:, 1]), state


@pytest.mark.parametrize("params", [{}, {"shrinkage": 0.3}, {"smoothing": 0.0}, {"n_iter": 3}])
def test_kernels_are_presence_dawid_skene(params):
    votes = hand_built_votes()
    expected = aggregation.aggregate(votes, **params)
    scores, state = kernel_em(votes, **params)
    np.testing.assert_allclose(scores["score"], expected.scores_["score"], rtol=0, atol=1e-12)
    assert state.iteration == expected.n_iter_ and state.converged == expected.model_.converged_
    assert list(state.changes) == pytest.approx(expected.model_.loss_history_, abs=1e-12)


def test_kernels_with_prior_groups_and_a_pseudo_rater():
    votes = hand_built_votes()
    original = pd.DataFrame({"file_name": [f"img{i}.JPEG" for i in range(5)], "label": range(5)})
    expected = aggregation.aggregate(votes, prior="original-label", original_labels=original)
    crowd = aggregation.CrowdData.from_votes(votes)
    groups = aggregation.original_label_prior_groups(crowd.questions, original)["group"]
    scores, _ = kernel_em(votes, groups=groups)
    np.testing.assert_allclose(scores["score"], expected.scores_["score"], rtol=0, atol=1e-12)
    # A pseudo-rater per question adds its log-likelihood: certain evidence decides.
    shard = sharded.VoteShard(np.zeros(2, np.int64), np.array([0, 1]), np.array([0, 0]), np.array([2, 0]),
                              question_log2_likelihood=np.array([[0.0, -60.0], [-60.0, 0.0]]))
    errors = np.full((1, 3, 2), 1 / 3)
    np.testing.assert_allclose(sharded.posteriors(shard, errors, np.array([[0.5, 0.5]]))[:, 1], [0, 1], atol=1e-15)


def test_shard_votes_groups_every_vote_of_an_image_and_quarantines_cross_chunk_duplicates():
    votes = hand_built_votes()
    chunks = []
    for number, start in enumerate(range(0, len(votes), 7)):  # chunks of 7 raw rows
        part = votes.iloc[start:start + 7]
        chunks.append({"file_name": part["file_name"].to_numpy(dtype=object), "label": part["label"].to_numpy(),
                       "rater_id": part["rater_id"].to_numpy(dtype=object),
                       "answer": part["answer"].cat.codes.to_numpy(np.int8),
                       "source": np.zeros(len(part), np.int32),
                       "order": number * (1 << 32) + np.arange(len(part), dtype=np.int64),
                       "row": np.arange(start + 1, start + 1 + len(part))})
    again = dict(chunks[0], answer=np.full(len(chunks[0]["label"]), 2, np.int8), source=np.ones(7, np.int32))
    with BeamTestPipeline(options=make_options()) as p:
        out = {"votes": p | beam.Create(chunks + [again])} | B.ShardVotes(["a.csv", "b.csv"], votes_per_shard=20)
        per_shard = out["shards"] | beam.Map(lambda s: (s.count, s.votes.n_votes, sorted(set(s.file_name))))
        n_shards = -(-(len(votes) + 7) // 20)  # votes before the duplicate check / votes_per_shard
        buckets = set(B.image_bucket(np.array(sorted(set(votes["file_name"])), dtype=object), n_shards))
        assert_that(per_shard | beam.Map(lambda t: t[0]), equal_to([n_shards] * len(buckets)), label="ShardCount")
        assert_that(per_shard | beam.Map(lambda t: t[1]) | beam.CombineGlobally(sum), equal_to([len(votes)]),
                    label="AllVotesOnce")
        assert_that(per_shard | beam.FlatMap(lambda t: t[2]), equal_to(sorted(set(votes["file_name"]))),
                    label="EachImageInOneShard")
        duplicates = out["quarantine"] | beam.FlatMap(lambda named: named[1][["source", "row", "reason"]].itertuples(
            index=False, name=None))
        assert_that(duplicates, equal_to([("b.csv", r, "duplicate_vote") for r in range(1, 8)]), label="Duplicates")
        assert_that(out["raters"] | beam.Map(list), equal_to([["r1", "r2", "r3", "strict"]]), label="Raters")


def test_beam_iterations_match_the_kernels_on_hand_built_shards():
    votes = hand_built_votes()
    expected, expected_state = kernel_em(votes, shrinkage=0.3)
    crowd = aggregation.CrowdData.from_votes(votes)
    answers = pd.Categorical(crowd.data["label"], categories=votes_lib.ANSWERS).codes.astype(np.int64)
    # Two shards by question halves: task codes renumbered within each.
    shards = []
    for index, tasks in enumerate(np.array_split(np.arange(len(crowd.questions)), 2)):
        mask = crowd.data["task"].isin(tasks).to_numpy()
        votes_of = sharded.VoteShard(np.zeros(len(tasks), np.int64), crowd.data["task"].to_numpy()[mask] - tasks[0],
                                     crowd.data["worker"].to_numpy()[mask], answers[mask])
        shards.append(B.NamedShard(index, 2, crowd.questions["file_name"].to_numpy()[tasks],
                                   crowd.questions["label"].to_numpy()[tasks], votes_of))
    model = B.EMModel(len(crowd.raters), 1, sharded.smoothing_pseudo_counts(len(crowd.raters), 1.0), 0.3, 1e-5, 100)
    with BeamTestPipeline(options=make_options()) as p:
        shard_pc, model_pc = p | "Shards" >> beam.Create(shards), p | "Model" >> beam.Create([model])
        steps = B._initial_steps(shard_pc, model_pc)
        # More iterations than EM needs: the ones after convergence pass the state through.
        last = {"shards": shard_pc, "previous": steps, "model": model_pc} | B.DawidSkeneIterations(0, 40)
        final = p | beam.Create([None]) | beam.Map(lambda _, s: B.next_state(s, model), beam.pvalue.AsList(last))
        assert_that(final | beam.Map(lambda s: (s.iteration, s.converged)),
                    equal_to([(expected_state.iteration, True)]), label="Stopped")
        scores = shard_pc | beam.FlatMap(lambda s, st: zip(s.file_name, s.label.tolist(), np.round(
            st.current_posteriors(s.votes)[:, 1], 12).tolist()), beam.pvalue.AsSingleton(final))
        assert_that(scores, equal_to(list(zip(expected["file_name"], expected["label"].tolist(),
                                              np.round(expected["score"], 12).tolist()))), label="Scores")


def test_next_block_size_predicts_the_iterations_left_from_the_rate():
    state = sharded.EMState(10, np.zeros((1, 3, 2)), np.zeros((1, 2)), changes=(1e-1, 1e-2, 1e-3, 1e-4))
    assert B.next_block_size(state, 1e-5, 100, 16) == 2  # one more iteration to 1e-5, +1
    assert B.next_block_size(state, 1e-5, 11, 16) == 1  # never past n_iter
    assert B.next_block_size(sharded.EMState(0, state.errors, state.priors), 1e-5, 100, 16) == 16


def write_formats(votes: pd.DataFrame, folder) -> list[str]:
    """The votes split over a CSV (with bad rows), a JSONL (with a broken line) and a Parquet."""
    third = len(votes) // 3
    csv = votes.iloc[:third].astype({"answer": str})
    csv = pd.concat([csv, pd.DataFrame([{"file_name": "img0.JPEG", "label": "x", "rater_id": "r1", "answer": "yes"},
                                        {"file_name": "img1.JPEG", "label": 1, "rater_id": "r9", "answer": "perhaps"}])])
    csv.to_csv(folder / "a.csv", index=False)
    with open(folder / "b.jsonl", "w") as f:
        for row in votes.iloc[third:2 * third].astype({"answer": str}).to_dict("records"):
            f.write(json.dumps({**row, "label": int(row["label"])}) + "\n")
        f.write("{not json\n")
        first = votes.iloc[0]  # a duplicate of the CSV's first vote, in another file
        f.write(json.dumps({"file_name": first["file_name"], "label": int(first["label"]),
                            "rater_id": first["rater_id"], "answer": "no"}) + "\n")
    votes.iloc[2 * third:].astype({"answer": str}).to_parquet(folder / "c.parquet", index=False)
    return [str(folder / "a.csv"), str(folder / "b.jsonl"), str(folder / "c.parquet")]


def test_aggregate_sharded_reads_every_format_counts_every_row_and_matches_in_memory(tmp_path):
    votes = hand_built_votes()
    paths = write_formats(votes, tmp_path)
    # Expected: each file validated on its own (``read_and_validate`` of the three at once
    # would parse the JSONL's labels, float after its broken line, as text: "3.0" is not
    # an integer), then the first vote of each (rater, question) over the files in order.
    per_file = [votes_lib.read_and_validate(path) for path in paths]
    together = pd.concat([v.kept for v in per_file], ignore_index=True)
    repeated = together.duplicated(["rater_id", "file_name", "label"]).to_numpy()
    kept = together[~repeated].reset_index(drop=True)
    reasons = {r: sum(v.summary.quarantined[r] for v in per_file) for r in votes_lib.REASONS}
    reasons[votes_lib.DUPLICATE_VOTE] += int(repeated.sum())
    assert reasons[votes_lib.DUPLICATE_VOTE] == reasons[votes_lib.UNPARSABLE_LABEL] == 1
    expected = aggregation.aggregate(kept, shrinkage=0.3)
    result = B.aggregate_sharded(paths, "dawid-skene", {"shrinkage": 0.3}, str(tmp_path / "out") + "/",
                                 votes_per_shard=15, chunk_rows=5, iterations_per_run=4)
    counts = result.counts
    assert counts["read"] == len(kept) + sum(reasons.values()) == counts["kept"] + counts["quarantined"]
    assert counts["quarantined_by_reason"] == reasons
    jsonl_last_line = len(votes) // 3 + 2  # its votes, the broken line, the duplicate
    quarantine = pd.concat([v.quarantine for v in per_file] + [pd.DataFrame({
        "source": [paths[1]], "row": [jsonl_last_line], "reason": [votes_lib.DUPLICATE_VOTE]})])
    assert counts["shards"] == len(result.score_paths) > 1 and result.pipeline_runs > 1
    written = pd.concat([pd.read_parquet(p) for p in tmp_path.glob("out/quarantine-*.parquet")])
    assert sorted(zip(written["source"], written["row"], written["reason"])) == sorted(
        zip(quarantine["source"], quarantine["row"], quarantine["reason"]))
    merged = expected.scores_.merge(result.read_scores(), on=["file_name", "label"], suffixes=("", "_beam"))
    assert len(merged) == len(expected.scores_) == counts["questions"]
    np.testing.assert_allclose(merged["score_beam"], merged["score"], rtol=0, atol=1e-12)
    assert result.n_iter_ == expected.n_iter_ and result.converged_


def test_sharded_arguments_are_checked(tmp_path):
    with pytest.raises(B.ShardedAggregationError, match="no sharded implementation"):
        B.aggregate_sharded([], "glad", {}, str(tmp_path) + "/")
    with pytest.raises(B.ShardedAggregationError, match=r"params \['prior_groups'\]"):
        B.aggregate_sharded([], "dawid-skene", {"prior_groups": None}, str(tmp_path) + "/")
    with pytest.raises(B.ShardedAggregationError, match="needs original_labels"):
        B.aggregate_sharded([], "dawid-skene", {"prior": "original-label"}, str(tmp_path) + "/")
    with pytest.raises(B.ShardedAggregationError, match="no matrix for 1 rater"):
        B.fixed_rater_errors(np.array(["a", "b"], dtype=object), {"a": np.eye(2, 3)})


# ---------------------------------------------------------------- the real ReaL votes

@pytest.fixture(scope="module")
def real_votes(shared_data):
    return str(sources.fetch("real_raters", download=False)), votes_lib.read_real_votes().kept


@pytest.mark.slow
def test_beam_dawid_skene_equals_in_memory_on_real_votes_with_the_demo_params(real_votes, tmp_path):
    """configs/imagenet_real.yaml's aggregation (original-label prior on animal classes,
    shrinkage 0.3) on the 924,810 ReaL votes: same scores within the EM tolerance."""
    path, kept = real_votes
    original = labelsets.original_val_labels()
    params = {"prior": "original-label", "prior_classes": ANIMAL_WNID, "shrinkage": 0.3}
    expected = aggregation.aggregate(kept, original_labels=original, **params)
    result = B.aggregate_sharded([path], "dawid-skene", params, str(tmp_path) + "/", original_labels=original)
    assert result.counts["kept"] == len(kept) == 924_810 and result.counts["quarantined"] == 0
    merged = expected.scores_.merge(result.read_scores(), on=["file_name", "label"], suffixes=("", "_beam"))
    assert len(merged) == len(expected.scores_) == 184_962
    difference = np.abs(merged["score_beam"] - merged["score"]).max()
    assert difference <= 1e-5  # the EM tolerance; measured ~1e-14
    assert result.n_iter_ == expected.n_iter_
    # Rater matrices agree too (crowd-kit's errors_ by (rater_id, answer) x truth).
    mine = pd.DataFrame(result.errors_.reshape(-1, 2), index=pd.MultiIndex.from_product(
        [result.rater_ids_, votes_lib.ANSWERS]), columns=[0, 1])
    theirs = expected.errors_
    np.testing.assert_allclose(mine.reindex(theirs.index).to_numpy(), theirs.to_numpy(), rtol=0, atol=1e-9)


@pytest.mark.slow
def test_fixed_matrix_pass_equals_crowdkit_e_step_on_real_votes(real_votes, tmp_path):
    """One pass with given rater matrices and prior = crowd-kit's E-step with the same
    matrices, to 1e-9 (matrices from a short in-memory EM: any matrices would do)."""
    path, kept = real_votes
    fitted = aggregation.aggregate(kept, n_iter=3)
    errors = fitted.errors_  # (rater_id, answer) x (absent, present)
    matrices = {r: errors.loc[r].reindex(list(votes_lib.ANSWERS)).to_numpy().T
                for r in errors.index.get_level_values("rater_id").unique()}
    prior = float(fitted.model_.priors_[1])
    result = B.aggregate_sharded([path], "fixed-matrices", {"rater_matrices": matrices, "class_prior": prior},
                                 str(tmp_path) + "/")
    crowd = aggregation.CrowdData.from_votes(kept)
    code_errors = errors.copy()
    code_of = {r: c for c, r in enumerate(crowd.raters)}
    code_errors.index = pd.MultiIndex.from_arrays([errors.index.get_level_values("rater_id").map(code_of),
                                                   errors.index.get_level_values("answer")], names=["worker", "label"])
    probas = DawidSkene._e_step(crowd.data, pd.Series([1 - prior, prior], index=[0, 1]), code_errors)
    expected = crowd.questions.assign(score=probas[1].reindex(range(len(crowd.questions))).to_numpy())
    merged = expected.merge(result.read_scores(), on=["file_name", "label"], suffixes=("", "_beam"))
    assert len(merged) == 184_962
    assert np.abs(merged["score_beam"] - merged["score"]).max() <= 1e-9


def test_original_label_pseudo_rater_in_sharded_dawid_skene_matches_in_memory(tmp_path):
    votes = hand_built_votes()
    original = pd.DataFrame({"file_name": [f"img{i}.JPEG" for i in range(5)], "label": range(5)})
    params = {"original_label_rater": {"classes": [0, 1, 2, 11]}, "prior": "original-label"}
    expected = aggregation.aggregate(votes, original_labels=original, **params)
    votes.astype({"answer": str}).to_parquet(tmp_path / "v.parquet", index=False)
    result = B.aggregate_sharded([str(tmp_path / "v.parquet")], "dawid-skene", params, str(tmp_path / "o") + "/",
                                 original_labels=original, votes_per_shard=10)
    assert result.counts["kept"] == len(votes) and result.rater_ids_[-1] == "original-label"
    merged = expected.scores_.merge(result.read_scores(), on=["file_name", "label"], suffixes=("", "_beam"))
    assert len(merged) == len(expected.scores_)
    np.testing.assert_allclose(merged["score_beam"], merged["score"], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_gold_confusion_matrices_in_one_sharded_pass_equal_in_memory_on_real_votes(real_votes, tmp_path):
    """configs/imagenet_real.yaml's method at scale: gold-confusion's matrices (counted on
    the real golden questions, in memory: they are small) and prior, then the one
    posterior pass over the sharded votes, with the original-label pseudo-rater."""
    from auditing import gold as gold_lib

    path, kept = real_votes
    gold = gold_lib.read_real_gold(sources.fetch("real_golden", download=False),
                                   sources.fetch("real_raters_golden", download=False),
                                   known_raters=set(kept["rater_id"]))
    original = labelsets.original_val_labels()
    params = {"smoothing": 1.0, "raters_without_gold": "mean",
              "original_label_rater": {"classes": ANIMAL_WNID, "present_if": {"min_yes": 2, "of": 5}}}
    expected = aggregation.aggregate(kept, "gold-confusion", original_labels=original, gold=gold, **params)
    errors = expected.errors_
    matrices = {r: errors.loc[r].reindex(list(votes_lib.ANSWERS)).to_numpy().T
                for r in errors.index.get_level_values("rater_id").unique()}
    result = B.aggregate_sharded([path], "fixed-matrices", {
        "rater_matrices": matrices, "class_prior": float(expected.model_.priors_[1]),
        "original_label_rater": {"classes": ANIMAL_WNID}}, str(tmp_path) + "/", original_labels=original)
    merged = expected.scores_.merge(result.read_scores(), on=["file_name", "label"], suffixes=("", "_beam"))
    assert len(merged) == len(expected.scores_) == 184_962
    assert np.abs(merged["score_beam"] - merged["score"]).max() <= 1e-9


# ---------------------------------------------------------------- gold questions in the Beam engine

def _gold_with_a_gold_only_rater():
    """The hand-built gold plus a rater ("g9") who answered gold questions only."""
    from auditing import gold as gold_lib
    from tests.test_aggregation import _hand_built_gold, _votes

    gold = _hand_built_gold()
    extra = _votes([(f"gold{k}", k, "g9", "yes" if k < 4 else ("maybe" if k % 3 else "no")) for k in range(10)])
    return gold_lib.Gold.from_frames(gold.truth(), pd.concat([gold.rater_votes, extra], ignore_index=True))


@pytest.mark.parametrize("method,params", [
    ("gold-confusion", {}),
    ("gold-confusion", {"original_label_rater": {"classes": [0, 1, 2, 3, 7, 8]}, "raters_without_gold": "pooled"}),
    ("dawid-skene", {}),
    ("dawid-skene", {"shrinkage": 0.3, "prior": "original-label", "original_label_rater": {"classes": [0, 1, 2, 7]}}),
])
def test_sharded_methods_with_gold_match_in_memory_on_hand_built_votes(method, params, tmp_path):
    """Raters first seen out of sorted order (r3 first), a gold-only rater, the
    pseudo-rater: gold-confusion gives the same floats, DS-with-gold the same EM."""
    from tests.test_aggregation import _hand_built_crowd

    votes = _hand_built_crowd()
    votes = pd.concat([votes[votes["rater_id"] == "r3"], votes[votes["rater_id"] != "r3"]], ignore_index=True)
    # Softer votes than the hand-built crowd's, so that scores are not all 0 or 1.
    votes.loc[votes.index % 7 == 0, "answer"] = "maybe"
    gold = _gold_with_a_gold_only_rater()
    original = pd.DataFrame({"file_name": [f"img{q}" for q in range(20)] + [f"gold{k}" for k in range(10)],
                             "label": list(range(20)) + [k if k % 2 else k + 1 for k in range(10)]})
    expected = aggregation.aggregate(votes, method, original_labels=original, gold=gold, **params)
    votes.astype({"answer": str}).to_parquet(tmp_path / "v.parquet", index=False)
    result = B.aggregate_sharded([str(tmp_path / "v.parquet")], method, params, str(tmp_path / "o") + "/",
                                 original_labels=original, gold=gold, votes_per_shard=20, iterations_per_run=3)
    assert result.counts["shards"] > 1 and result.rater_ids_[-1] == "g9" and result.counts["raters"] == 4
    merged = expected.scores_.merge(result.read_scores(), on=["file_name", "label"], suffixes=("", "_beam"))
    assert len(merged) == len(expected.scores_)
    assert 0.05 < merged["score"].median() < 0.95 or merged["score"].between(0.01, 0.99).any()
    if method == "gold-confusion":
        assert (merged["score_beam"] == merged["score"]).all()
    else:
        np.testing.assert_allclose(merged["score_beam"], merged["score"], rtol=0, atol=1e-12)
        assert result.n_iter_ == expected.n_iter_ and result.pipeline_runs > 1
    theirs = expected.errors_
    mine = pd.DataFrame(result.errors_.reshape(-1, 2), index=pd.MultiIndex.from_product(
        [result.rater_ids_, votes_lib.ANSWERS]), columns=[0, 1])
    np.testing.assert_allclose(mine.reindex(theirs.index).to_numpy(), theirs.to_numpy(), rtol=0, atol=1e-12)


def test_sharded_gold_confusion_needs_gold_and_says_what_is_wrong_with_it(tmp_path):
    from auditing import gold as gold_lib
    from tests.test_aggregation import _votes

    with pytest.raises(B.ShardedAggregationError, match="gold-confusion needs gold"):
        B.aggregate_sharded([], "gold-confusion", {}, str(tmp_path) + "/")
    present_only = gold_lib.Gold.from_frames(pd.DataFrame({"file_name": ["g"], "label": [1], "truth": [True]}),
                                             _votes([("g", 1, "r0", "yes")]))
    with pytest.raises(B.ShardedAggregationError, match="both present and absent"):
        B.aggregate_sharded([], "gold-confusion", {}, str(tmp_path) + "/", gold=present_only)


@pytest.fixture(scope="module")
def real_gold_questions(real_votes):
    from auditing import gold as gold_lib

    return gold_lib.read_real_gold(sources.fetch("real_golden", download=False),
                                   sources.fetch("real_raters_golden", download=False),
                                   known_raters=set(real_votes[1]["rater_id"]))


@pytest.mark.slow
def test_beam_gold_confusion_equals_in_memory_and_the_published_scores_on_real_votes(real_votes,
                                                                                    real_gold_questions, tmp_path):
    """The demo's method (configs/imagenet_real.yaml) in the Beam engine: matrices counted
    on the 1,135 golden questions, one pass over the shards: the same floats."""
    path, kept = real_votes
    original = labelsets.original_val_labels()
    params = {"smoothing": 1.0, "raters_without_gold": "mean",
              "original_label_rater": {"classes": ANIMAL_WNID, "present_if": {"min_yes": 2, "of": 5}}}
    expected = aggregation.aggregate(kept, "gold-confusion", original_labels=original, gold=real_gold_questions,
                                     **params)
    result = B.aggregate_sharded([path], "gold-confusion", params, str(tmp_path) + "/", original_labels=original,
                                 gold=real_gold_questions)
    merged = expected.scores_.merge(result.read_scores(), on=["file_name", "label"], suffixes=("", "_beam"))
    assert len(merged) == len(expected.scores_) == 184_962
    assert np.abs(merged["score_beam"] - merged["score"]).max() <= 1e-9  # measured: 0.0
    with np.load(sources.fetch("real_scores", download=False)) as f:
        published = pd.DataFrame({"file_name": f["info"][:, 0], "label": f["info"][:, 1].astype(np.int64),
                                  "published": f["tensor"]})
    against = published.merge(merged, on=["file_name", "label"])
    assert len(against) == len(published) and np.abs(against["score_beam"] - against["published"]).max() <= 1e-9


@pytest.mark.slow
def test_beam_dawid_skene_with_gold_equals_in_memory_on_real_votes(real_votes, real_gold_questions, tmp_path):
    """DS seeded from gold, gold truth held fixed, with the demo's pseudo-rater."""
    path, kept = real_votes
    original = labelsets.original_val_labels()
    params = {"shrinkage": 0.3, "original_label_rater": {"classes": ANIMAL_WNID, "present_if": {"min_yes": 2, "of": 5}}}
    expected = aggregation.aggregate(kept, "dawid-skene", original_labels=original, gold=real_gold_questions, **params)
    result = B.aggregate_sharded([path], "dawid-skene", params, str(tmp_path) + "/", original_labels=original,
                                 gold=real_gold_questions)
    merged = expected.scores_.merge(result.read_scores(), on=["file_name", "label"], suffixes=("", "_beam"))
    assert len(merged) == len(expected.scores_) == 184_962
    assert np.abs(merged["score_beam"] - merged["score"]).max() <= 1e-5  # the EM tolerance
    assert result.n_iter_ == expected.n_iter_


@pytest.mark.slow
def test_the_demo_with_the_beam_engine_reproduces_the_published_real_labels(shared_data, tmp_path):
    """configs/imagenet_real.yaml with stages.aggregate.engine: beam, through the
    aggregate stage: real.json's label sets and scores.npz's scores."""
    from pathlib import Path

    from pipelines import run
    from pipelines.config import load_config
    from pipelines.stages.aggregate import read_label_sets, read_scores

    configs = Path(__file__).resolve().parents[1] / "configs"
    text = (configs / "imagenet_real.yaml").read_text()
    assert "    method: gold-confusion\n" in text
    config = tmp_path / "imagenet_real_beam.yaml"
    config.write_text(text.replace("    method: gold-confusion\n", "    method: gold-confusion\n    engine: beam\n"))
    result = run.execute(load_config(config, output_dir=str(tmp_path / "out")), target="aggregate",
                         echo=lambda *a, **k: None)
    artifact = result.artifacts["label_sets"]
    assert artifact.counts["engine"] == "beam"
    published = labelsets.read_real_json(sources.fetch("real_labels", download=False))
    assert read_label_sets(artifact) == published
    with np.load(sources.fetch("real_scores", download=False)) as f:
        expected = pd.DataFrame({"file_name": f["info"][:, 0], "label": f["info"][:, 1].astype(np.int64),
                                 "published": f["tensor"]})
    merged = expected.merge(read_scores(artifact), on=["file_name", "label"])
    assert len(merged) == len(expected) and np.abs(merged["score"] - merged["published"]).max() <= 1e-12
    # The scores stay shards in the artifact, every question of an image in one shard.
    assert not artifact.file("scores.parquet").exists()
    shards = sorted(artifact.file("scores").iterdir())
    assert len(shards) == 10 and all(p.name == f"scores-{i:05d}-of-00010.parquet" for i, p in enumerate(shards))
    images = [set(pd.read_parquet(p, columns=["file_name"])["file_name"]) for p in shards]
    assert sum(map(len, images)) == len(set().union(*images))
    assert artifact.counts["questions"] == 184_962 and artifact.counts["pairs_awaiting_votes"] == 0


def test_label_sets_and_unasked_pairs_over_score_shards_equal_those_of_the_whole_table():
    from pipelines.stages.aggregate import unasked_in

    scores = pd.DataFrame({"file_name": ["a", "a", "b", "c", "c", "z"], "label": [1, 2, 4, 7, 8, 6],
                           "score": [0.95, 0.3, 0.1, 0.9, 0.85, 0.99]})
    original = pd.DataFrame({"file_name": ["a", "b", "c", "d"], "label": [1, 4, 7, 9]})
    parts = [scores.iloc[:2], scores.iloc[2:3], scores.iloc[3:]]
    whole = aggregation.label_sets(scores, original, 0.8)
    by_parts = aggregation.label_sets_of_shards(iter(parts), original, 0.8)
    assert by_parts == whole == {"a": {1}, "b": set(), "c": {7, 8}, "d": {9}, "z": {6}}
    assert list(by_parts) == list(whole) and by_parts.counts == whole.counts
    questions = pd.DataFrame({"file_name": ["a", "a", "b", "d", "c"], "label": [1, 3, 4, 9, 8]})
    assert unasked_in(questions, iter(parts)).values.tolist() == [["a", 3], ["d", 9]]
