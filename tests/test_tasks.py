"""Stage 4: which images go to raters, grouping labels into tasks, task files and answers."""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from auditing import sources, votes
from auditing import tasks as T
from pipelines import tasks as tasks_cli
from pipelines.stages.base import Artifact
from pipelines.stages.tasks import read_tasks, write_questions

SUNGLASS, SUNGLASSES, LAPTOP, NOTEBOOK = 836, 837, 620, 681


def toy_affinity(num_classes: int = 12) -> T.ClassAffinity:
    """Classes 0-5 form one family, 6-11 another; 0~1 and 6~7 are near-duplicates."""
    matrix = np.full((num_classes, num_classes), 1)
    matrix[:6, :6] = matrix[6:, 6:] = 5
    matrix[0, 1] = matrix[1, 0] = matrix[6, 7] = matrix[7, 6] = 9
    np.fill_diagonal(matrix, 10)
    # Show the families interleaved in "depth-first" order, so order alone cannot group them.
    dfs = np.argsort(np.array([0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]))
    return T.ClassAffinity(matrix, dfs)


def test_split_labels_groups_families_and_caps_the_size():
    affinity = toy_affinity()
    assert T.split_labels(list(range(12)), affinity, max_labels=6) == [[0, 1, 2, 3, 4, 5],
                                                                       [6, 7, 8, 9, 10, 11]]
    chunks = T.split_labels(list(range(12)), affinity, max_labels=4)
    assert sorted(map(len, chunks)) == [4, 4, 4] and sorted(sum(chunks, [])) == list(range(12))
    # 3 tasks of 4 cannot keep two families of 6 apart: one task mixes their leftovers.
    assert sum(set(c) <= set(range(6)) or set(c) <= set(range(6, 12)) for c in chunks) == 2
    assert any({0, 1} <= set(c) for c in chunks) and any({6, 7} <= set(c) for c in chunks)
    assert T.split_labels([3, 8, 1], affinity, max_labels=8) == [[1, 8, 3]]  # one task, DFS order


def hand_built_proposals() -> pd.DataFrame:
    rows = [  # file a: both models agree with the original; b: model m2 disagrees
        ("a", 1, 2, ["m1:logits", "m1:probs", "m1:top1", "m2:top1", "original"]),
        ("a", 2, 2, ["m1:logits", "m2:logits"]),
        ("b", 3, 0, ["m1:top1", "original"]),
        ("b", 4, 2, ["m2:logits", "m2:probs", "m2:top1"]),
        ("b", 5, 2, ["m1:probs", "m2:probs"]),
    ]
    return pd.DataFrame(rows, columns=["file_name", "label", "count", "sources"])


def test_images_whose_models_all_agree_with_the_original_label_are_skipped():
    proposals = hand_built_proposals()
    assert list(T.images_to_relabel(proposals)) == ["b"]
    original = pd.DataFrame({"file_name": ["a", "b"], "label": [1, 3]})
    top1 = {"m1": pd.DataFrame({"file_name": ["b", "a"], "label": [3, 1]}),
            "m2": pd.DataFrame({"file_name": ["a", "b"], "label": [1, 4]})}
    assert list(T.images_to_relabel(proposals, original, top1)) == ["b"]
    built = T.build_tasks(proposals, affinity=toy_affinity())
    assert (built.images_with_proposals, built.images_skipped, built.num_tasks) == (2, 1, 1)
    assert sorted(built.questions["label"]) == [3, 4, 5]
    # Without models (plain (file_name, label) proposals), nothing is skipped.
    assert T.build_tasks(proposals[["file_name", "label"]], affinity=toy_affinity()).images_skipped == 0
    with pytest.raises(ValueError, match="model 'm2' has no top-1 for 1 image"):
        T.images_to_relabel(proposals, original, {"m2": top1["m2"].iloc[:1]})


def test_task_ids_are_deterministic_and_depend_on_image_and_labels():
    proposals = pd.DataFrame({"file_name": ["x"] * 10 + ["y"] * 3, "label": list(range(10)) + [1, 2, 3]})
    first = T.build_tasks(proposals, max_labels=4, affinity=toy_affinity())
    again = T.build_tasks(proposals.sample(frac=1, random_state=3), max_labels=4, affinity=toy_affinity())
    pd.testing.assert_frame_equal(first.questions, again.questions)
    ids = first.questions.groupby("task_id")["file_name"].first()
    assert ids.index.is_unique and len(ids) == first.num_tasks == 4
    assert T.task_id("x", [2, 1]) == T.task_id("x", [1, 2]) != T.task_id("y", [1, 2])


def test_task_files_and_crowd_answers_join_back_by_task_id(tmp_path, shared_data):  # WordNet glosses
    proposals = pd.DataFrame({"file_name": ["img_1.JPEG"] * 11 + ["img_2.JPEG"] * 2,
                              "label": [SUNGLASS, SUNGLASSES, LAPTOP, NOTEBOOK, 1, 2, 3, 4, 5, 6, 7, 9, 10]})
    built = T.build_tasks(proposals)
    jsonl = T.write_tasks_jsonl(built, tmp_path / "tasks.jsonl", image_uri_template="gs://b/{file_name}",
                                example_uri_template="gs://b/train/{wnid}/")
    T.write_tasks_csv(built, tmp_path / "tasks.csv")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == built.num_tasks == 3
    first = records[0]["labels"][0]
    assert set(first) == {"index", "wnid", "name", "lemmas", "gloss", "examples_uri"} and first["gloss"]
    assert [o["value"] for o in records[0]["answer_options"]] == ["yes", "maybe", "no"]
    assert records[0]["image_uri"].startswith("gs://b/img_")
    csv = pd.read_csv(tmp_path / "tasks.csv")
    assert list(csv["task_id"]) == [r["task_id"] for r in records]
    assert list(csv["n_labels"]) == [len(r["labels"]) for r in records]

    # A crowd platform answers in the long vote format; auditing.votes reads it back.
    questions = T.read_tasks_jsonl(jsonl)
    rng = np.random.default_rng(0)
    answers = pd.DataFrame([
        {"task_id": q.task_id, "file_name": q.file_name, "label": q.label, "rater_id": f"r{r}",
         "answer": rng.choice(["yes", "Maybe", "no"])}
        for q in questions.itertuples() for r in range(5)])
    answers.to_csv(tmp_path / "answers.csv", index=False)
    with open(tmp_path / "answers.jsonl", "w") as f:
        f.writelines(json.dumps({**row, "label": int(row["label"])}) + "\n" for row in answers.to_dict("records"))
    for name in ("answers.csv", "answers.jsonl"):
        kept, quarantine = votes.read_and_validate(tmp_path / name)
        assert quarantine.empty and len(kept) == 5 * len(questions)
        joined = kept.merge(questions, on=["task_id", "label"], how="left", suffixes=("", "_task"),
                            validate="many_to_one")
        assert joined["position"].notna().all()
        assert (joined["file_name"] == joined["file_name_task"]).all()


def test_read_tasks_reads_the_stored_long_questions_as_the_jsonl_gives_them(tmp_path, shared_data):
    proposals = pd.DataFrame({"file_name": ["img_2.JPEG"] * 11 + ["img_1.JPEG"] * 2,
                              "label": [SUNGLASS, SUNGLASSES, LAPTOP, NOTEBOOK, 1, 2, 3, 4, 5, 6, 7, 9, 10]})
    built = T.build_tasks(proposals, max_labels=4)
    for name, tasks in (("some", built), ("none", dataclasses.replace(built, questions=built.questions.iloc[:0]))):
        folder = tmp_path / name
        folder.mkdir()
        T.write_tasks_jsonl(tasks, folder / "tasks.jsonl", image_uri_template="gs://b/{file_name}")
        artifact = Artifact("tasks", "key", folder)
        from_jsonl = read_tasks(artifact)  # a tasks artifact stored before questions.parquet was
        pd.testing.assert_frame_equal(from_jsonl, T.read_tasks_jsonl(folder / "tasks.jsonl"))
        write_questions(tasks, "gs://b/{file_name}", folder)
        (folder / "tasks.jsonl").unlink()  # read from the parquet alone
        pd.testing.assert_frame_equal(read_tasks(artifact), from_jsonl)
    assert len(from_jsonl) == 0 and len(read_tasks(Artifact("tasks", "key", tmp_path / "some"))) == 13


def paper_task_groups(raters_path) -> dict[str, list[set[int]]]:
    """The paper's tasks as far as raters.npz shows them: questions of one image answered
    by the same set of raters."""
    with np.load(raters_path) as npz:
        seen = npz["tensor"].sum(axis=2) > 0
        info = npz["info"]
    signature = np.packbits(seen.T, axis=1)
    groups: dict[str, dict[bytes, set[int]]] = collections.defaultdict(dict)
    for (file_name, label), sig in zip(info, signature):
        groups[file_name].setdefault(sig.tobytes(), set()).add(int(label))
    return {f: list(g.values()) for f, g in groups.items()}


def pair_agreement(reference: dict[str, list[set[int]]], ours: dict[str, dict[int, object]]) -> float:
    """Share of label pairs (images with > 8 labels) that both groupings put together or apart."""
    same = total = 0
    for file_name, groups in reference.items():
        if sum(map(len, groups)) <= 8:
            continue
        group_of = {label: i for i, g in enumerate(groups) for label in g}
        labels = sorted(group_of)
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                total += 1
                same += (group_of[a] == group_of[b]) == (ours[file_name][a] == ours[file_name][b])
    return same / total


def test_real_questions_become_coherent_tasks(shared_data):
    """The paper's 184,962 questions (24,889 images): tasks, near-duplicates, the paper's groups."""
    raters = sources.fetch("real_raters", download=False)
    proposals = votes.read_real_questions(raters)
    built = T.build_tasks(proposals)
    summary = T.summarize_tasks(built)
    q = built.questions
    assert summary["images_to_relabel"] == proposals["file_name"].nunique() == 24_889
    assert len(q) == len(proposals) and not q.duplicated(["file_name", "label"]).any()
    per_task = q.groupby("task_id").size()
    assert per_task.max() == 8
    # The vectorised ids are task_id's of each task's image and labels.
    labels_of = q.groupby("task_id").agg(file_name=("file_name", "first"), labels=("label", list))
    assert all(T.task_id(f, labels) == t for t, f, labels in labels_of.itertuples())
    fewest = int(np.ceil(proposals.groupby("file_name").size() / 8).sum())
    assert fewest <= summary["tasks"] <= 1.05 * fewest
    assert abs(summary["tasks"] / 37_988 - 1) < 0.15  # the paper: 37,988 tasks

    task_of = collections.defaultdict(dict)
    for task, file_name, label in q[["task_id", "file_name", "label"]].itertuples(index=False):
        task_of[file_name][label] = task
    for a, b in [(SUNGLASS, SUNGLASSES), (LAPTOP, NOTEBOOK)]:
        both = [f for f, labels in task_of.items() if a in labels and b in labels]
        split_images = [f for f in both if len(set(task_of[f].values())) > 1]
        assert len(split_images) > 100  # images where grouping had a choice to make
        assert all(task_of[f][a] == task_of[f][b] for f in both)

    # Against the paper's own grouping: better than cutting the WordNet depth-first
    # order into balanced chunks, which beats chance.
    reference = paper_task_groups(raters)
    affinity = T.imagenet_affinity()
    balanced = {}
    for file_name, labels in task_of.items():
        ordered = sorted(labels, key=lambda l: affinity.dfs_position[l])
        chunks = -(-len(ordered) // 8)
        balanced[file_name] = {l: i * chunks // len(ordered) for i, l in enumerate(ordered)}
    assert pair_agreement(reference, task_of) > pair_agreement(reference, balanced) + 0.02


def test_tasks_command_on_pipeline_proposals(tmp_path, shared_data):  # WordNet hierarchy
    proposals = hand_built_proposals().assign(file_name=lambda f: f["file_name"] + ".JPEG")
    proposals.to_parquet(tmp_path / "proposals.parquet")
    parser = argparse.ArgumentParser()
    tasks_cli.add_arguments(parser)
    args = parser.parse_args(["--proposals", str(tmp_path / "proposals.parquet"), "--out", str(tmp_path / "t")])
    assert tasks_cli.main(args) == 0
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert (summary["images_to_relabel"], summary["images_skipped_all_top1_agree"], summary["tasks"]) == (1, 1, 1)
    assert len(T.read_tasks_jsonl(tmp_path / "t" / "tasks.jsonl")) == 3


# Digests of the tasks the per-image implementation (before vectorising, commit 299e23a) built from the
# 184,962 ReaL questions: the questions table as CSV, and the two task files with these templates.
OLD_QUESTIONS_SHA256 = "5947be12dd4c9a7d5f860b4b967f8fd6b0eb6fcd2ac4a84eb81c2fdf3216ef5b"
OLD_JSONL_SHA256 = "85b91caa882db98f137f663510b611dee6570165599845613cd757562c979c66"
OLD_CSV_SHA256 = "12e80baa167196ea74c4d34a2a4155c494f0927273688464d1fc2666bc4ef488"


def test_vectorised_tasks_equal_the_per_image_implementation_on_real_questions(tmp_path, shared_data):
    built = T.build_tasks(votes.read_real_questions(sources.fetch("real_raters", download=False)))
    assert hashlib.sha256(built.questions.to_csv(index=False).encode()).hexdigest() == OLD_QUESTIONS_SHA256
    T.write_tasks_jsonl(built, tmp_path / "t.jsonl", image_uri_template="gs://b/val/{file_name}",
                        example_uri_template="gs://b/ex/{wnid}/{index}")
    T.write_tasks_csv(built, tmp_path / "t.csv", image_uri_template="gs://b/val/{file_name}")
    assert hashlib.sha256((tmp_path / "t.jsonl").read_bytes()).hexdigest() == OLD_JSONL_SHA256
    assert hashlib.sha256((tmp_path / "t.csv").read_bytes()).hexdigest() == OLD_CSV_SHA256
    # The file's lines are task_records' dicts (checked on the first 300 images' tasks).
    first = built.questions[built.questions["file_name"].isin(sorted(built.questions["file_name"].unique())[:300])]
    records = T.task_records(dataclasses.replace(built, questions=first), "gs://b/val/{file_name}",
                             example_uri_template="gs://b/ex/{wnid}/{index}")
    lines = (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines[:len(records)]] == records


def per_image_split_labels(labels, affinity, max_labels):
    """The clustering as first written (one image, np.delete per merge): the reference."""
    labels = sorted({int(l) for l in labels}, key=lambda l: affinity.dfs_position[l])
    if len(labels) <= max_labels:
        return [labels]
    target = int(np.ceil(len(labels) / max_labels))
    groups = [[l] for l in labels]
    total = affinity.matrix[np.ix_(labels, labels)].astype(np.float64)
    sizes = np.ones(len(labels))
    while len(groups) > target:
        mean = total / np.outer(sizes, sizes)
        fits = (sizes[:, None] + sizes[None, :] <= max_labels) & ~np.eye(len(groups), dtype=bool)
        if not fits.any():
            break
        i, j = np.unravel_index(np.argmax(np.where(fits, mean, -np.inf)), mean.shape)
        i, j = min(i, j), max(i, j)
        groups[i] += groups.pop(j)
        total[i, :] += total[j, :]
        total[:, i] += total[:, j]
        total = np.delete(np.delete(total, j, axis=0), j, axis=1)
        sizes[i] += sizes[j]
        sizes = np.delete(sizes, j)
    tasks = [sorted(g, key=lambda l: affinity.dfs_position[l]) for g in groups]
    return sorted(tasks, key=lambda t: affinity.dfs_position[t[0]])


def test_lockstep_clustering_matches_the_per_image_one_with_many_ties():
    rng = np.random.default_rng(7)
    num_classes = 40
    for trial in range(60):
        values = rng.integers(0, 3, (num_classes, num_classes))  # few distinct values: ties everywhere
        affinity = T.ClassAffinity(np.triu(values) + np.triu(values, 1).T, rng.permutation(num_classes))
        max_labels = int(rng.integers(2, 9))
        images = [rng.choice(num_classes, int(rng.integers(1, 30)), replace=False) for _ in range(8)]
        proposals = pd.DataFrame({"file_name": np.repeat([f"i{n}" for n in range(8)], [len(x) for x in images]),
                                  "label": np.concatenate(images)})
        built = T.build_tasks(proposals, max_labels=max_labels, affinity=affinity).questions
        for n, labels in enumerate(images):
            expected = per_image_split_labels(labels, affinity, max_labels)
            assert T.split_labels(labels, affinity, max_labels) == expected, (trial, n)
            mine = built[built["file_name"] == f"i{n}"]
            assert [list(t["label"]) for _, t in mine.groupby("task_id", sort=False)] == expected, (trial, n)
            assert all(list(t["position"]) == list(range(len(t))) for _, t in mine.groupby("task_id"))


def lca_affinity(classes, hierarchy, i: int, j: int) -> int:
    """The affinity's definition, pair by pair: depth of the deepest common ancestor."""
    common = hierarchy.lowest_common_ancestor(classes.wnids[i], classes.wnids[j])
    return 0 if common is None else hierarchy.depth(common)


def test_class_affinity_is_the_depth_of_the_deepest_common_ancestor_in_a_dag():
    from auditing.imagenet import ImageNetClasses, WordNetHierarchy

    # Two roots; "mixed" has parents on both sides (its longest path sets its depth);
    # class "a" is an ancestor of class "a1"; "lone" is not in the hierarchy.
    edges = [("root", "animal"), ("root", "thing"), ("animal", "dog"), ("thing", "tool"),
             ("tool", "hammer"), ("dog", "mixed"), ("hammer", "mixed"), ("animal", "a"), ("a", "a1"),
             ("other_root", "b"), ("dog", "pug"), ("dog", "husky"), ("tool", "saw")]
    hierarchy = WordNetHierarchy(edges, {})
    wnids = ["a", "a1", "b", "husky", "lone", "mixed", "pug", "saw"]
    classes = ImageNetClasses(wnids=wnids, names=wnids, lemmas=[f"lemma {w}" for w in wnids],
                              glosses=[""] * len(wnids))
    matrix = T.ClassAffinity.from_wordnet(classes, hierarchy).matrix
    expected = [[lca_affinity(classes, hierarchy, i, j) for j in range(len(wnids))] for i in range(len(wnids))]
    assert matrix.tolist() == expected
    assert matrix[wnids.index("mixed"), wnids.index("saw")] == 2  # via tool, the deeper shared side
    # Depth-first from the roots in wnid order ("lone" is one), children in wnid order,
    # each node once ("mixed" under dog, before hammer reaches it).
    walk = ["lone", "b", "a", "a1", "husky", "mixed", "pug", "saw"]
    assert T.ClassAffinity.from_wordnet(classes, hierarchy).dfs_position.tolist() == [walk.index(w) for w in wnids]


def test_imagenet_affinity_is_the_depth_of_the_deepest_common_ancestor(shared_data):
    from auditing.imagenet import load_classes, load_hierarchy

    classes, hierarchy = load_classes(), load_hierarchy()
    affinity = T.imagenet_affinity()
    same_lemma = set(T._classes_sharing_a_lemma(classes))
    assert affinity.matrix[SUNGLASS, SUNGLASSES] == affinity.matrix.max()  # a lemma shared up to a plural
    rng = np.random.default_rng(0)
    pairs = [(int(i), int(j)) for i, j in rng.integers(0, 1000, (3000, 2))] + [(i, i) for i in range(1000)]
    assert all(affinity.matrix[i, j] == lca_affinity(classes, hierarchy, i, j)
               for i, j in pairs if (i, j) not in same_lemma)


def test_task_summary_counts_what_grouping_the_questions_counts():
    rng = np.random.default_rng(3)
    images = [rng.choice(12, int(rng.integers(1, 12)), replace=False) for _ in range(30)]
    proposals = pd.DataFrame({"file_name": np.repeat([f"i{n:02d}" for n in range(30)][::-1], [len(x) for x in images]),
                              "label": np.concatenate(images)})
    for max_labels in (2, 3, 8):
        built = T.build_tasks(proposals, max_labels=max_labels, affinity=toy_affinity())
        q = built.questions
        per_task = q.groupby("task_id").size()
        summary = T.summarize_tasks(built)
        assert summary == {
            "images_with_proposals": 30, "images_skipped_all_top1_agree": 0,
            "images_to_relabel": q["file_name"].nunique(), "tasks": len(per_task), "questions": len(q),
            "proposals_per_image": round(len(q) / q["file_name"].nunique(), 3),
            "labels_per_task": round(float(per_task.mean()), 3),
            "images_split_into_several_tasks": int((q.groupby("file_name")["task_id"].nunique() > 1).sum()),
            "max_labels_per_task": max_labels}
        assert summary["images_split_into_several_tasks"] > 0
        # The file order build_tasks knows is the one sorting the questions gives.
        (known, known_bounds), (sorted_q, sorted_bounds) = built.in_file_order, T._sort_into_file_order(q)
        assert known.equals(sorted_q) and known.index.equals(sorted_q.index)
        assert known_bounds.tolist() == sorted_bounds.tolist()
    empty = T.build_tasks(proposals.iloc[:0], affinity=toy_affinity())
    assert T.summarize_tasks(empty)["tasks"] == T.summarize_tasks(empty)["images_to_relabel"] == 0
