"""Transform sensitivity: which classes and models lose accuracy under an image transform.

Pure numpy/pandas + scipy.stats; no I/O. Input: the top-1 class of every model under
every transform for every image, ``top1`` (M, T, N), where transform 0 is the identity
(no transform, the baseline), plus the original labels (N,) and optionally ReaL label
sets. ``SensitivityAudit(alpha).fit(...)`` gives (fitted results end with ``_``):

- ``accuracy_``: per (model, transform, labels = original | real) the accuracy and its
  change against no transform;
- ``class_tests_``: per (transform, class) a two-sided t-test of the class's accuracies
  across models with vs without the transform (as in the seed study: 12 models, 1,000
  classes, p = 0.05), Student's independent two-sample test by default
  (``class_test="paired"``: the paired test, since the models are the same in both
  samples);
- ``class_counts_``: per transform, the number of sensitive (p < alpha, either way),
  insensitive (p >= alpha, or ``unchanged``: every model's class accuracy identical with
  and without, where t = 0 / 0 and p is NaN) and ``untestable`` classes (accuracy changed
  but no p-value: too few models for the test's degrees of freedom);
- ``model_tests_``: per (model, transform) a two-sided paired t-test across classes of
  the model's class accuracies with vs without the transform.

Every test reports what it rests on (models, classes, images per class) and
``low_power`` with its reason where that is little: fewer than ``min_models`` models, or
a class (median class, for the per-model test) with fewer than ``min_images_per_class``
images, where a class accuracy can take only a handful of values.

``accidental_transform_candidates``: images whose prediction under a transform (e.g. a
vertical flip) is much more confident in the original label than without it, i.e.
photos that were probably stored transformed (upside down) by accident.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from auditing.metrics import LabelSetArray, per_class_accuracy

CLASS_TESTS = ("independent", "paired")


def _ttest(test: str, a: np.ndarray, b: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, p, df) of scipy's two-sided t-test; NaN where both samples are constant and equal."""
    with warnings.catch_warnings():
        # Near-identical samples (class accuracies are multiples of 1 / images) are exactly
        # the case under test; scipy's precision warning would flood the log.
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        with np.errstate(invalid="ignore", divide="ignore"):
            if test == "paired":
                result = stats.ttest_rel(a, b, axis=axis)
            else:
                result = stats.ttest_ind(a, b, axis=axis)
    return (np.asarray(result.statistic, np.float64), np.asarray(result.pvalue, np.float64),
            np.broadcast_to(np.asarray(result.df, np.float64), np.shape(result.pvalue)))


@dataclasses.dataclass
class SensitivityAudit:
    """Accuracy shifts and t-tests per class and per model for each transform.

    ``alpha``: significance level of every test. ``min_models`` and
    ``min_images_per_class``: below these a test is flagged ``low_power``.
    """

    alpha: float = 0.05
    class_test: str = "independent"
    min_models: int = 10
    min_images_per_class: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.class_test not in CLASS_TESTS:
            raise ValueError(f"class_test must be one of {CLASS_TESTS}, got {self.class_test!r}")

    def fit(self, top1: np.ndarray, labels: np.ndarray, models: Sequence[str], transforms: Sequence[str],
            label_sets: LabelSetArray | None = None, num_classes: int = 1000) -> "SensitivityAudit":
        """``top1`` (M, T, N) int with ``transforms[0]`` the identity; ``labels`` (N,) original
        labels in [0, num_classes); ``label_sets``: ReaL sets of the same N images, or None."""
        top1 = np.asarray(top1, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if top1.ndim != 3 or top1.shape[:2] != (len(models), len(transforms)):
            raise ValueError(f"top1: expected shape ({len(models)}, {len(transforms)}, N), got {top1.shape}")
        if labels.shape != (top1.shape[2],):
            raise ValueError(f"labels: expected {top1.shape[2]} labels (one per image), got {labels.shape}")
        if len(labels) == 0:
            raise ValueError("no images to audit")
        if ((labels < 0) | (labels >= num_classes)).any():
            bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
            raise ValueError(f"image {bad}: original label {labels[bad]} is outside [0, {num_classes})")
        if label_sets is not None and len(label_sets) != len(labels):
            raise ValueError(f"label_sets: {len(label_sets)} sets for {len(labels)} images")
        self.models_, self.transforms_ = list(models), list(transforms)
        correct = top1 == labels  # (M, T, N)
        self.images_per_class_ = np.bincount(labels, minlength=num_classes)
        present = np.flatnonzero(self.images_per_class_ > 0)
        self.classes_ = present
        # Class-wise accuracy (M, T, classes present).
        self.class_accuracy_ = np.stack([
            np.stack([per_class_accuracy(correct[m, t], labels, num_classes)[present]
                      for t in range(len(transforms))]) for m in range(len(models))])
        self.accuracy_ = self._accuracy(top1, correct, label_sets)
        self.class_tests_ = self._class_tests()
        self.class_counts_ = self._class_counts()
        self.model_tests_ = self._model_tests()
        return self

    def _accuracy(self, top1: np.ndarray, correct: np.ndarray, label_sets: LabelSetArray | None) -> pd.DataFrame:
        rows = []
        scored = {"original": (correct, np.ones(correct.shape[2], bool))}
        if label_sets is not None:
            rated = label_sets.sizes > 0
            real = np.stack([np.stack([label_sets.contains(top1[m, t]) for t in range(top1.shape[1])])
                             for m in range(top1.shape[0])])
            scored["real"] = (real, rated)
        for kind, (hits, mask) in scored.items():
            n = int(mask.sum())
            accuracy = hits[:, :, mask].mean(axis=2) if n else np.full(hits.shape[:2], np.nan)
            for m, model in enumerate(self.models_):
                for t, transform in enumerate(self.transforms_):
                    rows.append({"model": model, "transform": transform, "labels": kind, "n_images": n,
                                 "accuracy": float(accuracy[m, t]),
                                 "change": float(accuracy[m, t] - accuracy[m, 0])})
        return pd.DataFrame(rows)

    def _power_note(self, images: float, n_models: int | None = None, median: bool = False) -> str:
        """Why a test has little power ('' when it has enough): its models, its images per class."""
        reasons = []
        if n_models is not None and n_models < self.min_models:
            reasons.append(f"{n_models} models (< {self.min_models})")
        if images < self.min_images_per_class:
            what = "median images per class" if median else "images in the class"
            reasons.append(f"{images:g} {what} (< {self.min_images_per_class})")
        return "; ".join(reasons)

    def _class_tests(self) -> pd.DataFrame:
        n_models = len(self.models_)
        frames = []
        baseline = self.class_accuracy_[:, 0]  # (M, classes)
        images = self.images_per_class_[self.classes_]
        for t, transform in enumerate(self.transforms_[1:], start=1):
            transformed = self.class_accuracy_[:, t]
            statistic, p, df = _ttest(self.class_test, baseline, transformed, axis=0)
            unchanged = (baseline == transformed).all(axis=0)
            untestable = np.isnan(p) & ~unchanged
            notes = [self._power_note(float(k), n_models) for k in images]
            frames.append(pd.DataFrame({
                "transform": transform, "class": self.classes_, "n_models": n_models, "n_images": images,
                "accuracy_without": baseline.mean(axis=0), "accuracy_with": transformed.mean(axis=0),
                "change": transformed.mean(axis=0) - baseline.mean(axis=0), "t": statistic, "df": df,
                "p": p, "unchanged": unchanged, "untestable": untestable, "sensitive": p < self.alpha,
                "low_power": [bool(n) for n in notes], "power_note": notes}))
        columns = ["transform", "class", "n_models", "n_images", "accuracy_without", "accuracy_with", "change",
                   "t", "df", "p", "unchanged", "untestable", "sensitive", "low_power", "power_note"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    def _class_counts(self) -> pd.DataFrame:
        tests = self.class_tests_
        rows = []
        for transform in self.transforms_[1:]:
            mine = tests[tests["transform"] == transform]
            sensitive = int(mine["sensitive"].sum())
            untestable = int(mine["untestable"].sum())
            rows.append({"transform": transform, "n_classes": len(mine), "sensitive": sensitive,
                         "insensitive": len(mine) - sensitive - untestable, "untestable": untestable,
                         "unchanged": int(mine["unchanged"].sum()), "alpha": self.alpha, "test": self.class_test,
                         "n_models": len(self.models_),
                         "median_images_per_class": float(np.median(mine["n_images"])) if len(mine) else 0.0,
                         "low_power_classes": int(mine["low_power"].sum())})
        return pd.DataFrame(rows)

    def _model_tests(self) -> pd.DataFrame:
        rows = []
        images = self.images_per_class_[self.classes_]
        median_images = float(np.median(images))
        n_classes = len(self.classes_)
        for m, model in enumerate(self.models_):
            baseline = self.class_accuracy_[m, 0]
            for t, transform in enumerate(self.transforms_[1:], start=1):
                transformed = self.class_accuracy_[m, t]
                statistic, p, df = _ttest("paired", baseline, transformed, axis=0)
                note = self._power_note(median_images, median=True)
                if n_classes < 2:
                    note = "; ".join(filter(None, [note, f"{n_classes} class"]))
                rows.append({"model": model, "transform": transform, "n_classes": n_classes,
                             "median_images_per_class": median_images,
                             "mean_class_accuracy_without": float(baseline.mean()),
                             "mean_class_accuracy_with": float(transformed.mean()),
                             "change": float(transformed.mean() - baseline.mean()), "t": float(statistic),
                             "df": float(df), "p": float(p), "significant": bool(p < self.alpha),
                             "low_power": bool(note), "power_note": note})
        return pd.DataFrame(rows)

    def most_sensitive_classes(self, transform: str, k: int = 5) -> pd.DataFrame:
        """The ``k`` classes whose accuracy drops most under ``transform`` among the sensitive
        ones (all classes if none is), largest drop first."""
        tests = self.class_tests_[self.class_tests_["transform"] == transform]
        if tests["sensitive"].any():
            tests = tests[tests["sensitive"]]
        return tests.sort_values(["change", "p", "class"]).head(k)


def accidental_transform_candidates(label_probability: np.ndarray, file_names: Sequence[str],
                                    labels: np.ndarray, transforms: Sequence[str], candidates: Sequence[str],
                                    min_gain: float = 0.5) -> pd.DataFrame:
    """Images that look stored transformed: under one of the ``candidates`` transforms the
    models' mean probability of the original label rises by at least ``min_gain``.

    ``label_probability`` (M, T, N): each model's softmax probability of the image's original
    label under each transform (``transforms[0]`` = identity). Sorted by gain, largest first.
    """
    label_probability = np.asarray(label_probability, dtype=np.float64)
    unknown = sorted(set(candidates) - set(transforms))
    if unknown:
        raise ValueError(f"accidental-transform candidates {unknown} are not among the transforms {list(transforms)}")
    without = label_probability[:, 0]  # (M, N)
    frames = []
    for name in candidates:
        t = list(transforms).index(name)
        with_transform = label_probability[:, t]
        gain = with_transform.mean(axis=0) - without.mean(axis=0)
        chosen = np.flatnonzero(gain >= min_gain)
        frames.append(pd.DataFrame({
            "file_name": np.asarray(file_names)[chosen], "label": np.asarray(labels)[chosen], "transform": name,
            "probability_without": without.mean(axis=0)[chosen],
            "probability_with": with_transform.mean(axis=0)[chosen], "gain": gain[chosen],
            "models_gaining": (with_transform > without).sum(axis=0)[chosen],
            "n_models": label_probability.shape[0]}))
    columns = ["file_name", "label", "transform", "probability_without", "probability_with", "gain",
               "models_gaining", "n_models"]
    found = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return found.sort_values(["gain", "file_name"], ascending=[False, True], ignore_index=True)
