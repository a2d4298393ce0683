"""The audit report as one self-contained HTML page (plots and images inlined).

``render_html(report, examples)`` is a pure function of the ``report.json`` dict
(``auditing.report.build_report``) and optional example images: no file is read or
written but the Jinja2 templates (``auditing/templates/report/``, autoescaped), plots
are drawn with matplotlib's object API (no pyplot state) and embedded as base64 SVG,
images as base64 JPEG thumbnails, so the page opens from disk in any browser. People
read class names (first WordNet lemma), never bare wnids.

The page is a list of sections. Besides the built-in ones, any stage can add its own
as data, in ``report["sections"]`` (so it is in report.json too), a list of dicts::

    {"id": "rater-quality", "title": "Rater quality on gold questions",
     "after": "models",                      # optional: the section it follows
     "text": "one paragraph",                # optional, plain text
     "cards": [{"label": ..., "value": ..., "note": ...}],          # optional
     "tables": [{"columns": [...], "rows": [[...], ...],            # optional
                 "formats": ["text", "count", "pct", "pct1", "fixed"], "caption": ...}],
     "matrices": [{"title": ..., "flagged": False, "rows": [...], "columns": [...],  # optional:
                   "counts": [[...], ...], "shares": [[...], ...]}],  # cells shaded by share in [0, 1]
     "images": [{"uri": "data:image/png;base64,...", "alt": "what it shows"}]}  # optional

Built-in section ids, in page order: summary, models, oracle_comparison, plots,
cooccurrence, beats_oracle, model_zoo, examples. ``table_section`` builds such a dict.
"""
from __future__ import annotations

import base64
import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from auditing import templating
from auditing.metrics import LabelSetArray
from auditing.templating import count, fixed, pct, thumbnail_uri

# Model colours (Tableau 10); the oracle and the original labels get neutral ones.
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac"]
ORACLE_COLOR = "#222222"
ORIGINAL_COLOR = "#8c8c8c"
THUMBNAIL_SIDE = 224
EXAMPLE_KINDS = {
    "several_objects": "Several classes present",
    "original_not_in_set": "Original label not in the set",
    "empty_set": "No label kept",
    "suspected_label_error": "Suspected label errors: neither the nearest class centroid nor any model's "
                             "top-1 is the original label",
}


@dataclasses.dataclass(frozen=True)
class ExampleImage:
    """One image to show, with its labels (class indices)."""

    file_name: str
    data: bytes
    kind: str
    original_label: int
    label_set: list[int]
    note: str | None = None  # one line shown under the labels (e.g. what the models said)


def choose_examples(original: np.ndarray, label_sets: LabelSetArray, available: np.ndarray,
                    per_kind: int = 4, seed: int = 0) -> list[tuple[int, str]]:
    """Up to ``per_kind`` images (index, kind) of each kind in ``EXAMPLE_KINDS`` among the
    ``available`` ones, drawn at random with a fixed seed (the same report every run)."""
    sizes = label_sets.sizes
    in_set = label_sets.contains(original)
    kinds = {
        "several_objects": (sizes >= 2) & in_set,
        "original_not_in_set": (sizes >= 1) & ~in_set,
        "empty_set": sizes == 0,
    }
    rng = np.random.default_rng(seed)
    chosen = []
    for kind, mask in kinds.items():
        candidates = np.flatnonzero(mask & np.asarray(available, dtype=bool))
        picked = rng.choice(candidates, size=min(per_kind, len(candidates)), replace=False)
        chosen += [(int(i), kind) for i in np.sort(picked)]
    return chosen


# ---------------------------------------------------------------------------------
# Helpers.


def _figure_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "label-audit", "svg.fonttype": "path"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# Margins (inches: left, bottom, right, top) around the axes of the report's plots: what
# constrained layout gives them (tick labels and axis labels, plus a 3/72 in pad), fixed.
# Constrained layout measures every text on each save (~0.1 s a plot); the page's plots
# have the same labels every run, and the tight crop on saving still takes in anything
# that reaches past these margins (wider tick labels, a longer legend).
MARGINS = (0.73, 0.47, 0.042, 0.042)


def _new_figure(width: float, height: float,
                margins: tuple[float, float, float, float] | None = None) -> tuple[Figure, Any]:
    """A Figure with one Axes: placed at ``margins`` (inches) if given, else by
    constrained layout."""
    if margins is None:
        fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
        ax = fig.subplots()
    else:
        left, bottom, right, top = margins
        fig = Figure(figsize=(width, height), dpi=100)
        ax = fig.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height))
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax


def _model_colors(report: Mapping[str, Any]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(report["models"])}


def _percent_axis(ax: Any, axis: str = "y") -> None:
    formatter = matplotlib.ticker.PercentFormatter(xmax=1.0, decimals=0)
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(formatter)


# ---------------------------------------------------------------------------------
# Plots.


def _class_values(report: Mapping[str, Any], pick) -> np.ndarray:
    values = [pick(entry) for entry in report["per_class"].values()]
    return np.array([v for v in values if v is not None], dtype=np.float64)


def plot_class_curves(report: Mapping[str, Any]) -> str:
    """Sorted per-class accuracy of each model against the unbiased oracle's curve."""
    fig, ax = _new_figure(11.0, 4.4, MARGINS)
    oracle = np.sort(_class_values(report, lambda e: e["oracle_accuracy"]))[::-1]
    for name, color in _model_colors(report).items():
        curve = np.sort(_class_values(
            report, lambda e: e["models"][name]["accuracy_on_oracle_images"]))[::-1]
        ax.plot(np.arange(len(curve)), curve, color=color, linewidth=1.8, label=name)
    ax.plot(np.arange(len(oracle)), oracle, color=ORACLE_COLOR, linestyle="--", linewidth=1.6,
            label="unbiased oracle")
    ax.set_xlabel("classes, sorted by accuracy")
    ax.set_ylabel("accuracy vs original label")
    _percent_axis(ax)
    ax.set_xlim(0, max(len(oracle) - 1, 1))
    ax.legend(frameon=False, loc="lower left")
    return _figure_uri(fig)


def plot_subsets(report: Mapping[str, Any]) -> str:
    """ReaL (solid) and original (light) accuracy per class subset, per model."""
    groups = ["all"] + list(report["subsets"])
    series: list[tuple[str, list[float | None], str, float]] = [
        ("original labels, ReaL", [report["summary"]["original_label_real_accuracy"]] +
         [s["original_label_real_accuracy"] for s in report["subsets"].values()], ORIGINAL_COLOR, 1.0)]
    for name, color in _model_colors(report).items():
        model = report["models"][name]
        for key, label, alpha in (("real_accuracy", "ReaL", 1.0), ("original_accuracy", "original", 0.45)):
            series.append((f"{name}, {label}", [model[key]] +
                           [model["subsets"][g][key] for g in groups[1:]], color, alpha))
    # Room below for the legend's rows, above for the half of the top tick label.
    fig, ax = _new_figure(11.0, 3.8, (MARGINS[0], 1.144, MARGINS[2], 0.094))
    width = 0.8 / len(series)
    for i, (label, values, color, alpha) in enumerate(series):
        x = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x, heights, width=width * 0.92, color=color, alpha=alpha, label=label)
    ax.set_xticks(np.arange(len(groups)), groups)
    finite = [v for _, values, _, _ in series for v in values if v is not None]
    ax.set_ylim(max(0.0, min(finite, default=0.0) - 0.1), 1.0)
    _percent_axis(ax)
    ax.set_ylabel("accuracy")
    ax.legend(frameon=False, fontsize=9, ncols=min(len(series), 3), loc="upper center",
              bbox_to_anchor=(0.5, -0.1))
    return _figure_uri(fig)


def plot_set_sizes(report: Mapping[str, Any]) -> str:
    histogram = {int(k): v for k, v in report["summary"]["set_size_histogram"].items()}
    sizes = np.arange(0, max(histogram, default=0) + 1)
    counts = np.array([histogram.get(int(s), 0) for s in sizes])
    fig, ax = _new_figure(7.0, 3.4, (0.775, *MARGINS[1:]))  # image counts: wider tick labels
    bars = ax.bar(sizes, counts, color=[ORIGINAL_COLOR] + [PALETTE[0]] * (len(sizes) - 1))
    ax.bar_label(bars, labels=[f"{c:,}" if c else "" for c in counts], fontsize=7, padding=2)
    ax.set_xticks(sizes)
    ax.set_xlabel("labels in the set (0 = no label kept)")
    ax.set_ylabel("images")
    return _figure_uri(fig)


def plot_model_zoo(zoo: Mapping[str, Any]) -> str:
    points = np.asarray(zoo["points"], dtype=np.float64)
    fig, ax = _new_figure(8.0, 4.6, (0.642, *MARGINS[1:]))
    ax.scatter(points[:, 0], points[:, 1], s=6, color=PALETTE[0], alpha=0.45, linewidths=0,
               label=f"{zoo['n_models']} models")
    styles = {"lower_half": (PALETTE[1], "lower half"), "upper_half": (PALETTE[3], "upper half")}
    for key, (color, label) in styles.items():
        fit = zoo["fits"][key]
        x = np.array(fit["original_range"])
        ax.plot(x, fit["slope"] * x + fit["intercept"], color=color, linewidth=2,
                label=f"{label}: slope {fit['slope']:.2f}")
    lo, hi = points.min(), points.max()
    ax.plot([lo, hi], [lo, hi], color="#bbbbbb", linestyle=":", linewidth=1, label="y = x")
    ax.set_xlabel("accuracy, original labels")
    ax.set_ylabel("ReaL accuracy")
    _percent_axis(ax, "x")
    _percent_axis(ax, "y")
    ax.legend(frameon=False, loc="lower right")
    return _figure_uri(fig)


# ---------------------------------------------------------------------------------
# Sections: the data each template under templates/report/ shows.

SECTION_ORDER = ("summary", "models", "oracle_comparison", "plots", "cooccurrence", "beats_oracle",
                 "model_zoo", "examples")
FORMATS = ("text", "count", "pct", "pct1", "fixed")


def _display_names(report: Mapping[str, Any]) -> dict[int, str]:
    """Class index -> the name people read (``display_name`` tells apart the classes that
    share a first lemma, e.g. the bird and the machine called crane)."""
    return {int(k): v.get("display_name") or v["name"] for k, v in report["per_class"].items()}


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [row for k, v in value.items() for row in _flatten(f"{prefix}{k}.", v)]
    return [(prefix[:-1], value)]


def _summary_section(report: Mapping[str, Any]) -> dict[str, Any]:
    s = report["summary"]
    images = max(s["images"], 1)
    cards = [
        ("images", count(s["images"]), "with a label set and an original label"),
        ("labels", count(s["labels"]), "class labels in all sets"),
        ("empty sets", count(s["empty_sets"]), f"{100 * s['empty_sets'] / images:.1f}% of images, "
                                               "excluded from ReaL accuracy"),
        ("multi-label images", count(s["multi_label_images"]),
         f"{100 * s['multi_label_images'] / images:.1f}% have 2+ labels"),
        ("mean set size", fixed(s["mean_set_size"]), "over non-empty sets"),
        ("original labels, ReaL accuracy", pct(s["original_label_real_accuracy"]),
         "original label is in the set"),
        ("unbiased oracle", pct(report["oracle"]["class_mean_accuracy"]),
         "mean class accuracy of picking a set label at random"),
    ]
    return {"template": "report/summary.html.j2",
            "cards": [{"label": label, "value": value, "note": note} for label, value, note in cards],
            "facts": _flatten("", report.get("run") or {})}


def _models_section(report: Mapping[str, Any]) -> dict[str, Any]:
    return {"template": "report/models.html.j2", "models": report["models"],
            "subsets": list(report["subsets"]), "colors": _model_colors(report)}


def _oracle_comparison_section(report: Mapping[str, Any]) -> dict[str, Any] | None:
    comparison = report.get("oracle_comparison")
    if not comparison or not comparison["models"]:
        return None
    rows = [[name, m["original_accuracy"], m["real_accuracy"], m["class_mean_accuracy_on_oracle_images"],
             m["classes_beating_oracle"], m["share_of_classes_beating_oracle"],
             m["most_affected_mean_accuracy"], m["most_affected_classes_beating_oracle"]]
            for name, m in comparison["models"].items()]
    n_affected = comparison["most_affected_classes"]
    return table_section(
        "oracle_comparison", "Models against the unbiased oracle",
        ["model", "original", "ReaL", "class mean on oracle images", "classes above oracle",
         "share of classes", f"mean on the {n_affected} most affected", "most affected above oracle"],
        rows, ["text", "pct", "pct", "pct", "count", "pct1", "pct", "count"],
        text=f"The unbiased oracle (a model picking one label of each set at random) scores "
             f"{_percent_text(comparison['oracle_class_mean_accuracy'])} class-mean accuracy against the "
             f"original labels over {comparison['classes_with_oracle']:,} classes. A model above it on a "
             "class has learned which of several present objects the original labellers picked: the "
             "labelling bias, not the image (the paper's Figure 6).")


def _percent_text(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _plots_section(report: Mapping[str, Any]) -> dict[str, Any]:
    return {"template": "report/plots.html.j2", "curves": plot_class_curves(report),
            "bars": plot_subsets(report), "sizes": plot_set_sizes(report), "subsets": report["subsets"]}


def _cooccurrence_section(report: Mapping[str, Any]) -> dict[str, Any]:
    models = list(report["models"])
    names = _display_names(report)
    rows = []
    for label in report["oracle"]["most_affected_classes"]:
        c = report["per_class"][str(label)]
        oracle = c["oracle_accuracy"]
        cells = []
        for m in models:
            acc = c["models"][m]["accuracy_on_oracle_images"]
            cells.append({"accuracy": acc, "above": acc is not None and oracle is not None and acc > oracle})
        rows.append({"name": names[label], "n_oracle_images": c["n_oracle_images"], "oracle": oracle,
                     "cells": cells, "together": [{"name": names[t["label"]], "share": t["share"]}
                                                  for t in c["top_cooccurring"]]})
    return {"template": "report/cooccurrence.html.j2", "models": models, "colors": _model_colors(report),
            "rows": rows}


def _beats_oracle_section(report: Mapping[str, Any]) -> dict[str, Any] | None:
    names = _display_names(report)
    blocks = [{"name": name, "count": m["classes_beating_oracle"],
               "rows": [{**b, "name": names[b["label"]]} for b in m["beats_oracle"]]}
              for name, m in report["models"].items() if m["beats_oracle"]]
    return {"template": "report/beats_oracle.html.j2", "blocks": blocks} if blocks else None


def _model_zoo_section(report: Mapping[str, Any]) -> dict[str, Any] | None:
    zoo = report.get("model_zoo")
    if not zoo:
        return None
    fits = zoo["fits"]
    r = fits["all"]["r"]
    caption = (
        f"Published top-1 of each model on both label sets. Least-squares slope over all models "
        f'{fits["all"]["slope"]:.2f} (r = {"n/a" if r is None else f"{r:.3f}"}); lower half by '
        f'original accuracy {fits["lower_half"]["slope"]:.2f}, upper half '
        f'{fits["upper_half"]["slope"]:.2f}: a slope below 1 means gains on the original labels '
        "carry over less to ReaL.")
    return {"template": "report/model_zoo.html.j2", "n_models": zoo["n_models"], "plot": plot_model_zoo(zoo),
            "caption": caption}


def _examples_section(report: Mapping[str, Any], examples: Sequence[ExampleImage]) -> dict[str, Any] | None:
    names = _display_names(report)
    groups = []
    for kind, title in EXAMPLE_KINDS.items():
        tiles = []
        for ex in (e for e in examples if e.kind == kind):
            uri = thumbnail_uri(ex.data, THUMBNAIL_SIDE)
            if uri is not None:
                tiles.append({"file_name": ex.file_name, "uri": uri, "original": names[ex.original_label],
                              "labels": [names[j] for j in ex.label_set], "note": ex.note})
        if tiles:
            groups.append({"title": title, "tiles": tiles})
    return {"template": "report/examples.html.j2", "groups": groups} if groups else None


def table_section(section_id: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  formats: Sequence[str] | None = None, *, text: str | None = None,
                  caption: str | None = None, after: str | None = None) -> dict[str, Any]:
    """A data-driven section (see the module docstring) holding one table; JSON-ready, so
    a stage can put it in ``report["sections"]``."""
    formats = list(formats or ["text"] * len(columns))
    if len(formats) != len(columns) or any(f not in FORMATS for f in formats):
        raise ValueError(f"section {section_id!r}: one format per column, each one of {FORMATS}")
    if any(len(row) != len(columns) for row in rows):
        raise ValueError(f"section {section_id!r}: every row needs {len(columns)} cells")
    section = {"id": section_id, "title": title, "tables": [
        {"columns": list(columns), "rows": [list(r) for r in rows], "formats": formats, "caption": caption}]}
    if text:
        section["text"] = text
    if after:
        section["after"] = after
    return section


def _generic(section: Mapping[str, Any]) -> dict[str, Any]:
    """An extra section, its tables' formats completed with "text"."""
    tables = []
    for table in section.get("tables") or []:
        formats = list(table.get("formats") or [])
        tables.append({"caption": None, **table,
                       "formats": formats + ["text"] * (len(table["columns"]) - len(formats))})
    return {"id": None, "text": None, "cards": [], "images": [], "matrices": [], **section, "tables": tables,
            "template": "report/generic.html.j2"}


def page_sections(report: Mapping[str, Any], examples: Sequence[ExampleImage] = ()) -> list[dict[str, Any]]:
    """The page's sections in order: the built-in ones, each extra section of
    ``report["sections"]`` after the one its ``after`` names (else before the examples)."""
    built = {
        "summary": _summary_section(report),
        "models": _models_section(report),
        "oracle_comparison": _generic(comparison) if (comparison := _oracle_comparison_section(report)) else None,
        "plots": _plots_section(report),
        "cooccurrence": _cooccurrence_section(report),
        "beats_oracle": _beats_oracle_section(report),
        "model_zoo": _model_zoo_section(report),
        "examples": _examples_section(report, examples),
    }
    extra: dict[str, list[dict[str, Any]]] = {}
    for section in report.get("sections") or []:
        after = section.get("after") or "model_zoo"
        if after not in built:
            raise ValueError(f"report section {section.get('id')!r}: 'after' must be one of {SECTION_ORDER}")
        extra.setdefault(after, []).append(_generic(section))
    ordered = []
    for section_id in SECTION_ORDER:
        if built[section_id] is not None:
            ordered.append(built[section_id])
        ordered.extend(extra.get(section_id, []))
    return ordered


def render_html(report: Mapping[str, Any], examples: Sequence[ExampleImage] = ()) -> str:
    """The whole page for a report dict (see ``auditing.report.build_report``)."""
    run = report.get("run") or {}
    release = " ".join(str(run[k]) for k in ("release_name", "release_version") if k in run)
    s = report["summary"]
    return templating.render(
        "report.html.j2", title=f"Label audit{': ' + release if release else ''}",
        subtitle=(f"{s['images']:,} images, {s['labels']:,} labels, {len(report['models'])} model(s). "
                  f"Generated {report['generated_at']}."),
        sections=page_sections(report, examples)) + "\n"
