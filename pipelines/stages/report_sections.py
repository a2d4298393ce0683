"""Report sections that other stages' artifacts add to the page (auditing/report_html.py
``report["sections"]``): rater quality on gold, expert evaluation, the audit's own
accuracy and proposal figures beside the published ones, votes still awaited."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from auditing.report_html import table_section
from pipelines.stages.base import Context, Inputs


def rater_quality_sections(ctx: Context, inputs: Inputs, sets: Mapping[str, frozenset[int]]) -> list[dict[str, Any]]:
    """Per rater on the gold questions (accuracy, flags, count matrix), and the released label sets against the experts (in-sample; k-fold when the method
    fits on gold cheaply)."""
    from auditing import expert_evaluation, rater_quality
    from pipelines.stages.votes import read_gold

    gold = read_gold(inputs["votes"]) if "votes" in inputs else None
    if gold is None or not len(gold.rater_votes):
        return []
    table = rater_quality.rater_quality(gold)
    flagged = table.loc[table["flagged"], "rater_id"].astype(str).tolist()
    rows = [[r.rater_id, int(r.answers), float(r.accuracy), float(r.always_no_accuracy), float(r.chance_p),
             "yes" if r.flagged else ""] for r in table.itertuples()]
    section = table_section(
        "rater-quality", "Rater quality on gold questions",
        ["rater", "gold answers", "accuracy", "always-no accuracy", "p (no better than chance)", "flagged"], rows,
        ["text", "count", "pct1", "pct1", "fixed", "text"], after="models",
        text=(f"{len(table)} raters answered {len(gold.questions):,} gold questions ({int(gold.questions['truth'].sum()):,} "
              f"present under '{gold.rule}'). {len(flagged)} flagged (no better than chance or than always "
              f"answering no): {', '.join(flagged) or 'none'}. 'maybe' counts as saying present. Below, each "
              "rater's answers on gold (rows: truth; columns: answer), best accuracy first, each cell "
              "shaded by P(answer | truth); flagged raters' titles in red."))
    section["matrices"] = rater_quality.matrices_for_report(table)
    cfg = ctx.config.stages.aggregate
    # The experts judge the released sets of the audited images they cover.
    # Looked up per gold image (~10^2), not the sets' ~10^5 names hashed into an isin.
    covered = gold.subset([name for name in gold.images if name in sets])
    images = len(covered.images)
    if images == 0:
        return [section]
    evaluations = [expert_evaluation.evaluate_in_sample(sets, covered, gold_fitted=cfg is not None)]
    if cfg is not None and cfg.method == "gold-confusion" and images >= 5:
        from pipelines.stages.dataset import original_labels
        from pipelines.stages.votes import read_votes

        # gold-confusion scores a question from its own votes: those on the gold images suffice.
        votes = read_votes(inputs["votes"], file_names=covered.images)
        evaluations.append(expert_evaluation.evaluate_k_fold(
            votes, covered, method=cfg.method, original_labels=original_labels(inputs["dataset"]),
            params=cfg.params, k=5, seed=0))
    rows = [[e.kind, e.description, e.precision, e.recall, e.f1] for e in evaluations]
    experts = table_section("expert-evaluation", "Label sets against the experts (gold questions)",
                            ["evaluation", "how", "precision", "recall", "F1"], rows,
                            ["text", "text", "pct1", "pct1", "pct1"], after="models",
                            text=f"{len(covered.questions):,} gold questions on {images:,} audited images. "
                                 "In-sample: the gold questions also fitted the rater matrices. "
                                 "K-fold: the matrices were fitted without the fold's images.")
    return [section, experts]


def accuracy_section(names: list[str], original: np.ndarray, sets, predictions: Mapping[str, Any],
                     published_sets: Mapping[str, frozenset[int]] | None, zoo: pd.DataFrame | None) -> dict[str, Any]:
    """Each model's top-1 and ReaL accuracy on the audited images beside the published
    full-validation figures (timm's, or computed on all images a published file covers)."""
    from auditing import labelsets
    from auditing.report import published_accuracy, sample_accuracy

    full_original = dict(zip(*labelsets.original_val_labels()[["file_name", "label"]].T.values))
    table = sample_accuracy(names, original, sets, predictions, full_sets=published_sets,
                            full_original=full_original, published=published_accuracy(zoo) if zoo is not None else None)
    rows = [[name, e["n_images"], e["top1"], e["real"], e["full_val_top1"], e["full_val_real"],
             e["full_val_source"] or ""] for name, e in table.items()]
    return table_section("sample-accuracy", "Accuracy on the audited images beside the full validation set",
                         ["model", "images", "top-1 here", "ReaL here", "full-val top-1", "full-val ReaL", "full-val from"],
                         rows, ["text", "count", "pct1", "pct1", "pct1", "pct1", "text"], after="models")


def proposal_section(names: list[str], original: np.ndarray, proposals: pd.DataFrame, questions: pd.DataFrame,
                     reference, num_classes: int) -> dict[str, Any]:
    """Recall and precision of each proposer (and of the pool, and of the paper's own
    questions) against the published ReaL sets of the audited images."""
    from auditing.report import pool_label_sets, proposal_quality_table, question_sets

    proposers = pool_label_sets(proposals, names, num_classes)
    proposers["the paper's questions"] = question_sets(questions, names, original, num_classes)
    table = proposal_quality_table(proposers, reference)
    rows = [[name, q["n_proposed"], q["recall"], q["precision"]] for name, q in table.items()]
    return table_section("proposal-quality", "Proposals against the published ReaL label sets",
                         ["proposer", "pairs proposed", "recall", "precision"], rows,
                         ["text", "count", "pct1", "pct1"], after="models",
                         text="Recall: the share of ReaL labels the proposer proposes; precision: the share of "
                              "its proposals that are ReaL labels. Images with an empty ReaL set are left out.")
