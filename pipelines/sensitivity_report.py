"""The transform-sensitivity report: sensitivity.json, class_tests.csv, accidental.csv, index.html.

``build_sensitivity_report`` turns a fitted ``auditing.sensitivity.SensitivityAudit`` into
one JSON-able dict (the figures, every test with what it rests on, and a closing note
generated from them); ``render_sensitivity_html`` renders it with Jinja2 (autoescape)
into one self-contained page: per transform a bar of sensitive vs insensitive classes,
the per-model accuracy shifts with their p-values, and example images of the most
sensitive classes beside their transformed versions. Files are written through
``FileSystems`` (``pipelines.sensitivity.write_bytes``), so the folder may be a URI.
"""
from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np
import pandas as pd
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from auditing.report import jsonable
from auditing.report_html import _figure_uri, _new_figure
from pipelines.images import ImageSource, decode_image

if TYPE_CHECKING:
    from auditing.sensitivity import SensitivityAudit
    from pipelines.sensitivity import PredictionSummary, SensitivityConfig

EXAMPLE_SIDE = 160
SENSITIVE_COLOR, INSENSITIVE_COLOR, UNTESTABLE_COLOR = "#e15759", "#bab0ac", "#f1ce63"


def _class_name(names: Sequence[str] | None, label: int) -> str:
    return names[label] if names is not None and 0 <= label < len(names) else str(label)


def closing_note(model_tests: pd.DataFrame, class_counts: pd.DataFrame, accuracy: pd.DataFrame,
                 alpha: float) -> list[str]:
    """One sentence per transform saying what the figures show (nothing is assumed)."""
    lines = []
    original = accuracy[accuracy["labels"] == "original"]
    for transform, tests in model_tests.groupby("transform", sort=False):
        changes = original[original["transform"] == transform]["change"]
        lowered = int(((tests["p"] < alpha) & (tests["change"] < 0)).sum())
        raised = int(((tests["p"] < alpha) & (tests["change"] > 0)).sum())
        n = len(tests)
        if lowered == n:
            verdict = "lowers accuracy significantly for every model"
        elif lowered == 0 and raised == 0:
            verdict = "leaves accuracy unchanged at this power (no model shifts significantly)"
        else:
            verdict = f"lowers accuracy significantly for {lowered} of {n} models (raises it for {raised})"
        counts = class_counts[class_counts["transform"] == transform].iloc[0]
        lines.append(f"{transform}: {verdict}; accuracy change {changes.mean() * 100:+.1f} points on average "
                     f"({changes.min() * 100:+.1f} to {changes.max() * 100:+.1f}); "
                     f"{int(counts['sensitive'])} of {int(counts['n_classes'])} classes sensitive at p < {alpha:g}.")
    return lines


def build_sensitivity_report(audit: SensitivityAudit, candidates: pd.DataFrame, config: SensitivityConfig,
                             source: ImageSource, counts: Mapping[str, int],
                             predictions: Mapping[tuple[str, str], str], class_names: Sequence[str] | None,
                             real_labels: bool) -> dict[str, Any]:
    """Everything the page shows, JSON-able."""
    most_sensitive = {}
    for transform in audit.transforms_[1:]:
        rows = audit.most_sensitive_classes(transform, max(config.example_classes, 1))
        most_sensitive[transform] = [
            {**row, "class_name": _class_name(class_names, int(row["class"]))}
            for row in rows.to_dict("records")]
    candidates = candidates.assign(class_name=[_class_name(class_names, int(v)) for v in candidates["label"]])
    counts_by_transform = audit.class_counts_
    return jsonable({
        "dataset": {"id": source.dataset_id, "split": source.split},
        "models": audit.models_,
        "transforms": [t.describe() for t in config.transforms],
        "alpha": config.alpha, "class_test": config.class_test,
        "power": {"n_models": len(audit.models_), "n_classes": len(audit.classes_),
                  "median_images_per_class": float(np.median(audit.images_per_class_[audit.classes_])),
                  "min_models": config.min_models, "min_images_per_class": config.min_images_per_class,
                  "low_power": bool(audit.class_tests_["low_power"].any() or audit.model_tests_["low_power"].any())},
        "counts": dict(counts), "real_labels": real_labels,
        "accuracy": audit.accuracy_.to_dict("records"),
        "class_counts": counts_by_transform.to_dict("records"),
        "model_tests": audit.model_tests_.to_dict("records"),
        "most_sensitive_classes": most_sensitive,
        "accidental": {"transforms": list(config.accidental), "min_gain": config.min_gain,
                       "candidates": candidates.to_dict("records")},
        "predictions": {f"{model}|{transform}": uri for (model, transform), uri in predictions.items()},
        "closing_note": closing_note(audit.model_tests_, counts_by_transform, audit.accuracy_, config.alpha),
    })


def plot_class_counts(class_counts: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal stacked bars, one per transform: sensitive vs insensitive (vs untestable) classes."""
    names = [row["transform"] for row in class_counts]
    fig, ax = _new_figure(7.5, 0.35 * len(names) + 1.0)
    y = np.arange(len(names))
    left = np.zeros(len(names))
    for kind, color in (("sensitive", SENSITIVE_COLOR), ("insensitive", INSENSITIVE_COLOR),
                        ("untestable", UNTESTABLE_COLOR)):
        counts = np.array([row[kind] for row in class_counts], dtype=float)
        if kind == "untestable" and not counts.any():
            continue
        ax.barh(y, counts, left=left, color=color, label=kind)
        left += counts
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("classes")
    ax.legend(loc="lower right", frameon=False)
    return _figure_uri(fig)


def _png_uri(pixels: np.ndarray) -> str:
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    image.thumbnail((EXAMPLE_SIDE, EXAMPLE_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def example_images(report: Mapping[str, Any], config: SensitivityConfig, source: ImageSource,
                   summary: PredictionSummary, resolution: Any) -> list[dict[str, Any]]:
    """Per transform, one image of each of its most sensitive classes: the model's crop
    and the same crop transformed (with the image's own seed), as PNG data URIs."""
    import jax.numpy as jnp

    from models.transformed_predictor import crop_for
    from models.transforms import image_ids

    by_name = {t.name: t for t in config.transforms}
    examples = []
    for transform_name, classes in report["most_sensitive_classes"].items():
        transform = by_name[transform_name]
        for row in classes[:config.example_classes]:
            images = np.flatnonzero(summary.labels == row["class"])
            if not len(images):
                continue
            image = int(images[0])
            index = int(summary.source_index[image])
            (_, file_name, _, encoded), = source.read(index, index + 1)
            crop = crop_for(decode_image(encoded), resolution).astype(np.float32)
            key_id = int(image_ids([file_name])[0])
            batch = transform.apply_batch(jnp.asarray(crop[None]), jnp.asarray([key_id], jnp.uint32))
            examples.append({"transform": transform_name, "file_name": file_name, "class_name": row["class_name"],
                             "change": row["change"], "p": row["p"], "original": _png_uri(crop),
                             "transformed": _png_uri(np.asarray(batch[0]))})
    return examples


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Transform sensitivity: {{ r.dataset.id }}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5}td.l,th.l{text-align:left}.warn{background:#fff4e5;border-left:4px solid #f28e2b;padding:.5em 1em}
.sig{color:#c0392b;font-weight:600}figure{display:inline-block;margin:.3em;text-align:center;font-size:12px}
</style></head><body>
<h1>Transform sensitivity</h1>
<p>{{ r.counts.images_audited }} images of <code>{{ r.dataset.id }}</code>/{{ r.dataset.split }}
({{ r.counts.images_read }} read, {{ r.counts.images_quarantined }} quarantined, {{ r.counts.images_unlabelled }}
without a label), {{ r.models|length }} models, {{ r.transforms|length - 1 }} transforms;
two-sided t-tests at &alpha; = {{ r.alpha }} (per class: {{ r.class_test }} across models; per model: paired across
classes). {{ r.counts.pairs_computed }} of {{ r.counts.pairs }} (model, transform) pairs computed in this run,
the others reused.</p>
{% if r.power.low_power %}<p class="warn"><b>Low power.</b> Each per-class test rests on {{ r.power.n_models }}
models and the class's images (median {{ r.power.median_images_per_class }} per class, {{ r.power.n_classes }}
classes); below {{ r.power.min_models }} models or {{ r.power.min_images_per_class }} images per class a class
accuracy takes few values and a real shift can go undetected. Read "insensitive" as "not shown to be
sensitive".</p>{% endif %}
<h2>What was found</h2><ul>{% for line in r.closing_note %}<li>{{ line }}</li>{% endfor %}</ul>
<h2>Sensitive vs insensitive classes</h2>
<img alt="sensitive vs insensitive classes per transform" src="{{ bars }}">
<table><tr><th class="l">transform</th><th>sensitive</th><th>insensitive</th><th>of which unchanged</th>
<th>untestable</th><th>classes</th><th>models</th><th>median images / class</th><th>low-power tests</th></tr>
{% for c in r.class_counts %}<tr><td class="l">{{ c.transform }}</td><td>{{ c.sensitive }}</td><td>{{ c.insensitive }}</td>
<td>{{ c.unchanged }}</td><td>{{ c.untestable }}</td><td>{{ c.n_classes }}</td><td>{{ c.n_models }}</td><td>{{ c.median_images_per_class }}</td>
<td>{{ c.low_power_classes }}</td></tr>{% endfor %}</table>
<h2>Accuracy per model</h2>
<table><tr><th class="l">transform</th>{% for m in r.models %}<th>{{ m }}</th>{% endfor %}</tr>
{% for t in transforms %}<tr><td class="l">{{ t }}</td>{% for m in r.models %}{% set a = accuracy[(m, t)] %}
<td>{{ "%.1f"|format(a.accuracy * 100) }}%{% if t != "identity" %} ({{ "%+.1f"|format(a.change * 100) }}{% if real.get((m, t)) %};
ReaL {{ "%+.1f"|format(real[(m, t)].change * 100) }}{% endif %}){% endif %}</td>{% endfor %}</tr>{% endfor %}</table>
<p>Change in points against no transform, on the original labels{% if r.real_labels %} and on the ReaL label sets
({{ real_images }} images with a non-empty set){% endif %}.</p>
<h2>Per-model tests (paired t-test across classes)</h2>
<table><tr><th class="l">model</th><th class="l">transform</th><th>mean class accuracy without</th><th>with</th>
<th>change</th><th>t</th><th>p</th><th>classes</th><th class="l">power</th></tr>
{% for t in r.model_tests %}<tr><td class="l">{{ t.model }}</td><td class="l">{{ t.transform }}</td>
<td>{{ "%.1f"|format(t.mean_class_accuracy_without * 100) }}%</td><td>{{ "%.1f"|format(t.mean_class_accuracy_with * 100) }}%</td>
<td>{{ "%+.1f"|format(t.change * 100) }}</td><td>{{ "%.2f"|format(t.t) if t.t is not none else "&ndash;"|safe }}</td>
<td{% if t.significant %} class="sig"{% endif %}>{{ "%.3g"|format(t.p) if t.p is not none else "no change" }}</td>
<td>{{ t.n_classes }}</td><td class="l">{{ t.power_note }}</td></tr>{% endfor %}</table>
<h2>Most sensitive classes</h2>
{% for e in examples %}<figure><img alt="{{ e.file_name }}" src="{{ e.original }}"><img alt="{{ e.file_name }} {{ e.transform }}"
src="{{ e.transformed }}"><figcaption>{{ e.class_name }} &middot; {{ e.transform }}<br>accuracy
{{ "%+.0f"|format(e.change * 100) }} points, p = {{ "%.3g"|format(e.p) if e.p is not none else "n/a" }}</figcaption></figure>
{% else %}<p>No example images.</p>{% endfor %}
<h2>Possibly stored transformed</h2>
<p>Images whose original label gets at least {{ r.accidental.min_gain }} more probability (mean over models) under
{{ r.accidental.transforms|join(", ") }}: {{ r.accidental.candidates|length }} found.</p>
{% if r.accidental.candidates %}<table><tr><th class="l">image</th><th class="l">label</th><th class="l">transform</th>
<th>p(label) without</th><th>with</th><th>models gaining</th></tr>
{% for c in r.accidental.candidates[:50] %}<tr><td class="l">{{ c.file_name }}</td><td class="l">{{ c.class_name }}</td>
<td class="l">{{ c.transform }}</td><td>{{ "%.2f"|format(c.probability_without) }}</td>
<td>{{ "%.2f"|format(c.probability_with) }}</td><td>{{ c.models_gaining }}/{{ c.n_models }}</td></tr>{% endfor %}</table>{% endif %}
<h2>Transforms and seeds</h2><table><tr><th class="l">name</th><th class="l">ops</th><th>seed</th></tr>
{% for t in r.transforms %}<tr><td class="l">{{ t.name }}</td><td class="l">{{ t.ops|tojson }}</td><td>{{ t.seed }}</td></tr>{% endfor %}</table>
</body></html>
"""


def render_sensitivity_html(report: Mapping[str, Any], examples: Sequence[Mapping[str, Any]] = ()) -> str:
    """The page for ``report`` (``build_sensitivity_report``); a pure function."""
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    accuracy = {(a["model"], a["transform"]): a for a in report["accuracy"] if a["labels"] == "original"}
    real = {(a["model"], a["transform"]): a for a in report["accuracy"] if a["labels"] == "real"}
    real_images = next(iter(real.values()))["n_images"] if real else 0
    transforms = [t["name"] for t in report["transforms"]]
    return environment.from_string(_TEMPLATE).render(
        r=report, bars=plot_class_counts(report["class_counts"]), accuracy=accuracy,
        real=real, real_images=real_images, transforms=transforms, examples=examples)


def write_sensitivity_report(out_dir: str, audit: SensitivityAudit, candidates: pd.DataFrame,
                             config: SensitivityConfig, source: ImageSource, summary: PredictionSummary, *,
                             counts: Mapping[str, int], predictions: Mapping[tuple[str, str], str],
                             real_labels: bool, resolution: Any) -> tuple[str, str]:
    """Writes sensitivity.json, class_tests.csv, accidental.csv and index.html; returns
    the URIs of the JSON and the page. ``resolution``: the crop the examples show."""
    from pipelines.predict import class_names
    from pipelines.sensitivity import write_bytes

    names = class_names(len(audit.images_per_class_))
    report = build_sensitivity_report(audit, candidates, config, source, counts, predictions, names, real_labels)
    examples = example_images(report, config, source, summary, resolution)
    json_uri = write_bytes(FileSystems.join(out_dir, "sensitivity.json"),
                           (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    write_bytes(FileSystems.join(out_dir, "class_tests.csv"), audit.class_tests_.to_csv(index=False).encode())
    write_bytes(FileSystems.join(out_dir, "accidental.csv"), candidates.to_csv(index=False).encode())
    html_uri = write_bytes(FileSystems.join(out_dir, "index.html"),
                           render_sensitivity_html(report, examples).encode())
    return json_uri, html_uri
