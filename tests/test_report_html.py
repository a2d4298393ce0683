"""auditing.report_html on Jinja2 (autoescape, data-driven sections), the published models
against the unbiased oracle on all 50,000 images, and the sample figures' pure functions."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from auditing import labelsets, report_html
from auditing import report as audit_report
from auditing.metrics import LabelSetArray
from auditing.predictions import Predictions, load_predictions, read_class_folder_top1

# SOURCES.md: ReaL accuracy of the ImageNet-X models and of the label_errors model.
PUBLISHED_REAL = {"ResNet50": 0.8296, "ViT": 0.8399, "DINO": 0.8280, "SimCLR": 0.7565, "label_errors": 0.7761}


@pytest.fixture(scope="module")
def published_report(shared_data):
    sets = labelsets.read_real_json(shared_data / "reassessed_imagenet" / "real.json")
    original = labelsets.read_label_tsv(shared_data / "derived" / "imagenet_val_labels_by_filename.tsv")
    predictions = {m: load_predictions(shared_data / "imagenetx_predictions" / f"{m}.csv")
                   for m in ("ResNet50", "ViT", "DINO", "SimCLR")}
    errors = shared_data / "label_errors"
    predictions["label_errors"] = read_class_folder_top1(
        errors / "imagenet_val_set_pyx_argmax_predicted_labels.npy",
        errors / "imagenet_val_set_index_to_filepath.json")
    names, labels, label_sets, _ = audit_report.align_inputs(sets, original, 1000)
    return audit_report.jsonable(audit_report.build_report(names, labels, label_sets, predictions))


def test_published_models_against_the_oracle_on_all_images(published_report):
    comparison = published_report["oracle_comparison"]
    assert comparison["classes_with_oracle"] == 1000
    assert round(comparison["oracle_class_mean_accuracy"], 4) == 0.9111
    models = comparison["models"]
    assert {m: round(v["real_accuracy"], 4) for m, v in models.items()} == PUBLISHED_REAL
    # Every model beats the oracle on some classes (the paper's Figure 6: the labelling bias),
    # the better models on more of them; none beats it on average.
    beating = {m: v["classes_beating_oracle"] for m, v in models.items()}
    assert beating == {"ResNet50": 139, "ViT": 157, "DINO": 146, "SimCLR": 47, "label_errors": 106}
    assert all(v["class_mean_accuracy_on_oracle_images"] < comparison["oracle_class_mean_accuracy"]
               for v in models.values())
    for name, v in models.items():
        assert v["classes_beating_oracle"] == published_report["models"][name]["classes_beating_oracle"]
        assert 0 <= v["most_affected_classes_beating_oracle"] <= comparison["most_affected_classes"]


def test_page_shows_the_oracle_comparison_and_extra_sections_in_place(published_report):
    report = dict(published_report)
    report["sections"] = [
        report_html.table_section("awaiting", "Awaiting votes", ["pairs", "images"], [[3_001, 120]],
                                  ["count", "count"], text="Pairs proposed that no rater answered yet.",
                                  after="models"),
        {"id": "raters", "title": "Rater <quality>", "tables": [
            {"columns": ["rater", "accuracy on gold"], "rows": [["r<1>", 0.875]], "formats": ["text"]}]},
    ]
    html = report_html.render_html(report)
    titles = re.findall(r"<h2>(.*?)</h2>", html)
    assert titles[:4] == ["Summary", "Models", "Awaiting votes", "Models against the unbiased oracle"]
    assert titles[-1] == "Rater &lt;quality&gt;"  # no 'after': at the end (no model zoo, no examples here)
    assert "<td class=\"num\">3,001</td>" in html and "r&lt;1&gt;" in html and "<td>0.875</td>" in html
    assert "13.9%" in html  # ResNet50 beats the oracle on 139 of 1,000 classes
    with pytest.raises(ValueError, match="'after' must be one of"):
        report_html.render_html({**report, "sections": [{"id": "x", "title": "x", "after": "nowhere"}]})
    with pytest.raises(ValueError, match="one format per column"):
        report_html.table_section("x", "x", ["a"], [[1]], ["percent"])


def test_every_printed_value_is_escaped(shared_data):
    sets = {"a.JPEG": [0, 1], "b.JPEG": [2]}
    original = {"a.JPEG": 0, "b.JPEG": 2}
    names, labels, label_sets, _ = audit_report.align_inputs(sets, original, 1000)
    predictions = {"<img src=x onerror=alert(1)>": Predictions(file_names=np.array(["a.JPEG", "b.JPEG"]),
                                                                top1=np.array([0, 2]))}
    report = audit_report.jsonable(audit_report.build_report(
        names, labels, label_sets, predictions, extra_summary={"note": "<b>bold</b> & more"}))
    html = report_html.render_html(report)
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in html


def test_proposal_quality_and_pool_sets_on_a_hand_case():
    proposals = pd.DataFrame({
        "file_name": ["a", "a", "a", "b", "b", "c"],
        "label": [0, 1, 2, 3, 4, 5],
        "sources": [["m:logits", "original"], ["m:probs", "n:top1"], ["n:logits"], ["original"],
                    ["m:top1"], ["original"]]})
    sets = audit_report.pool_label_sets(proposals, ["a", "b", "c"], 10)
    assert {k: v.to_sets() for k, v in sets.items()} == {
        "m": [frozenset({0, 1}), frozenset({4}), frozenset()],
        "n": [frozenset({1, 2}), frozenset(), frozenset()],
        "pooled": [frozenset({0, 1, 2}), frozenset({3, 4}), frozenset({5})]}
    real = LabelSetArray.from_sets([[0, 7], [4], []], 10)  # c has an empty set: left out
    table = audit_report.proposal_quality_table(sets, real)
    assert (table["m"]["n_hits"], table["m"]["recall"], table["m"]["precision"]) == (2, 2 / 3, 2 / 3)
    assert (table["pooled"]["n_proposed"], table["pooled"]["precision"]) == (5, 2 / 5)
    paper = audit_report.question_sets(pd.DataFrame({"file_name": ["a", "z"], "label": [7, 1]}),
                                       ["a", "b", "c"], np.array([0, 3, 5]), 10)
    assert paper.to_sets() == [frozenset({0, 7}), frozenset({3}), frozenset({5})]


def test_sample_accuracy_beside_published_and_full_validation_figures(shared_data):
    from pipelines.report import local_model_zoo

    sets = labelsets.read_real_json(shared_data / "reassessed_imagenet" / "real.json")
    original = labelsets.read_label_tsv(shared_data / "derived" / "imagenet_val_labels_by_filename.tsv")
    sample = sorted(p.name for p in (shared_data / "imagenet_val_sample" / "images").iterdir())
    names, labels, label_sets, _ = audit_report.align_inputs({n: sets[n] for n in sample}, original, 1000)
    resnet = load_predictions(shared_data / "imagenetx_predictions" / "ResNet50.csv")
    published = audit_report.published_accuracy(local_model_zoo())
    assert published["efficientnet-lite0"] == pytest.approx({"original_top1": 0.74846, "real_top1": 0.81957})
    assert published["efficientnet-lite2"] == pytest.approx({"original_top1": 0.7747, "real_top1": 0.84111})
    table = audit_report.sample_accuracy(names, labels, label_sets, {"ResNet50": resnet},
                                         full_sets=sets, full_original=original.set_index("file_name")["label"],
                                         published=published)
    entry = table["ResNet50"]
    assert (entry["n_images"], entry["n_real_images"]) == (1300, 1300 - 57)
    assert round(entry["full_val_top1"], 4) == 0.7613 and round(entry["full_val_real"], 4) == 0.8296
    assert entry["full_val_source"] == "computed on 50,000 images"
    top1 = pd.Series(resnet.top1, index=resnet.file_names).loc[names].to_numpy()
    assert entry["top1"] == pytest.approx(np.mean(top1 == labels))


def test_suspected_label_errors_show_as_thumbnails_with_a_note(shared_data):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, format="JPEG")
    sets = {"a.JPEG": [0, 1], "b.JPEG": [2]}
    names, labels, label_sets, _ = audit_report.align_inputs(sets, {"a.JPEG": 0, "b.JPEG": 2}, 1000)
    report = audit_report.jsonable(audit_report.build_report(names, labels, label_sets))
    suspect = report_html.ExampleImage("b.JPEG", buffer.getvalue(), "suspected_label_error", 2, [2],
                                       note="nearest centroid: <tench>; top-1: goldfish")
    html = report_html.render_html(report, [suspect])
    assert "Suspected label errors" in html and html.count('src="data:image/jpeg;base64,') == 1
    assert "nearest centroid: &lt;tench&gt;; top-1: goldfish" in html
