"""The audit report as one self-contained HTML page (plots and images inlined).

``render_html(report, examples)`` is a pure function of the ``report.json`` dict
(``pipelines.report.build_report``) and optional example images: no file is read or
written, plots are drawn with matplotlib's object API (no pyplot state) and embedded
as base64 SVG, images as base64 JPEG thumbnails, so the page opens from disk in any
browser. People read class names (first WordNet lemma), never bare wnids.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from auditing.metrics import LabelSets

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
}


@dataclasses.dataclass(frozen=True)
class ExampleImage:
    """One image to show, with its labels (class indices)."""

    file_name: str
    data: bytes
    kind: str
    original_label: int
    label_set: list[int]


def choose_examples(original: np.ndarray, label_sets: LabelSets, available: np.ndarray,
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
# Formatting helpers.


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None, digits: int = 2) -> str:
    return "&ndash;" if value is None else f"{100 * value:.{digits}f}%"


def _fixed(value: float | None, digits: int = 3) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def _count(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _esc(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def _figure_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "label-audit", "svg.fonttype": "path"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _new_figure(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    ax = fig.subplots()
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
    fig, ax = _new_figure(11.0, 4.4)
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
    fig, ax = _new_figure(11.0, 3.8)
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
    fig, ax = _new_figure(7.0, 3.4)
    bars = ax.bar(sizes, counts, color=[ORIGINAL_COLOR] + [PALETTE[0]] * (len(sizes) - 1))
    ax.bar_label(bars, labels=[f"{c:,}" if c else "" for c in counts], fontsize=7, padding=2)
    ax.set_xticks(sizes)
    ax.set_xlabel("labels in the set (0 = no label kept)")
    ax.set_ylabel("images")
    return _figure_uri(fig)


def plot_model_zoo(zoo: Mapping[str, Any]) -> str:
    points = np.asarray(zoo["points"], dtype=np.float64)
    fig, ax = _new_figure(8.0, 4.6)
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
# Sections.


def _display_names(report: Mapping[str, Any]) -> dict[int, str]:
    """Class index -> the name people read (``display_name`` tells apart the classes that
    share a first lemma, e.g. the bird and the machine called crane)."""
    return {int(k): v.get("display_name") or v["name"] for k, v in report["per_class"].items()}


def _cards(items: Sequence[tuple[str, str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="value">{value}</div><div class="label">{_esc(label)}</div>'
        f'<div class="note">{_esc(note)}</div></div>' for label, value, note in items) + "</div>"


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [row for k, v in value.items() for row in _flatten(f"{prefix}{k}.", v)]
    return [(prefix[:-1], value)]


def _summary_section(report: Mapping[str, Any]) -> str:
    s = report["summary"]
    images = max(s["images"], 1)
    cards = [
        ("images", _count(s["images"]), "with a label set and an original label"),
        ("labels", _count(s["labels"]), "class labels in all sets"),
        ("empty sets", _count(s["empty_sets"]), f"{100 * s['empty_sets'] / images:.1f}% of images, "
                                                "excluded from ReaL accuracy"),
        ("multi-label images", _count(s["multi_label_images"]),
         f"{100 * s['multi_label_images'] / images:.1f}% have 2+ labels"),
        ("mean set size", _fixed(s["mean_set_size"]),
         "over non-empty sets"),
        ("original labels, ReaL accuracy", _pct(s["original_label_real_accuracy"]),
         "original label is in the set"),
        ("unbiased oracle", _pct(report["oracle"]["class_mean_accuracy"]),
         "mean class accuracy of picking a set label at random"),
    ]
    run = _flatten("", report.get("run") or {})
    facts = ""
    if run:
        facts = ('<table class="facts">' + "".join(
            f"<tr><th>{_esc(k)}</th><td>{_count(v)}</td></tr>" for k, v in run) + "</table>")
    return f"<section><h2>Summary</h2>{_cards(cards)}{facts}</section>"


def _models_section(report: Mapping[str, Any]) -> str:
    models = report["models"]
    if not models:
        return ('<section><h2>Models</h2><p class="muted">No model predictions were given; '
                "the page shows the labels only.</p></section>")
    subsets = list(report["subsets"])
    head = ("<tr><th>model</th><th>images</th><th>original</th><th>ReaL</th><th>multi-label</th>"
            "<th>strict top-k</th>" + "".join(f"<th>ReaL, {_esc(s)}</th>" for s in subsets) +
            "<th>classes above oracle</th></tr>")
    colors = _model_colors(report)
    rows = []
    for name, m in models.items():
        missing = f' <span class="muted">({m["n_missing"]:,} missing)</span>' if m["n_missing"] else ""
        strict = _pct(m["strict_topk_accuracy"]) if m["has_logits"] else '<span class="muted">top-1 only</span>'
        rows.append(
            f'<tr><td><span class="swatch" style="background:{colors[name]}"></span>{_esc(name)}</td>'
            f'<td class="num">{m["n_images"]:,}{missing}</td>'
            f'<td class="num">{_pct(m["original_accuracy"])}</td>'
            f'<td class="num strong">{_pct(m["real_accuracy"])}</td>'
            f'<td class="num">{_pct(m["multilabel_accuracy"])}</td><td class="num">{strict}</td>' +
            "".join(f'<td class="num">{_pct(m["subsets"][s]["real_accuracy"])}</td>' for s in subsets) +
            f'<td class="num">{m["classes_beating_oracle"]:,}</td></tr>')
    return (f'<section><h2>Models</h2><table class="data">{head}{"".join(rows)}</table>'
            '<p class="muted">original: top-1 equals the original label. ReaL: top-1 is in the '
            "label set (empty sets excluded). multi-label: ReaL correctness averaged per class "
            "(Shankar et al.). strict top-k: the top-|set| predictions equal the set. classes "
            "above oracle: classes where the model's accuracy against the original label beats "
            "a model guessing uniformly among the set's labels.</p></section>")


def _figure(alt: str, uri: str, caption: str) -> str:
    """A plot with its caption (``caption`` is trusted HTML written here)."""
    return f'<figure><img alt="{_esc(alt)}" src="{uri}"><figcaption>{caption}</figcaption></figure>'


def _plot_sections(report: Mapping[str, Any]) -> str:
    """Class-accuracy curves, subsets (bars and table) and set sizes."""
    curves = _figure(
        "sorted class accuracy", plot_class_curves(report),
        "Per-class accuracy against the original label, each curve sorted, on the images whose "
        "label set contains the original label. The dashed curve is the unbiased oracle (mean of "
        "1/|set|). A model above it on a class has learned which of several present objects the "
        "original labellers picked.")
    bars = _figure(
        "accuracy by subset", plot_subsets(report),
        "Accuracy per class subset (dogs: the 118 classes under WordNet <i>dog</i>; organisms: "
        "the classes under <i>organism</i>; objects: the rest), by original label. Grey: how "
        "often the original label itself is in the label set.")
    sizes = _figure("label set sizes", plot_set_sizes(report), "Images by label-set size.")
    return (f"<section><h2>Class accuracy against the oracle</h2>{curves}</section>"
            f"<section><h2>Subsets</h2>{bars}{_subset_table(report)}</section>"
            f"<section><h2>Label-set sizes</h2>{sizes}</section>")


def _subset_table(report: Mapping[str, Any]) -> str:
    rows = "".join(
        f'<tr><td>{_esc(name)}</td><td class="num">{s["n_classes"]:,}</td>'
        f'<td class="num">{s["n_images"]:,}</td><td class="num">{s["empty_sets"]:,}</td>'
        f'<td class="num">{s["multi_label_images"]:,}</td>'
        f'<td class="num">{_fixed(s["mean_set_size"])}</td>'
        f'<td class="num">{_pct(s["original_label_real_accuracy"])}</td>'
        f'<td class="num">{_pct(s["oracle_accuracy"])}</td></tr>'
        for name, s in report["subsets"].items())
    return ('<table class="data"><tr><th>subset</th><th>classes</th><th>images</th><th>empty sets</th>'
            "<th>multi-label images</th><th>mean set size</th><th>original label in set</th>"
            f"<th>oracle (class mean)</th></tr>{rows}</table>")


def _cooccurrence_section(report: Mapping[str, Any]) -> str:
    models = list(report["models"])
    colors = _model_colors(report)
    names = _display_names(report)
    head = ("<tr><th>class</th><th>images</th><th>oracle</th>" +
            "".join(f'<th><span class="swatch" style="background:{colors[m]}"></span>{_esc(m)}</th>'
                    for m in models) + "<th>co-occurring classes (share of images)</th></tr>")
    rows = []
    for label in report["oracle"]["most_affected_classes"]:
        c = report["per_class"][str(label)]
        oracle = c["oracle_accuracy"]
        cells = []
        for m in models:
            acc = c["models"][m]["accuracy_on_oracle_images"]
            above = acc is not None and oracle is not None and acc > oracle
            cells.append(f'<td class="num{" above" if above else ""}">{_pct(acc, 1)}</td>')
        together = ", ".join(f"{_esc(names[t['label']])} <span class=\"muted\">{100 * t['share']:.0f}%</span>"
                             for t in c["top_cooccurring"])
        rows.append(f'<tr><td>{_esc(names[label])}</td><td class="num">{c["n_oracle_images"]:,}</td>'
                    f'<td class="num">{_pct(oracle, 1)}</td>{"".join(cells)}<td>{together}</td></tr>')
    return ("<section><h2>Classes most affected by co-occurrence</h2>"
            '<p class="muted">The classes where the unbiased oracle is weakest: their images most '
            "often show other classes too. Model accuracies are against the original label on the "
            "same images; <span class=\"above\">highlighted</span> where the model beats the oracle."
            f'</p><table class="data">{head}{"".join(rows)}</table></section>')


def _beats_oracle_section(report: Mapping[str, Any]) -> str:
    blocks = []
    names = _display_names(report)
    for name, m in report["models"].items():
        if not m["beats_oracle"]:
            continue
        rows = "".join(
            f'<tr><td>{_esc(names[b["label"]])}</td><td class="num">{b["n_images"]:,}</td>'
            f'<td class="num">{_pct(b["model_accuracy"], 1)}</td>'
            f'<td class="num">{_pct(b["oracle_accuracy"], 1)}</td>'
            f'<td class="num strong">+{100 * b["margin"]:.1f}</td></tr>' for b in m["beats_oracle"])
        blocks.append(
            f"<details><summary>{_esc(name)}: above the oracle on {m['classes_beating_oracle']:,} "
            f"classes (largest margins)</summary><table class=\"data\"><tr><th>class</th>"
            "<th>images</th><th>model</th><th>oracle</th><th>margin (points)</th></tr>"
            f"{rows}</table></details>")
    if not blocks:
        return ""
    return "<section><h2>Where models beat the oracle</h2>" + "".join(blocks) + "</section>"


def _model_zoo_section(report: Mapping[str, Any]) -> str:
    zoo = report.get("model_zoo")
    if not zoo:
        return ""
    fits = zoo["fits"]
    r = fits["all"]["r"]
    caption = (
        f"Published top-1 of each model on both label sets. Least-squares slope over all models "
        f'{fits["all"]["slope"]:.2f} (r = {"n/a" if r is None else f"{r:.3f}"}); lower half by '
        f'original accuracy {fits["lower_half"]["slope"]:.2f}, upper half '
        f'{fits["upper_half"]["slope"]:.2f}: a slope below 1 means gains on the original labels '
        "carry over less to ReaL.")
    return (f'<section><h2>Original vs ReaL accuracy across {zoo["n_models"]:,} published models'
            f'</h2>{_figure("model zoo", plot_model_zoo(zoo), caption)}</section>')


def _thumbnail_uri(data: bytes) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (UnidentifiedImageError, OSError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _examples_section(report: Mapping[str, Any], examples: Sequence[ExampleImage]) -> str:
    if not examples:
        return ""
    names = _display_names(report)
    groups = []
    for kind, title in EXAMPLE_KINDS.items():
        tiles = []
        for ex in (e for e in examples if e.kind == kind):
            uri = _thumbnail_uri(ex.data)
            if uri is None:
                continue
            labels = ", ".join(_esc(names[j]) for j in ex.label_set) or "&ndash;"
            tiles.append(f'<div class="tile"><img alt="{_esc(ex.file_name)}" src="{uri}">'
                         f'<div><b>original:</b> {_esc(names[ex.original_label])}</div>'
                         f'<div><b>set:</b> {labels}</div><div class="muted">{_esc(ex.file_name)}</div></div>')
        if tiles:
            groups.append(f'<h3>{_esc(title)}</h3><div class="gallery">{"".join(tiles)}</div>')
    return "<section><h2>Examples</h2>" + "".join(groups) + "</section>" if groups else ""


_CSS = """
:root { --ink:#1f2328; --muted:#656d76; --line:#d8dee4; --bg:#f6f8fa; --accent:#4e79a7; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
       color:var(--ink); background:#fff; }
header { background:linear-gradient(135deg,#24476b,#4e79a7); color:#fff; padding:28px 0 22px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:650; }
header p { margin:0; opacity:.85; }
main, .wrap { max-width:1180px; margin:0 auto; padding:0 24px; }
section { margin:28px 0; }
h2 { font-size:19px; margin:0 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:15px; margin:16px 0 8px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(138px,1fr)); gap:12px; }
.card { background:var(--bg); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
.card .value { font-size:24px; font-weight:650; color:var(--accent); }
.card .label { font-weight:600; }
.card .note { color:var(--muted); font-size:12px; }
table { border-collapse:collapse; }
table.data { width:100%; font-size:13.5px; margin-top:10px; }
table.data th { text-align:left; background:var(--bg); font-weight:600; }
table.data th, table.data td { padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
table.data tr:hover td { background:#fafbfc; }
table.facts { margin-top:14px; font-size:13px; }
table.facts th { text-align:left; color:var(--muted); font-weight:500; padding:2px 16px 2px 0; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.strong { font-weight:650; }
.above { background:#fde8c8; }
.muted { color:var(--muted); font-size:12.5px; }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px; }
figure { margin:0; }
figure img { max-width:100%; height:auto; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; max-width:860px; }
.row { display:flex; flex-wrap:wrap; gap:24px; align-items:flex-start; }
.row figure { flex:1 1 420px; }
details { margin:8px 0; } summary { cursor:pointer; font-weight:600; }
.gallery { display:grid; grid-template-columns:repeat(auto-fill,minmax(200px,1fr)); gap:14px; }
.tile { font-size:12.5px; } .tile img { width:100%; aspect-ratio:4/3; object-fit:cover; border-radius:6px;
              border:1px solid var(--line); }
footer { color:var(--muted); font-size:12.5px; border-top:1px solid var(--line); padding:16px 0 40px; }
"""


def render_html(report: Mapping[str, Any], examples: Sequence[ExampleImage] = ()) -> str:
    """The whole page for a report dict (see ``pipelines.report.build_report``)."""
    run = report.get("run") or {}
    release = " ".join(str(run[k]) for k in ("release_name", "release_version") if k in run)
    title = f"Label audit{': ' + release if release else ''}"
    s = report["summary"]
    subtitle = (f"{s['images']:,} images, {s['labels']:,} labels, {len(report['models'])} model(s). "
                f"Generated {report['generated_at']}.")
    body = "".join([
        _summary_section(report),
        _models_section(report),
        _plot_sections(report),
        _cooccurrence_section(report),
        _beats_oracle_section(report),
        _model_zoo_section(report),
        _examples_section(report, examples),
    ])
    footer = ("Method: Beyer et al., <i>Are we done with ImageNet?</i> (2020) for label sets, ReaL "
              "accuracy, co-occurrence and the unbiased oracle; Shankar et al., <i>Evaluating machine "
              "accuracy on ImageNet</i> (2020) for multi-label accuracy and the subsets. Every number "
              "on this page is in report.json beside it.")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
            f'<header><div class="wrap"><h1>{_esc(title)}</h1><p>{_esc(subtitle)}</p></div></header>'
            f"<main>{body}</main><footer><div class=\"wrap\">{footer}</div></footer></body></html>\n")
