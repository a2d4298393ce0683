"""pipelines.report + auditing.report_html: report.json, index.html, the CLI command."""
from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from auditing import imagenet, labelsets, report_html, sources
from auditing import report as audit_report
from auditing.metrics import LabelSetArray
from auditing.predictions import Predictions, save_predictions
from pipelines import report

WNID = re.compile(r"\bn\d{8}\b")


def _strict_json(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _visible_text(html: str) -> str:
    """The page without its data URIs (base64 could spell anything)."""
    return re.sub(r"data:[^\"']+", "", html)


def label_errors_predictions() -> Predictions:
    """The label_errors model's top-1, mapped from class-folder order to file names."""
    paths = json.loads(sources.fetch("label_errors_index", download=False).read_text())
    top1 = np.load(sources.fetch("label_errors_predictions", download=False))
    return Predictions(file_names=np.array([p.rsplit("/", 1)[1] for p in paths]),
                       top1=top1.astype(np.int64), source="label_errors")


@pytest.fixture(scope="module")
def real_report(shared_data, tmp_path_factory) -> dict[str, Path]:
    label_sets = labelsets.read_real_json(sources.fetch("real_labels", download=False))
    original = labelsets.read_label_tsv(shared_data / "derived" / "imagenet_val_labels_by_filename.tsv")
    return report.write_report(
        tmp_path_factory.mktemp("real_report"), label_sets, original,
        {"label_errors": label_errors_predictions()},
        extra_summary={"release_name": "imagenet2012_real", "release_version": "published"},
        model_zoo=report.local_model_zoo())


def test_real_labels_report_reproduces_published_numbers(real_report):
    r = _strict_json(real_report["report_json"])
    s = r["summary"]
    # Beyer et al.: 57,553 labels; 3,163 of the 50,000 images without a label.
    assert (s["images"], s["labels"], s["empty_sets"]) == (50_000, 57_553, 3_163)
    assert s["mean_set_size"] == pytest.approx(57_553 / 46_837)
    assert f"{100 * s['original_label_real_accuracy']:.2f}%" == "90.02%"
    model = r["models"]["label_errors"]
    assert f"{100 * model['original_accuracy']:.2f}" == "72.73"
    assert f"{100 * model['real_accuracy']:.2f}" == "77.61"
    assert model["n_real_images"] == 46_837 and model["strict_topk_accuracy"] is None
    assert {k: v["n_classes"] for k, v in r["subsets"].items()} == {
        "dogs": 118, "organisms": 410, "objects": 590}
    # Dogs are where the original labels are least often right (Shankar et al.).
    assert r["subsets"]["dogs"]["original_label_real_accuracy"] < \
        r["subsets"]["objects"]["original_label_real_accuracy"]

    assert sorted(r["per_class"], key=int) == [str(c) for c in range(1000)]
    desktop = next(c for c in r["per_class"].values() if c["name"] == "desktop computer")
    assert [t["name"] for t in desktop["top_cooccurring"][:2]] == ["monitor", "computer keyboard"]
    for entry in r["per_class"].values():
        assert 0 <= entry["oracle_accuracy"] <= 1
        assert all(0 < t["share"] <= 1 for t in entry["top_cooccurring"])
    # The shared data has timm's results: the zoo regression must be there.
    assert r["model_zoo"]["n_models"] > 1000


def test_real_report_html_is_self_contained_and_readable(real_report):
    html = real_report["html"].read_text()
    assert not re.search(r"<(script|link)\b", html, re.I)
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", html)
    assert html.count('src="data:image/svg+xml;base64,') >= 3
    text = _visible_text(html)
    assert "desktop computer" in text and "computer keyboard" in text and "90.02%" in text
    assert not WNID.findall(text), "people read class names, never wnids"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless Chromium is not installed (make system-deps / apt-get install chromium)")


def test_html_renders_in_headless_chromium(real_report, tmp_path):
    from PIL import Image

    png = tmp_path / "report.png"
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
               "--window-size=1280,2400", real_report["html"].resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"no screenshot; chromium said: {done.stderr[-2000:]}"
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    # Not blank: a good part of the page is ink, and it varies.
    assert (pixels < 200).mean() > 0.02 and pixels.std() > 20


def _tiny_inputs():
    label_sets = {"a.JPEG": [0, 1], "b.JPEG": [2], "c.JPEG": [], "d.JPEG": [5], "orphan.JPEG": [1]}
    original = pd.DataFrame({"file_name": ["a.JPEG", "b.JPEG", "c.JPEG", "d.JPEG", "e.JPEG"],
                             "label": [0, 3, 4, 5, 7]})
    return label_sets, original


def test_write_report_on_a_hand_case(shared_data, tmp_path):
    label_sets, original = _tiny_inputs()
    logits = np.zeros((3, 1000), np.float32)
    logits[0, [0, 1]] = [2.0, 1.0]  # a: top-1 0, top-2 {0, 1} == its set
    logits[1, 3] = 1.0  # b: top-1 3, the original label, not in {2}
    logits[2, 4] = 1.0  # c: empty set
    predictions = {
        "with logits": Predictions(file_names=np.array(["a.JPEG", "b.JPEG", "c.JPEG"]), logits=logits),
        "top-1 only": Predictions(file_names=np.array(["d.JPEG", "c.JPEG", "b.JPEG", "a.JPEG"]),
                                  top1=np.array([5, 4, 2, 1])),
    }
    paths = report.write_report(tmp_path / "out", label_sets, original, predictions,
                                extra_summary={"quarantined_rows": 2}, model_zoo=None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.html", "report.json"]
    r = _strict_json(paths["report_json"])
    s = r["summary"]
    assert (s["images"], s["labels"], s["empty_sets"], s["multi_label_images"]) == (4, 4, 1, 1)
    assert s["mean_set_size"] == pytest.approx(4 / 3)
    # original label in set: a yes, b no, d yes (c excluded) -> 2/3.
    assert s["original_label_real_accuracy"] == pytest.approx(2 / 3)
    assert s["set_size_histogram"] == {"0": 1, "1": 2, "2": 1}
    assert r["run"] == {"quarantined_rows": 2, "images_without_original_label": 1}

    with_logits = r["models"]["with logits"]
    assert (with_logits["n_images"], with_logits["n_missing"]) == (3, 1)
    assert with_logits["original_accuracy"] == 1.0  # a, b and c right
    assert with_logits["real_accuracy"] == pytest.approx(1 / 2)  # a right, b wrong
    assert with_logits["strict_topk_accuracy"] == pytest.approx(1 / 2)
    top1_only = r["models"]["top-1 only"]
    # a: 1 in {0,1}; b: 2 in {2}; d: 5 in {5} -> 3/3 ReaL; original: c and d right -> 2/4.
    assert top1_only["real_accuracy"] == 1.0 and top1_only["original_accuracy"] == 0.5
    assert top1_only["strict_topk_accuracy"] is None and top1_only["has_logits"] is False

    tench = r["per_class"]["0"]
    assert (tench["name"], tench["n_images"], tench["n_oracle_images"]) == ("tench", 1, 1)
    assert tench["oracle_accuracy"] == 0.5
    assert tench["top_cooccurring"] == [{"label": 1, "name": "goldfish", "share": 1.0}]
    assert tench["models"]["top-1 only"]["accuracy_on_oracle_images"] == 0.0
    assert r["per_class"]["999"]["oracle_accuracy"] is None
    # The oracle is beaten where the model is right more often than 1/|set|: "with logits"
    # on tench (1 vs 1/2); "top-1 only" only ties it on class 5 (d: 1 vs 1/1).
    assert [(b["label"], b["margin"]) for b in with_logits["beats_oracle"]] == [(0, 0.5)]
    assert top1_only["beats_oracle"] == [] and top1_only["classes_beating_oracle"] == 0
    assert "tench" in paths["html"].read_text()


def test_display_names_tell_apart_classes_sharing_a_first_lemma(shared_data):
    names = audit_report.display_names(imagenet.load_classes(), imagenet.load_hierarchy())
    cranes = [n for n in names if n.startswith("crane")]
    assert len(cranes) == 2 and len(set(cranes)) == 2 and "crane (wading bird)" in cranes
    assert len(set(names)) == 1000


def test_choose_examples_by_kind_deterministically():
    original = np.array([0, 1, 2, 3, 4])
    sets = LabelSetArray.from_sets([[0, 1], [2], [], [3, 4], [4]], 5)
    available = np.array([True, True, True, True, False])
    chosen = report_html.choose_examples(original, sets, available, per_kind=4)
    assert chosen == [(0, "several_objects"), (3, "several_objects"),
                      (1, "original_not_in_set"), (2, "empty_set")]
    assert chosen == report_html.choose_examples(original, sets, available, per_kind=4)
    assert len(report_html.choose_examples(original, sets, available, per_kind=1)) == 3


def _jpeg(color) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_example_images_are_inlined_with_their_labels(shared_data, tmp_path):
    label_sets, original = _tiny_inputs()
    images = {"a.JPEG": _jpeg((200, 30, 30)), "b.JPEG": _jpeg((30, 200, 30)), "c.JPEG": b"not an image"}
    paths = report.write_report(tmp_path, label_sets, original, example_images=images)
    html = paths["html"].read_text()
    assert html.count('src="data:image/jpeg;base64,') == 2  # the unreadable one is left out
    assert "Several classes present" in html and "Original label not in the set" in html
    assert "goldfish" in html  # a's set {tench, goldfish}


def test_report_refuses_predictions_for_other_images(shared_data, tmp_path):
    label_sets, original = _tiny_inputs()
    stranger = Predictions(file_names=np.array(["zzz.JPEG"]), top1=np.array([0]), source="p.npz")
    with pytest.raises(report.ReportInputError, match="p.npz.*share no file name"):
        report.write_report(tmp_path, label_sets, original, {"m": stranger})
    assert not any(tmp_path.iterdir())


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return report.main(parser.parse_args(argv))


def test_cli_on_real_json_tsv_and_npz(shared_data, tmp_path, capsys):
    names = labelsets.imagenet_val_file_names(3)
    (tmp_path / "real.json").write_text("[[65, 66], [], [970]]")
    (tmp_path / "original.tsv").write_text("file_name\tlabel\n" + "".join(
        f"{n}\t{label}\n" for n, label in zip(names, [65, 970, 970])))
    save_predictions(tmp_path / "m.npz", Predictions(file_names=np.array(names),
                                                     top1=np.array([66, 1, 970])))
    assert _run_cli(["--labels", str(tmp_path / "real.json"), "--original-labels",
                     str(tmp_path / "original.tsv"), "--predictions", f"m={tmp_path / 'm.npz'}",
                     "--no-model-zoo", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "ReaL accuracy of the original labels: 100.00%" in printed
    assert "m: original 33.33%, ReaL 100.00%" in printed
    r = _strict_json(tmp_path / "out" / "report.json")
    assert r["per_class"]["65"]["top_cooccurring"][0]["label"] == 66
    with pytest.raises(SystemExit):
        _run_cli(["--labels", "x", "--predictions", "no-equals-sign", "--out", "o"])


def test_cli_takes_original_labels_from_the_tfds_wheel(shared_data, tmp_path, capsys):
    # Validation images 1-3 are labelled 65 (sea snake), 970 (alp), 230 (Shetland sheepdog).
    (tmp_path / "real.json").write_text("[[65], [970, 795], [231]]")
    assert _run_cli(["--labels", str(tmp_path / "real.json"), "--original-labels", "tfds-wheel",
                     "--no-model-zoo", "--out", str(tmp_path)]) == 0
    assert "ReaL accuracy of the original labels: 66.67%" in capsys.readouterr().out
    with pytest.raises(report.ReportInputError, match="no original labels: pass --original-labels"):
        _run_cli(["--labels", str(tmp_path / "real.json"), "--out", str(tmp_path)])


def _write_tiny_release(data_dir: Path) -> Path:
    """A TFDS release with the features of ours (array_record, no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    class TinyAudit(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "file_name": tfds.features.Text(),
                "original_label": tfds.features.ClassLabel(num_classes=1000),
                "real_label": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=1000)),
            }))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            rows = [("x1.JPEG", 5, [5, 7]), ("x2.JPEG", 7, []), ("x3.JPEG", 9, [8])]
            for name, label, labels in rows:
                yield name, {"file_name": name, "original_label": label, "real_label": labels}

    with tfds.core.registered.skip_registration():
        builder = TinyAudit(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)


def test_reads_a_tfds_release_by_feature_names(tmp_path):
    version_dir = _write_tiny_release(tmp_path / "tfds")
    for path in (version_dir, version_dir.parent):  # a version folder, or the latest version
        sets, original = report.read_label_sets(path)
        assert sets == {"x1.JPEG": frozenset({5, 7}), "x2.JPEG": frozenset(), "x3.JPEG": frozenset({8})}
        assert original.sort_values("file_name")["label"].tolist() == [5, 7, 9]
    with pytest.raises(report.ReportInputError, match="not a TFDS dataset folder"):
        report.read_label_sets(tmp_path)


def test_report_shows_example_images_stored_in_a_release(tmp_path, shared_data):  # class names
    from models.sample_photos import photo_path
    from pipelines import release
    from pipelines.beam_options import make_options

    names = ["camera.png", "coffee.png", "chelsea.png"]
    scores = pd.DataFrame({"file_name": names, "label": [872, 967, 281], "score": [0.99, 0.95, 0.1]})
    sets = {"camera.png": frozenset({872}), "coffee.png": frozenset({967}), "chelsea.png": frozenset()}
    table = release.release_table(names, np.array([759, 968, 281]), sets, scores)
    table["image_path"] = [str(photo_path(n.split(".")[0])) for n in names]
    path = release.write_release(tmp_path / "rel", "photo_report", "1.0.0", table,
                                 release_notes={"1.0.0": "x"}, manifest={}, counts={},
                                 options=make_options("direct"))
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    assert report.main(parser.parse_args(["--labels", str(path), "--out", str(tmp_path / "rep"),
                                          "--no-model-zoo"])) == 0
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "coffee.png" in html and html.count("data:image/jpeg") >= 2


@pytest.mark.parametrize("value", [
    {"nested": {"a": [np.int64(3), np.float32(0.5), np.inf, float("nan")]}, "p": Path("x/y"),
     "flag": np.bool_(True), "array": np.arange(3), "set_like": (1, 2)},
    # Keys the C encoder refuses or spells unlike str(): these take the Python walk.
    {True: 1, None: np.float32("nan"), (1, 2): [np.int64(3)], 1.5: "x", float("inf"): [np.inf]},
], ids=["encoder", "walk"])
def test_jsonable_gives_what_the_python_walk_gives(value):
    from auditing.report import _jsonable_walk, jsonable

    assert jsonable(value) == _jsonable_walk(value)
    json.dumps(jsonable(value), allow_nan=False)  # strictly JSON
