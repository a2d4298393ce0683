"""Dataflow readiness without submitting: options parse into the GCP/worker/setup fields,
our real transforms build and serialise under DataflowRunner, worker processes give the
in-process result, setup.py is self-contained, and outputs do not depend on the process
that wrote them."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.options.pipeline_options import (GoogleCloudOptions, SetupOptions, StandardOptions,
                                                  WorkerOptions)

from auditing import labelsets, sources
from pipelines import cli, propose, release, run
from pipelines.beam_options import make_options
from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[1]
PROJECT, REGION, BUCKET = "label-audit-ci-1234", "europe-west4", "label-audit-ci-bucket"
ACCELERATOR = "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/beam/label-audit:0.1.0"
DATAFLOW_ARGS = [f"--project={PROJECT}", f"--region={REGION}", f"--temp_location=gs://{BUCKET}/tmp",
                 f"--staging_location=gs://{BUCKET}/staging", "--setup_file=./setup.py",
                 "--machine_type=g2-standard-8", f"--dataflow_service_options={ACCELERATOR}",
                 f"--sdk_container_image={IMAGE}", "--experiments=use_runner_v2"]
N_IMAGES = 2_000
ROWS_PER_SHARD = 250


def dataflow_options():
    return make_options("dataflow", extra_args=DATAFLOW_ARGS)


def test_dataflow_options_parse_into_gcp_worker_and_setup_fields():
    options = dataflow_options()
    gcp, worker, setup = (options.view_as(GoogleCloudOptions), options.view_as(WorkerOptions),
                          options.view_as(SetupOptions))
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert (gcp.project, gcp.region) == (PROJECT, REGION)
    assert (gcp.temp_location, gcp.staging_location) == (f"gs://{BUCKET}/tmp", f"gs://{BUCKET}/staging")
    assert gcp.dataflow_service_options == [ACCELERATOR]
    assert (worker.machine_type, worker.sdk_container_image) == ("g2-standard-8", IMAGE)
    assert setup.setup_file == "./setup.py"
    assert "use_runner_v2" in options.view_as(beam.options.pipeline_options.DebugOptions).experiments


def test_config_runner_section_reaches_the_dataflow_options(tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text("output_dir: out\nrunner: {name: dataflow, options: " + json.dumps(DATAFLOW_ARGS)
                      + "}\nstages: {aggregate: {method: dawid-skene}}\n")
    from pipelines.stages import Context
    from pipelines.store import Store

    options = Context(load_config(config), Store(tmp_path)).beam_options()  # the options every stage gets
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert options.view_as(GoogleCloudOptions).project == PROJECT
    assert options.view_as(WorkerOptions).sdk_container_image == IMAGE


# ----------------------------------------------------------------- real-ish predictions


def _label_errors_top1(file_names: list[str]) -> np.ndarray:
    """The real cross-validated model of label_errors/ (class-folder order -> file order)."""
    predictions = np.load(sources.fetch("label_errors_predictions", download=False))
    paths = json.loads(Path(sources.fetch("label_errors_index", download=False)).read_text())
    by_name = dict(zip((p.rsplit("/", 1)[1] for p in paths), predictions.astype(np.int64)))
    return np.array([by_name[n] for n in file_names])


@pytest.fixture(scope="module")
def realish_predictions(shared_data, tmp_path_factory) -> tuple[dict[str, str], pd.DataFrame]:
    """Three models on the first N_IMAGES val images: the real cross-validated model of
    label_errors (top-1 only), and two logit models built around real labels (the
    original label and that model's top-1; the ReaL label sets), with seeded noise."""
    folder = tmp_path_factory.mktemp("predictions")
    labels = labelsets.original_val_labels().head(N_IMAGES)
    names = labels["file_name"].tolist()
    top1 = _label_errors_top1(names)
    real = labelsets.read_real_json(sources.fetch("real_labels", download=False))
    rng = np.random.default_rng(7)
    a = rng.normal(size=(N_IMAGES, 1000)).astype(np.float32)
    a[np.arange(N_IMAGES), top1] += 3.0
    a[np.arange(N_IMAGES), labels["label"].to_numpy()] += 2.0
    b = rng.normal(size=(N_IMAGES, 1000)).astype(np.float32)
    for i, name in enumerate(names):
        b[i, sorted(real[name])] += 3.0
    paths = {"cv_model": folder / "cv_model.npz", "model_a": folder / "model_a.npz",
             "model_b": folder / "model_b.npz"}
    np.savez(paths["cv_model"], file_names=np.array(names), top1=top1)
    np.savez(paths["model_a"], file_names=np.array(names), logits=a)
    # Reversed rows and compressed: the sequential, image_index-free reading path.
    np.savez_compressed(paths["model_b"], file_names=np.array(names[::-1]), logits=b[::-1])
    return {k: str(v) for k, v in paths.items()}, labels


def test_real_transforms_build_and_serialise_for_dataflow_without_submitting(realish_predictions, tmp_path):
    """The propose stage (SelectModelProposals inside), PredictImages (RunInference) and
    the release's example source, in one pipeline under DataflowRunner options, convert
    to the runner API proto: every DoFn pickles and every step has its label."""
    from models.registry import get_model
    from pipelines.images import ImageFiles, ReadImageShards, plan_shards
    from pipelines.inference import PredictImages

    paths, labels = realish_predictions
    pipeline = beam.Pipeline(options=dataflow_options())
    assert type(pipeline.runner).__name__ == "DataflowRunner"
    files, file_names = propose.plan_prediction_files(paths)
    images = propose.SplitImages(file_names, labels.set_index("file_name").loc[file_names, "label"].to_numpy())
    propose.build_propose_pipeline(pipeline, files, images, Path(f"gs://{BUCKET}/propose"), n=3 * N_IMAGES,
                                   rows_per_shard=ROWS_PER_SHARD)
    photos = ImageFiles(paths=("photo.jpg",), file_names=("photo.jpg",), labels=(1,), dataset_id="photos")
    _ = (pipeline
         | "PlanShards" >> beam.Create(plan_shards(len(photos), 1))
         | "ReadImages" >> ReadImageShards(photos)
         | "PredictImages" >> PredictImages(get_model("efficientnet-lite0")))
    builder_cls = release._builder_class(  # noqa: SLF001
        "dataflow_check", "1.0.0", {"1.0.0": "check"}, "", [f"gs://{BUCKET}/rows-00000.json"], ["a", "b"])
    _ = pipeline | "ReleaseExamples" >> builder_cls._generate_examples(builder_cls)  # noqa: SLF001

    proto = pipeline.to_runner_api()
    names = {t.unique_name for t in proto.components.transforms.values()}
    for step in ("SelectModelProposals/TopNPerShard", "SelectModelProposals/MergeShardsPerModel",
                 "CollectModels", "WriteSelections", "PoolProposals", "WriteProposals",
                 "PredictImages/DecodeImages", "PredictImages/RunInference", "ReleaseExamples/ReadRows"):
        assert any(n == step or n.startswith(step + "/") for n in names), step
    # Nothing ran: no output was written anywhere.
    assert not Path(f"gs:/{BUCKET}").exists()


def _worker_pid(_: int) -> int:
    return os.getpid()


def _none_is(parent_pid: int):
    def check(pids: list[int]) -> None:
        assert parent_pid not in pids, "an element ran in the test process"
    return check


def test_direct_multiprocess_runs_in_other_processes():
    """So that the equality tests below compare worker processes with this one."""
    from apache_beam.testing.util import assert_that

    with beam.Pipeline(options=make_options("direct-multiprocess", num_workers=2)) as pipeline:
        pids = pipeline | beam.Create(range(8)) | beam.Map(_worker_pid)
        assert_that(pids, _none_is(os.getpid()))


def test_propose_in_worker_processes_equals_in_process(realish_predictions, tmp_path):
    paths, labels = realish_predictions
    outputs = {}
    for runner in ("direct", "direct-multiprocess"):
        out = propose.propose(paths, labels, tmp_path / runner, options=make_options(runner, num_workers=2),
                              rows_per_shard=ROWS_PER_SHARD)
        outputs[runner] = out
    in_process, workers = outputs["direct"], outputs["direct-multiprocess"]
    got, expected = (pd.read_parquet(d / "proposals.parquet") for d in (workers, in_process))
    assert len(expected) > N_IMAGES  # several proposals per image: the test is not vacuous
    pd.testing.assert_frame_equal(got.drop(columns="sources"), expected.drop(columns="sources"))
    assert [list(s) for s in got["sources"]] == [list(s) for s in expected["sources"]]
    with np.load(workers / "selections.npz") as a, np.load(in_process / "selections.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert json.loads((workers / "summary.json").read_text()) == json.loads(
        (in_process / "summary.json").read_text())


@pytest.fixture(scope="module")
def slice_table(real_slice, tmp_path_factory) -> pd.DataFrame:
    """The real slice audited up to the release table (no release written)."""
    from pipelines.stages import Context
    from pipelines.stages.release import release_table

    config = load_config(real_slice / "audit.yaml", output_dir=str(tmp_path_factory.mktemp("state")))
    result = run.execute(config, target="aggregate", echo=lambda *a, **k: None)
    return release_table(Context(config, result.store), result.artifacts)


def test_release_written_by_worker_processes_equals_in_process(slice_table, tmp_path):
    written = {}
    for runner in ("direct", "direct-multiprocess"):
        written[runner] = release.write_release(
            tmp_path / runner, "slice_release", "1.0.0", slice_table,
            release_notes={"1.0.0": "check"}, manifest={"content_key": "check"},
            counts={"images": len(slice_table)}, options=make_options(runner, num_workers=2))
    pd.testing.assert_frame_equal(release.read_release(written["direct-multiprocess"]),
                                  release.read_release(written["direct"]))
    for path in written.values():
        info = json.loads((path / "dataset_info.json").read_text())
        assert sum(map(int, info["splits"][0]["shardLengths"])) == len(slice_table)


def test_release_files_are_byte_identical_across_processes(real_slice, tmp_path):
    """Same inputs, two processes: the release must be the same bytes (a re-run on
    another machine, or a Dataflow worker, must reproduce a release's sha256). Fails
    while tf.Example's feature map is serialised in a per-process order by upb."""
    config = tmp_path / "audit.yaml"
    config.write_text((real_slice / "audit.yaml").read_text()
                      .replace("labels.tsv", str(real_slice / "labels.tsv"))
                      .replace("votes_first.csv", str(real_slice / "votes_first.csv")))
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(config), "--out",
                           str(tmp_path / "subprocess")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main(["run", str(config), "--out", str(tmp_path / "here")]) == 0
    first, second = (release.release_dir(tmp_path / d, "real_slice_audit", "1.0.0")
                     for d in ("subprocess", "here"))
    records = sorted(p.name for p in first.glob("*.array_record-*"))
    assert records
    for name in records:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_gs_output_dir_is_written_there_never_to_a_local_gs_folder(real_slice, tmp_path, monkeypatch, gcs_bucket):
    """README's Dataflow config sets ``output_dir: gs://...``: every output goes to the
    bucket (a GCS emulator here), never to a local ``gs:`` folder (pathlib would turn
    gs://b into gs:/b)."""
    from pipelines import commit

    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "audit.yaml"
    config.write_text((real_slice / "audit.yaml").read_text()
                      .replace("output_dir: out", f"output_dir: gs://{gcs_bucket}/dataflow-test-audits")
                      .replace("labels.tsv", str(real_slice / "labels.tsv"))
                      .replace("votes_first.csv", str(real_slice / "votes_first.csv")))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", str(config)]) == 0
    assert not (tmp_path / "gs:").exists()
    assert commit.is_committed(f"gs://{gcs_bucket}/dataflow-test-audits/tfds/real_slice_audit/1.0.0")


# ----------------------------------------------------------------- setup.py


def test_setup_py_is_self_contained():
    """Beam ships setup.py alone to the workers (--setup_file): it may import setuptools only
    and must not read other files of the repository."""
    tree = ast.parse((REPO / "setup.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported == {"setuptools"}
    calls = {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
             for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not calls & {"open", "read_text", "read_bytes", "exec", "eval", "__import__", "glob", "listdir"}
    packages = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                    for kw in node.keywords if kw.arg == "packages")
    listed = set(ast.literal_eval(packages))
    assert listed == {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} - {"tests", "benchmarks"}


def test_setup_py_runs_alone_in_an_empty_folder(tmp_path):
    shutil.copy(REPO / "setup.py", tmp_path / "setup.py")
    done = subprocess.run([sys.executable, "setup.py", "--name", "--version"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["label-audit", "0.1.0"]
