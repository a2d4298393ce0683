"""The Label Studio round trip against a real server: ReaL votes replayed through it
reproduce the direct aggregation exactly, and bad answers end in a counted quarantine."""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage

from auditing import label_studio as formats
from auditing import tasks as T
from auditing import votes as V
from auditing.aggregation import DEFAULT_METHOD, aggregate
from pipelines import cli
from pipelines import label_studio as ls
from tests.headless_chromium import CHROMIUM, chromium_page
from tests.label_studio_server import ADMIN_EMAIL, ADMIN_PASSWORD, LABEL_STUDIO_BIN, login, running_server

N_IMAGES = 200  # rated images of raters.npz put through Label Studio


def test_label_config_is_xml_with_one_answer_control_per_label():
    for with_examples in (False, True):
        root = ET.fromstring(formats.label_config(with_examples))
        repeater = root.find(".//Repeater")
        assert repeater is not None and repeater.get("on") == "$labels"
        choices = repeater.find(".//Choices")
        assert choices.get("name") == "answer_{{idx}}" and choices.get("required") == "true"
        assert [c.get("alias") for c in choices.findall("Choice")] == ["yes", "maybe", "no"]
        assert choices.findall("Choice")[0].get("value") == "Yes (95% sure it is in the image)"
        assert (repeater.find(".//Image[@name='example_{{idx}}']") is not None) == with_examples


def test_an_annotators_later_answer_replaces_the_earlier_one_by_time_not_id():
    labels = [{"index": 3}, {"index": 7}]
    task = {"id": 1, "data": {"task_id": "t", "file_name": "a.JPEG", "labels": labels}, "annotations": [
        {"id": 5, "completed_by": 2, "updated_at": "2026-01-02T00:00:00Z",
         "result": [formats.answer_result(0, "no"), formats.answer_result(1, "no")]},
        {"id": 4, "completed_by": 2, "updated_at": "2026-01-03T00:00:00Z",  # edited later
         "result": [formats.answer_result(0, "yes"), formats.answer_result(1, "Maybe")]}]}
    pulled = formats.export_to_votes([task], {2: "r2"})
    assert pulled.votes[["label", "answer"]].astype(str).values.tolist() == [["3", "yes"], ["7", "maybe"]]
    assert pulled.quarantine["reason"].tolist() == [formats.REPLACED] * 2
    assert pulled.quarantine["row"].tolist() == [5, 5]


def test_every_answer_of_an_export_is_a_vote_gold_or_quarantined_with_a_reason():
    data = {"task_id": "t", "file_name": "a.JPEG", "labels": [{"index": 3}, {"index": 7}]}
    r = formats.answer_result
    export = [
        {"id": 1, "data": data, "annotations": [
            {"id": 1, "completed_by": 1, "result": [r(0, "yes"), r(0, "no"), {**r(1, "x"), "value": {"choices": ["sure"]}}]},
            {"id": 2, "completed_by": 2, "ground_truth": True, "result": [r(0, "yes"), r(1, "maybe")]},
            {"id": 3, "completed_by": 3, "was_cancelled": True, "result": [r(5, "yes")]}]},
        {"id": 2, "data": {"text": "not ours"}, "annotations": [{"id": 4, "completed_by": 1, "result": []}]},
        {"id": 3, "data": {**data, "task_id": "u"}, "annotations": []}]
    pulled = formats.export_to_votes(export, {1: "one@example.com", 2: "expert@example.com"})
    assert pulled.votes[["rater_id", "label", "answer"]].astype(str).values.tolist() == [["one@example.com", "3", "yes"]]
    assert pulled.gold.values.tolist() == [["a.JPEG", 3, 1]]
    assert sorted(pulled.quarantine["reason"]) == sorted([
        formats.DUPLICATE_ANSWER, formats.UNKNOWN_ANSWER, formats.GOLD_NOT_DECISIVE,
        formats.SKIPPED, formats.SKIPPED, formats.SKIPPED, formats.NOT_A_TASK])
    summary = pulled.summary()
    assert summary["read"] == 3 + 2 + 3 + 1 and summary["quarantined"] == 7  # per annotation: slots + extra answers
    assert set(pulled.quarantine.loc[pulled.quarantine["reason"] == formats.SKIPPED, "rater_id"]) == {
        "label-studio-user-3"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not LABEL_STUDIO_BIN.exists():
        pytest.skip(f"Label Studio is not installed ({LABEL_STUDIO_BIN} missing); `make label-studio` installs it")
    with running_server(tmp_path_factory.mktemp("label_studio")) as running:
        yield running


@pytest.fixture(scope="module")
def real_slice(shared_data, tmp_path_factory):
    """Tasks for the first N_IMAGES rated images of raters.npz, and their ReaL votes."""
    root = tmp_path_factory.mktemp("real_tasks")
    real = V.read_real_votes().kept
    images = sorted(real["file_name"].unique())[:N_IMAGES]
    sliced = real[real["file_name"].isin(images)].reset_index(drop=True)
    built = T.build_tasks(sliced[["file_name", "label"]].drop_duplicates())
    tasks_path = T.write_tasks_jsonl(built, root / "tasks.jsonl",
                                     image_uri_template="https://images.example/val/{file_name}")
    sliced[["file_name", "label", "rater_id", "answer"]].to_csv(root / "votes.csv", index=False)
    return root, tasks_path, built.questions, sliced


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["tasks", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _canonical(votes: pd.DataFrame) -> pd.DataFrame:
    columns = ["file_name", "label", "rater_id", "answer"]
    frame = votes[columns].astype({"file_name": str, "rater_id": str, "label": np.int64})
    frame["answer"] = frame["answer"].astype(str)
    return frame.sort_values(columns[:3], kind="stable").reset_index(drop=True)


def _scores(votes: pd.DataFrame) -> pd.DataFrame:
    frame = _canonical(votes).astype({"answer": V.ANSWER_DTYPE})
    scores = aggregate(frame, method=DEFAULT_METHOD).scores_
    return scores.sort_values(["file_name", "label"]).reset_index(drop=True)


@pytest.mark.slow
def test_real_votes_round_trip_through_label_studio(server, real_slice, tmp_path, capsys):
    root, tasks_path, questions, direct = real_slice
    key = ["--label-studio", server.url, "--api-key", server.api_key]
    n_tasks = questions["task_id"].nunique()

    # Push the tasks, carrying the ReaL votes in as annotations, one Label Studio user per rater.
    code, out, err = _run(capsys, "push", str(tasks_path), *key, "--project", "ReaL slice",
                          "--votes", str(root / "votes.csv"))
    assert code == 0, err
    assert f"{n_tasks:,} tasks imported, 0 already there" in out and "created" in out
    assert "(0 of its votes quarantined by the votes reader, 0 on questions of no task, 0 on tasks already" in out
    # Pushing again (a re-audit with the same tasks) adds nothing.
    code, out, err = _run(capsys, "push", str(tasks_path), *key, "--project", "ReaL slice")
    assert code == 0 and f"0 tasks imported, {n_tasks:,} already there" in out and "reused" in out

    client = ls.LabelStudioClient(server.url, server.api_key)
    project = client.find_project("ReaL slice")
    export = client.export(project["id"])
    assert len(export) == n_tasks
    assert {t["data"]["task_id"] for t in export} == set(questions["task_id"])
    first = next(t["data"] for t in export if len(t["data"]["labels"]) > 1)
    assert first["image"].startswith("https://images.example/val/ILSVRC2012_val_")
    assert all(l["name"] and l["gloss"] for l in first["labels"])
    users = {u["email"] for u in client.users()}
    assert {formats.carried_rater_email(r) for r in direct["rater_id"].unique()} <= users

    # Pull: the votes come back exactly, and aggregate to exactly the same scores.
    out_path = tmp_path / "pulled" / "votes.parquet"
    code, out, err = _run(capsys, "pull", *key, "--project", "ReaL slice", "--out", str(out_path))
    assert code == 0, err
    kept, quarantine = V.read_and_validate(out_path)
    assert quarantine.empty and kept["task_id"].notna().all() and kept["timestamp"].notna().all()
    pd.testing.assert_frame_equal(_canonical(kept), _canonical(direct))
    direct_scores, pulled_scores = _scores(direct), _scores(kept)
    assert len(direct_scores) == direct[["file_name", "label"]].drop_duplicates().shape[0]
    np.testing.assert_array_equal(pulled_scores["score"].to_numpy(), direct_scores["score"].to_numpy())
    pd.testing.assert_frame_equal(pulled_scores[["file_name", "label"]], direct_scores[["file_name", "label"]])
    # The ReaL raters' tasks were not ours: labels of our task a rater did not see are unanswered.
    joined = direct.merge(questions, on=["file_name", "label"])
    answered = joined.groupby(["task_id", "rater_id"]).size()
    size = questions.groupby("task_id").size()
    expected_unanswered = int((size.reindex(answered.index.get_level_values(0)).to_numpy() - answered.to_numpy()).sum())
    summary = json.loads(ls.sibling_paths(out_path)["summary"].read_text())
    assert summary["quarantined_by_reason"][formats.UNANSWERED] == expected_unanswered
    assert summary["quarantined"] == expected_unanswered and summary["votes"] == len(direct)
    first_pull = pd.read_parquet(out_path)

    # Bad answers through the tool, by one annotator; an expert answers one task as ground truth.
    tester = client.create_user("tester@label-audit.example")["id"]
    expert = client.create_user("expert@label-audit.example")["id"]
    by_task = {t["data"]["task_id"]: t for t in export}
    multi = [t for t in export if len(t["data"]["labels"]) >= 3]
    partial, skipped, twice, extra, gold = multi[:5]
    k = {name: len(t["data"]["labels"]) for name, t in
         zip(("partial", "skipped", "twice", "extra", "gold"), (partial, skipped, twice, extra, gold))}

    def annotate(task, answers, **fields):
        results = [formats.answer_result(p, a) for p, a in answers]
        client.request("POST", f"/api/tasks/{task['id']}/annotations", json={"result": results, **fields})

    annotate(partial, [(0, "yes")], completed_by=tester)
    annotate(skipped, [], completed_by=tester, was_cancelled=True)
    annotate(twice, [(p, "no") for p in range(k["twice"])], completed_by=tester)
    annotate(twice, [(p, "yes") for p in range(k["twice"])], completed_by=tester)
    annotate(extra, [(p, "maybe") for p in range(k["extra"] + 1)], completed_by=tester)
    annotate(gold, [(0, "yes")] + [(p, "no") for p in range(1, k["gold"])], completed_by=expert, ground_truth=True)

    code, out, err = _run(capsys, "pull", *key, "--project", "ReaL slice", "--out", str(out_path))
    assert code == 0, err
    summary = json.loads(ls.sibling_paths(out_path)["summary"].read_text())
    reasons = summary["quarantined_by_reason"]
    assert reasons[formats.UNANSWERED] == expected_unanswered + k["partial"] - 1
    assert reasons[formats.SKIPPED] == k["skipped"]
    assert reasons[formats.REPLACED] == k["twice"]
    assert reasons[formats.LABEL_NOT_IN_TASK] == 1
    assert summary["quarantined"] == sum(reasons.values())
    assert summary["read"] == summary["votes"] + summary["gold"] + summary["quarantined"]
    second_pull = pd.read_parquet(out_path)
    from_tester = second_pull[second_pull["rater_id"] == "tester@label-audit.example"]
    # Nothing else lost: every earlier vote is still there, plus the tester's valid answers.
    pd.testing.assert_frame_equal(_canonical(second_pull[second_pull["rater_id"] != "tester@label-audit.example"]),
                                  _canonical(first_pull))
    assert len(from_tester) == 1 + k["twice"] + k["extra"]
    assert set(from_tester.loc[from_tester["task_id"] == twice["data"]["task_id"], "answer"]) == {"yes"}
    gold_rows = pd.read_csv(ls.sibling_paths(out_path)["gold"])
    expected_gold = [[gold["data"]["file_name"], l["index"], int(p == 0)] for p, l in enumerate(gold["data"]["labels"])]
    assert gold_rows[["file_name", "label", "truth"]].values.tolist() == expected_gold
    assert by_task[gold["data"]["task_id"]]["data"]["file_name"] not in set(
        second_pull.loc[second_pull["rater_id"] == "expert@label-audit.example", "file_name"])


@pytest.mark.slow
def test_images_from_a_folder_and_input_errors(server, real_slice, tmp_path, capsys, monkeypatch):
    root, tasks_path, questions, _ = real_slice
    key = ["--label-studio", server.url, "--api-key", server.api_key]
    folder = server.document_root / "val"
    folder.mkdir()
    file_name = questions["file_name"].iloc[0]
    (folder / file_name).write_bytes((Path(skimage.data_dir) / "chelsea.png").read_bytes())  # a real photo
    code, out, err = _run(capsys, "push", str(tasks_path), *key, "--project", "from a folder",
                          "--image-folder", str(folder), "--document-root", str(server.document_root),
                          "--example-url-template", "https://images.example/examples/{wnid}.jpg")
    assert code == 0, err
    client = ls.LabelStudioClient(server.url, server.api_key)
    task = next(t for t in client.export(client.find_project("from a folder")["id"])
                if t["data"]["file_name"] == file_name)
    assert task["data"]["image"] == f"/data/local-files/?d=val/{file_name}"
    assert task["data"]["labels"][0]["example"].startswith("https://images.example/examples/n")
    assert client.send("GET", task["data"]["image"]).content == (folder / file_name).read_bytes()

    # The same project as a config section names it (the key from the environment).
    target = ls.LabelStudioProject(url=server.url, project="from a folder", api_key_env="TEST_LABEL_STUDIO_KEY",
                                   image_folder=str(folder), document_root=str(server.document_root),
                                   example_url_template="https://images.example/examples/{wnid}.jpg")
    monkeypatch.delenv("TEST_LABEL_STUDIO_KEY", raising=False)
    with pytest.raises(ls.LabelStudioError, match=r"\$TEST_LABEL_STUDIO_KEY is not set"):
        target.client()
    monkeypatch.setenv("TEST_LABEL_STUDIO_KEY", server.api_key)
    pushed = target.push(tasks_path)
    assert not pushed.created_project and pushed.tasks_imported == 0 and pushed.tasks_already_there == pushed.tasks_read
    pulled, paths = target.pull(tmp_path / "target" / "votes.parquet")
    assert pulled.votes.empty and paths["votes"].exists() and paths["gold"].exists()

    # Input errors: one line on stderr, exit 2.
    cases = [
        ("push", str(tmp_path / "missing.jsonl"), *key),
        ("pull", *key, "--project", "no such project", "--out", str(tmp_path / "v.parquet")),
        ("pull", "--label-studio", server.url, "--api-key", "not-a-token", "--project", "ReaL slice",
         "--out", str(tmp_path / "v.parquet")),
        ("pull", "--label-studio", "http://127.0.0.1:9", "--api-key", "x", "--project", "p",
         "--out", str(tmp_path / "v.parquet")),
    ]
    (tmp_path / "bad.jsonl").write_text('{"task_id": "t", "file_name": "f"}\n')
    cases.append(("push", str(tmp_path / "bad.jsonl"), *key))
    for argv in cases:
        code, out, err = _run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert "no project titled 'no such project'" in _run(capsys, *cases[1])[2]
    assert "missing field 'labels'" in _run(capsys, *cases[4])[2]


@pytest.mark.slow
def test_a_rater_answers_a_pushed_task_in_the_browser(server, real_slice, tmp_path, capsys):
    """The labelling interface works for a person: headless Chromium shows the task, clicks
    Yes for the first label and No for the others, submits, and the pull has those votes."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make system-deps` installs it)")
    pytest.importorskip("websockets", reason="drives Chromium over the DevTools protocol")
    _, tasks_path, questions, _ = real_slice
    record = next(r for r in ls.read_task_records(tasks_path) if len(r["labels"]) >= 3)
    one_task = tmp_path / "one_task.jsonl"
    one_task.write_text(json.dumps(record) + "\n")
    folder = server.document_root / "browser"
    folder.mkdir()
    (folder / record["file_name"]).write_bytes((Path(skimage.data_dir) / "chelsea.png").read_bytes())
    key = ["--label-studio", server.url, "--api-key", server.api_key]
    code, out, err = _run(capsys, "push", str(one_task), *key, "--project", "in a browser",
                          "--image-folder", str(folder), "--document-root", str(server.document_root))
    assert code == 0, err
    client = ls.LabelStudioClient(server.url, server.api_key)
    project = client.find_project("in a browser")
    (task,) = client.export(project["id"])
    k = len(record["labels"])

    session = login(server.url, ADMIN_EMAIL, ADMIN_PASSWORD)
    with chromium_page() as page:
        for name, value in session.cookies.items():
            page.call("Network.setCookie", name=name, value=value, url=server.url)
        page.call("Page.navigate", url=f"{server.url}/projects/{project['id']}/data?task={task['id']}")
        # Label Studio may re-render the task once after showing it, so the clicks are
        # repeated until the rater's answers (Yes for the first label, No for the others) hold.
        answer = f"""(() => {{
            const options = text => Array.from(document.querySelectorAll('label'))
                .filter(l => l.innerText.startsWith(text));
            const wanted = [options('Yes (95%')[0], ...options('No (95%').slice(1)];
            if (wanted.length !== {k} || !wanted[0]) return false;
            wanted.filter(l => !l.querySelector('input').checked).forEach(l => l.click());
            return wanted.every(l => l.querySelector('input').checked);
        }})()"""
        try:
            page.wait_for("Array.from(document.images).some(i => i.src.includes('/data/local-files/') && "
                          "i.complete && i.naturalWidth > 0)", 240)  # the photo, served by Label Studio
            page.wait_for(answer, 120)
            time.sleep(2)
            page.wait_for(answer, 30)
            assert page.evaluate(f"document.body.textContent.includes({json.dumps(record['labels'][1]['gloss'])})")
            page.evaluate("Array.from(document.querySelectorAll('button')).find(b => /^submit$/i.test("
                          "b.innerText.trim())).click()")
            deadline = time.monotonic() + 60
            while not client.export(project["id"])[0]["annotations"] and time.monotonic() < deadline:
                time.sleep(1)
        finally:
            page.screenshot(tmp_path / "label_studio_task.png")  # for a person looking at a failure

    out_path = tmp_path / "browser_votes.parquet"
    assert _run(capsys, "pull", *key, "--project", "in a browser", "--out", str(out_path))[0] == 0
    pulled = pd.read_parquet(out_path)
    assert pulled["rater_id"].unique().tolist() == [ADMIN_EMAIL]
    assert pulled["label"].tolist() == [l["index"] for l in record["labels"]]
    assert pulled["answer"].astype(str).tolist() == ["yes"] + ["no"] * (k - 1)


@pytest.mark.slow
def test_a_config_naming_the_project_pushes_on_run_and_pulls_on_reaudit(server, real_slice, tmp_path,
                                                                       capsys, monkeypatch):
    """stages.tasks.label_studio: `label-audit run` pushes the tasks it builds and the
    votes stage pulls every answer so far; `reaudit` finds nothing new until a rater
    answers in Label Studio, then releases the next version."""
    root, _, questions, direct = real_slice
    images = sorted(direct["file_name"].unique())[:20]
    monkeypatch.setenv("LS_TEST_KEY", server.api_key)
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    labels = V.read_real_votes().kept  # questions of these images, as the paper asked them
    asked = labels[labels["file_name"].isin(images)][["file_name", "label"]].drop_duplicates()
    from auditing import labelsets

    originals = labelsets.original_val_labels().set_index("file_name").loc[images, "label"]
    pd.DataFrame({"file_name": images, "label": originals.to_numpy()}).to_csv(tmp_path / "labels.tsv", sep="\t",
                                                                              index=False)
    proposals = asked.assign(count=1, sources=[["original"]] * len(asked))
    proposals.to_parquet(tmp_path / "proposals.parquet", index=False)
    (tmp_path / "no_votes.csv").write_text("file_name,label,rater_id,answer\n")
    config = tmp_path / "audit.yaml"
    config.write_text(f"""output_dir: out
dataset: {{original_labels: labels.tsv}}
inputs: {{proposals: proposals.parquet}}
stages:
  tasks:
    label_studio: {{url: "{server.url}", project: config round trip, api_key_env: LS_TEST_KEY,
                    image_url_template: "https://images.example/val/{{file_name}}"}}
  votes: {{paths: [no_votes.csv]}}
  aggregate: {{method: majority-vote, threshold: 0.5}}
  release: {{name: ls_round_trip, version: 1.0.0}}
""")
    assert cli.main(["run", str(config)]) == 0
    client = ls.LabelStudioClient(server.url, server.api_key)
    project = client.find_project("config round trip")
    export = client.export(project["id"])
    assert {t["data"]["file_name"] for t in export} == set(images)  # run pushed every task
    from pipelines import release

    assert release.released_versions(tmp_path / "out", "ls_round_trip") == ["1.0.0"]
    assert cli.main(["reaudit", str(config)]) == 3  # nobody answered: nothing new
    # A rater answers one task "yes" to every label in the browser's stead (the API).
    task = export[0]
    results = [formats.answer_result(p, "yes") for p in range(len(task["data"]["labels"]))]
    client.request("POST", f"/api/tasks/{task['id']}/annotations", json={"result": results})
    assert cli.main(["reaudit", str(config)]) == 0
    assert release.released_versions(tmp_path / "out", "ls_round_trip") == ["1.0.0", "2.0.0"]
    table = release.read_release(tmp_path / "out" / "tfds" / "ls_round_trip" / "2.0.0").set_index("file_name")
    answered = task["data"]["file_name"]
    assert set(table.loc[answered, "real_label"]) == {l["index"] for l in task["data"]["labels"]}
