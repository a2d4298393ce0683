"""Rater quality on gold: counts and flags by hand, the p-values against scipy.stats, the
matrices the report shows (data and HTML), and the real golden answers."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from auditing import labelsets, rater_quality, report_html, templating
from auditing import gold as gold_lib
from tests.test_aggregation import _hand_built_crowd, _votes
from tests.test_gold import real_gold, real_gold_paths, real_kept  # noqa: F401  (fixtures)
from tests.test_gold_aggregation import REAL_PARAMS


def _gold_with(raters: dict[str, list[str]], n_present: int = 20, n: int = 60) -> gold_lib.Gold:
    truth = pd.DataFrame({"file_name": [f"g{k}" for k in range(n)], "label": 0, "truth": np.arange(n) < n_present})
    rows = [(f"g{k}", 0, rater, answers[k]) for rater, answers in raters.items() for k in range(n)]
    return gold_lib.Gold.from_frames(truth, _votes(rows))


def test_counts_accuracy_and_flags():
    truthful = ["yes"] * 20 + ["no"] * 40
    hedging = ["maybe"] * 20 + ["no"] * 40  # maybe on present questions: informative, counted present
    always_no = ["no"] * 60
    coin = (["yes", "no"] * 30)  # answers unrelated to the truth
    inverted = ["no"] * 20 + ["yes"] * 40
    table = rater_quality.rater_quality(_gold_with({"t": truthful, "h": hedging, "n": always_no, "c": coin,
                                                    "i": inverted})).set_index("rater_id")
    assert table.loc["t", ["absent_no", "present_yes", "answers", "correct"]].tolist() == [40, 20, 60, 60]
    assert table.loc["h", "present_maybe"] == 20 and table.loc["h", "accuracy"] == 1.0
    assert table.loc["n", "accuracy"] == pytest.approx(40 / 60) == table.loc["n", "always_no_accuracy"]
    assert table["flagged"].to_dict() == {"t": False, "h": False, "n": True, "c": True, "i": True}
    assert table.loc["n", "chance_p"] == 1.0  # one answer only: independent of the truth
    assert table.loc["c", "no_better_than_chance"] and not table.loc["i", "no_better_than_chance"]
    assert table.loc["i", "no_better_than_always_no"]  # informative, but the wrong way round
    assert list(table.index[:2]) == ["h", "t"]  # best accuracy first (ties by id)


def test_matrices_for_report_and_their_html():
    table = rater_quality.rater_quality(_gold_with({
        "a": ["yes"] * 20 + ["no"] * 40, "b": ["no"] * 60,
        "c": ["yes"] * 15 + ["maybe"] * 5 + ["no"] * 30 + ["maybe"] * 10}))
    matrices = rater_quality.matrices_for_report(table)
    assert json.loads(json.dumps(matrices)) == matrices  # JSON-ready: report.json holds it
    assert [(m["title"], m["flagged"]) for m in matrices] == [("a: 100%", False), ("c: 83%", False),
                                                              ("b: 67%", True)]  # best accuracy first
    a, c, b = matrices
    assert a["rows"] == ["absent", "present"] and a["columns"] == ["no", "maybe", "yes"]
    assert c["counts"] == [[30, 10, 0], [0, 5, 15]] and b["counts"] == [[40, 0, 0], [20, 0, 0]]
    assert c["shares"] == [[0.75, 0.25, 0.0], [0.0, 0.25, 0.75]]  # P(answer | truth)

    section = {"id": "rater-quality", "title": "Raters", "matrices": matrices}
    html = templating.render("report/generic.html.j2", section=report_html._generic(section))
    tables = re.findall(r'<table class="matrix">\s*<caption( class="flagged")?>(.*?)</caption>(.*?)</table>',
                        html, re.S)
    assert [(title, bool(flagged)) for flagged, title, _ in tables] == [(m["title"], m["flagged"]) for m in matrices]
    for (_, _, body), m in zip(tables, matrices):
        assert re.findall(r"<th>(\w+)</th>", body) == m["columns"] + m["rows"]
        cells = re.findall(r'<td style="background:hsl\(212,80%,(\d+)%\)(;color:#fff)?">(\d+)</td>', body)
        assert [int(n) for _, _, n in cells] == [n for row in m["counts"] for n in row]
        shares = [s for row in m["shares"] for s in row]
        lightness = [int(light) for light, _, _ in cells]
        assert all((s1 > s2) == (l1 < l2) for s1, l1 in zip(shares, lightness) for s2, l2 in zip(shares, lightness))
        assert [bool(white) for _, white, _ in cells] == [s > 0.6 for s in shares]  # white on dark cells
    assert "caption.flagged { color:" in templating.render("report/style.css")


def _scipy_stats_p_values(table: pd.DataFrame) -> tuple[list[float], list[float]]:
    """Both p-values of each row of a ``rater_quality`` table, by scipy.stats itself."""
    from scipy import stats

    chance, always_no = [], []
    for counts, row in zip(rater_quality.matrices(table), table.itertuples()):
        kept = counts[:, counts.sum(axis=0) > 0]
        untestable = kept.shape[1] < 2 or (kept.sum(axis=1) == 0).any()
        chance.append(1.0 if untestable else
                      stats.chi2_contingency(kept, correction=False, lambda_="log-likelihood").pvalue)
        absent = row.answers - counts[1].sum()
        always_no.append(stats.binomtest(int(row.correct), int(row.answers), absent / row.answers,
                                         alternative="greater").pvalue if 0 < absent < row.answers else 1.0)
    return chance, always_no


def test_p_values_are_scipy_stats_on_edge_cases():
    table = rater_quality.rater_quality(_gold_with({
        "all_wrong": ["no"] * 20 + ["yes"] * 40,     # k = 0 correct
        "all_right": ["yes"] * 20 + ["no"] * 40,     # k = n correct
        "no_maybe": ["yes"] * 15 + ["no"] * 45,      # a column with zero total: 2 x 2 test
        "maybe_only_present": ["maybe"] * 10 + ["no"] * 10 + ["no"] * 38 + ["yes"] * 2,
        "one_answer": ["maybe"] * 60,                # one column: independent by construction
        "all_three": ["yes"] * 12 + ["maybe"] * 5 + ["no"] * 3 + ["no"] * 30 + ["maybe"] * 6 + ["yes"] * 4}))
    chance, always_no = _scipy_stats_p_values(table)
    np.testing.assert_allclose(table["chance_p"], chance, rtol=1e-12, atol=0)
    np.testing.assert_allclose(table["always_no_p"], always_no, rtol=1e-12, atol=0)
    by_rater = table.set_index("rater_id")
    assert by_rater.loc["all_wrong", "always_no_p"] == 1.0 and by_rater.loc["one_answer", "chance_p"] == 1.0
    assert by_rater.loc["all_right", "always_no_p"] == pytest.approx((40 / 60) ** 60, rel=1e-12)
    assert by_rater.loc["all_right", "chance_p"] < 1e-10 < by_rater.loc["all_three", "chance_p"] < 0.01


def test_drop_effect_counts_changes_in_label_sets():
    crowd = _hand_built_crowd()
    original = pd.DataFrame({"file_name": [f"img{q}" for q in range(20)], "label": range(20)})
    # Without the three truthful raters only r3 (always yes) is left: every question present.
    effect = rater_quality.drop_flagged_effect(crowd, ["r0", "r1", "r2"], original_labels=original,
                                               method="majority-vote")
    assert effect.raters_dropped == 3 and effect.votes_dropped == 60 and effect.questions_left_without_votes == 0
    assert (effect.labels_before, effect.labels_after, effect.labels_added, effect.labels_removed) == (6, 20, 14, 0)
    assert effect.images_changed == 14 and effect.empty_sets_before == 14 and effect.empty_sets_after == 0
    none = rater_quality.drop_flagged_effect(crowd, [], original_labels=original, method="majority-vote")
    assert none.images_changed == 0 and none.labels_before == none.labels_after == 6


def test_real_golden_answers(real_gold):
    table = rater_quality.rater_quality(real_gold)
    assert len(table) == 78 and (table["answers"] == 1135).all()
    assert (table["always_no_accuracy"] == 887 / 1135).all()
    # Rater 145 answers yes to 1,046 of 1,135 golden questions; 3 more are not clearly
    # above always-"no" (measured at alpha 0.01).
    assert table.loc[table["flagged"], "rater_id"].tolist() == ["116", "157", "142", "145"]
    assert table.loc[table["no_better_than_chance"], "rater_id"].tolist() == ["145"]
    chance, always_no = _scipy_stats_p_values(table)
    np.testing.assert_allclose(table["chance_p"], chance, rtol=1e-12, atol=0)
    np.testing.assert_allclose(table["always_no_p"], always_no, rtol=1e-12, atol=0)
    assert table["chance_p"].min() < 1e-100  # the tails, not only p near 1, agree
    matrices = rater_quality.matrices_for_report(table)
    assert [m["title"].split(":")[0] for m in matrices] == table["rater_id"].tolist()
    assert sum(sum(map(sum, m["counts"])) for m in matrices) == 78 * 1135
    assert [m["title"].split(":")[0] for m in matrices if m["flagged"]] == ["116", "157", "142", "145"]


@pytest.mark.slow
def test_real_drop_effect_of_flagged_raters(real_kept, real_gold):
    table = rater_quality.rater_quality(real_gold)
    effect = rater_quality.drop_flagged_effect(real_kept, table.loc[table["flagged"], "rater_id"],
                                               original_labels=labelsets.original_val_labels(),
                                               method="gold-confusion", params=REAL_PARAMS, gold=real_gold)
    assert effect.raters_dropped == 4 and effect.gold_answers_dropped == 4 * 1135
    assert effect.labels_before == 57_553 and effect.empty_sets_before == 3163
    assert effect.labels_after - effect.labels_before == effect.labels_added - effect.labels_removed
    assert effect.images_changed > 0
