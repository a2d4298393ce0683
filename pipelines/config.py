"""The declarative surface: one YAML file names the dataset, the stages, their inputs
and parameters, and the release. ``load_config`` validates it into typed objects.

Every key maps to one field below and every stage section to one module:

    stages.predict        -> pipelines/predict.py     (models/ for the networks)
    stages.propose        -> pipelines/propose.py     (auditing/proposals.py)
    stages.select_subset  -> auditing/subset_selection.py
    stages.tasks          -> auditing/tasks.py
    stages.votes          -> auditing/votes.py
    stages.aggregate      -> auditing/aggregation/
    stages.release        -> pipelines/release.py
    stages.report         -> pipelines/report.py      (auditing/report.py, metrics.py, cooccurrence.py)

A stage whose section is absent is skipped; a stage's output can instead be given as
an input (``propose.questions``: proposals from raters.npz; ``predict.predictions``:
NPZ files), so the ImageNet config runs without ImageNet images.

File references are paths relative to the config file, absolute paths, URIs such as
``gs://...`` (fetched once through Beam's FileSystems: pipelines/remote.py), ``source:NAME`` for a pinned public file of ``auditing.sources`` (local copy
in ../shared/data, else a checksummed download), or ``package:PKG/PATH`` for a file
shipped inside an installed package (the sample photos).
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml

from auditing import sources
from auditing.errors import InputError
from auditing.gold import PresenceRule
from auditing.labelsets import TFDS_WHEEL


class ConfigError(InputError):
    """A config that cannot be used; the message names the file and the key."""


class _Section(pydantic.BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


FileRef = Annotated[str, pydantic.Field(min_length=1)]


class RunnerConfig(_Section):
    """Where Beam runs. 'direct' is in-process; 'direct-multiprocess' uses worker
    processes; 'portable' submits to a job service (``job_endpoint``: 'embed' for Beam's
    own, or a Flink / Spark job server HOST:PORT) executed by SDK workers over the Fn
    API, as Dataflow Runner v2 does (a worker pool is started in isolated directories
    unless ``environment_config`` names one); 'dataflow' needs the extra flags in
    ``options`` (see README: --project, --region, --temp_location, --setup_file...)."""

    name: Literal["direct", "direct-multiprocess", "portable", "dataflow"] = "direct"
    num_workers: int = pydantic.Field(1, ge=1)
    job_endpoint: str = "embed"
    environment_config: str | None = None  # HOST:PORT of a running worker pool
    options: list[str] = []


class ImagesConfig(_Section):
    """Images to predict: an image folder, a list of image files, or a TFDS dataset."""

    type: Literal["folder", "files", "tfds"]
    path: FileRef | None = None  # folder
    paths: list[FileRef] = []  # files
    labels: FileRef | None = None  # folder/files: file_name<TAB>label TSV
    name: str | None = None  # tfds dataset name
    data_dir: FileRef | None = None  # tfds data_dir
    split: str = "validation"

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> "ImagesConfig":
        if self.type == "folder" and not self.path:
            raise ValueError("images.type 'folder' needs images.path")
        if self.type == "files" and not self.paths:
            raise ValueError("images.type 'files' needs images.paths")
        if self.type == "tfds" and not self.name:
            raise ValueError("images.type 'tfds' needs images.name")
        return self


class DatasetConfig(_Section):
    # Descriptive: recorded in the release manifest and the report. The release's split
    # is always `validation`, as in TFDS imagenet2012_real.
    name: str = "imagenet2012"
    split: str = "validation"
    # TSV file_name<TAB>label, or 'tfds-wheel' for the 50k ILSVRC-2012 val labels.
    original_labels: FileRef = TFDS_WHEEL
    images: ImagesConfig | None = None


class ModelConfig(_Section):
    name: str  # registry name, models/registry.py
    checkpoint: FileRef | None = None  # for models without shipped weights (resnet50)


class PredictConfig(_Section):
    models: list[ModelConfig] = []
    batch_size: int = pydantic.Field(32, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Predictions computed elsewhere: {model name: NPZ with file_names, logits}.
    predictions: dict[str, FileRef] = {}


class CentroidConfig(_Section):
    """The nearest class centroid (cosine) of a model's penultimate features as one more
    proposal source (auditing/centroids.py): ``audited`` = the audited images' own class
    means (each image left out of its own class), ``examples`` = the images of an
    examples folder (``<wnid>_<name>.JPEG``), ``both``."""

    model: str  # a model of stages.predict.models (its stored features)
    reference: Literal["audited", "examples", "both"] = "audited"
    examples: FileRef | None = None

    @pydantic.model_validator(mode="after")
    def _examples_when_needed(self) -> "CentroidConfig":
        if self.reference != "audited" and self.examples is None:
            raise ValueError(f"centroid.reference {self.reference!r} needs centroid.examples (a folder)")
        return self


class ProposeConfig(_Section):
    # N per model and criterion; default 3 x number of images (the paper's choice).
    top_n: int | None = pydantic.Field(None, ge=1)
    # Instead of pooling: take the (image, label) questions of a ReaL raters.npz.
    questions: FileRef | None = None
    # Rows of logits per Beam element (default: 5M values / number of classes).
    rows_per_shard: int | None = pydantic.Field(None, ge=1)
    centroid: CentroidConfig | None = None


class SelectSubsetConfig(_Section):
    gold: FileRef  # TSV (several rows per image) or JSON {file_name: [labels]}
    recall_target: float = pydantic.Field(0.97, gt=0, le=1)


class LabelStudioConfig(_Section):
    """A Label Studio project the tasks go to and the votes come back from
    (pipelines/label_studio.py): `run` pushes new tasks, the votes stage (and so
    `reaudit`) pulls every answer so far. The API key is read from ``api_key_env``."""

    url: str
    project: str
    api_key_env: str = "LABEL_STUDIO_API_KEY"
    image_url_template: str | None = None
    image_folder: str | None = None
    document_root: str = "/"
    example_url_template: str | None = None


class TasksConfig(_Section):
    max_labels: int = pydantic.Field(8, ge=1)
    image_uri_template: str = "{file_name}"
    # A folder of one example image per class (<wnid>_<name>.JPEG), shown beside each
    # label as the ReaL rating interface did (auditing/task_labels.py).
    examples: FileRef | None = None
    label_studio: LabelStudioConfig | None = None


class SimulatedCrowdConfig(_Section):
    """A clearly labelled simulated crowd (for photo sets nobody rated): rater
    confusion matrices estimated from the ReaL raters. Never for real audits."""

    # The true label sets the simulated raters answer from (TSV/JSON gold format).
    truth: FileRef
    raters_per_task: int = pydantic.Field(5, ge=1)
    seed: int = 0
    calibration_votes: FileRef = "source:real_raters"


class GoldConfig(_Section):
    """Gold (control) questions: their truth, and the raters' answers on them
    (auditing/gold.py). The truth comes from experts' votes with a rule ("present if at
    least ``min_yes`` of ``of`` experts said yes") or from a ``file_name, label, truth``
    file."""

    experts: FileRef | None = None  # ReaL golden.npz, or a long vote file of the experts
    truth: FileRef | None = None  # file_name, label, truth (CSV / JSONL / Parquet)
    raters: list[FileRef]  # the raters' answers on the gold questions (any vote format)
    format: Literal["auto", "real-npz", "csv", "jsonl", "parquet"] = "auto"
    # With experts: a gold question is present if at least min_yes of its `of` experts said yes.
    present_if: PresenceRule = PresenceRule(min_yes=3, of=5)

    @pydantic.model_validator(mode="after")
    def _one_truth(self) -> "GoldConfig":
        if (self.experts is None) == (self.truth is None):
            raise ValueError("gold needs exactly one of experts (expert votes) and truth (a truth file)")
        return self


class VotesConfig(_Section):
    paths: list[FileRef] = []
    format: Literal["auto", "real-npz", "csv", "jsonl", "parquet"] = "auto"
    simulate: SimulatedCrowdConfig | None = None
    gold: GoldConfig | None = None

    @pydantic.model_validator(mode="after")
    def _some_votes(self) -> "VotesConfig":
        if not self.paths and self.simulate is None:
            raise ValueError("votes needs paths (vote files) or simulate")
        return self


class AggregateConfig(_Section):
    """``method`` names one module of auditing/aggregation/; ``params`` are its typed
    parameters (auditing/aggregation/methods.py ``PARAMS``), checked before any stage runs."""

    method: Literal["gold-confusion", "dawid-skene", "majority-vote", "one-coin-dawid-skene", "glad",
                    "mace"] = "dawid-skene"
    threshold: float = pydantic.Field(0.8, ge=0, lt=1)
    params: dict[str, Any] = {}
    # Raters' history (dawid-skene): their confusion matrices measured on these votes
    # (e.g. earlier audits) act as Dirichlet pseudo-counts worth `strength` votes each.
    rater_history: FileRef | None = None
    rater_history_strength: float = pydantic.Field(50.0, gt=0)
    # Where Dawid-Skene runs: `in-memory` (crowd-kit, the reference), `beam` (EM over
    # vote shards: pipelines/beam_aggregation.py, for votes past one machine's memory),
    # or `auto` (beam from 5M votes, for dawid-skene and gold-confusion).
    engine: Literal["auto", "in-memory", "beam"] = "auto"
    votes_per_shard: int = pydantic.Field(100_000, ge=1000)

    @pydantic.model_validator(mode="after")
    def _valid_params(self) -> "AggregateConfig":
        from auditing.aggregation import AggregationParamsError, validate_params

        if self.rater_history is not None and self.method != "dawid-skene":
            raise ValueError(f"rater_history is a dawid-skene option, not one of {self.method!r}")
        try:
            validate_params(self.method, self.params)
        except AggregationParamsError as e:
            raise ValueError(f"params.{e.key}: {e}") from None
        if self.engine == "beam" and self.method not in ("dawid-skene", "gold-confusion"):
            raise ValueError(f"engine 'beam' runs dawid-skene and gold-confusion; method {self.method!r} runs "
                             "in memory")
        return self


class ReleaseConfig(_Section):
    name: str = pydantic.Field("imagenet2012_real_audit", pattern=r"^[a-z][a-z0-9_]*$")
    version: str = pydantic.Field("1.0.0", pattern=r"^\d+\.\d+\.\d+$")
    description: str = ""
    release_notes: str = "Initial audit."
    # Put the images (RGB) into the release as an `image` feature; needs dataset.images
    # of type files or folder. Off by default: ImageNet's are not ours to redistribute.
    include_images: bool = False
    # Who writes the TFDS files (pipelines/release.py choose_writer): `beam` (TFDS's Beam
    # job; scales out on Dataflow), `local` (TFDS's in-process writer; the same files),
    # `auto` (local below a million records on the in-process direct runner, else beam).
    writer: Literal["auto", "beam", "local"] = "auto"


class ClassFolderPredictions(_Section):
    """Top-1 predictions stored in class-folder order (the label_errors model: a .npy
    and the JSON index of its file paths)."""

    top1: FileRef
    index: FileRef


class ReportConfig(_Section):
    # Published label sets (real.json format) used ONLY to measure agreement.
    published_labels: FileRef | None = None
    # Extra model predictions to evaluate: {name: NPZ (file_names + logits or top1)}.
    predictions: dict[str, FileRef] = {}
    class_folder_predictions: dict[str, ClassFolderPredictions] = {}
    # The paper's own questions (a ReaL raters.npz): their recall and precision beside
    # the pool's, for an audit of validation images.
    paper_questions: FileRef | None = None
    # timm's published original-vs-ReaL results, where a local copy exists.
    model_zoo: bool = True
    # Where index.html and report.json are published (default: <output_dir>/report).
    out_dir: str | None = None


def _sensitivity_section(section: dict[str, Any]) -> dict[str, Any]:
    """``stages.sensitivity`` checked by its own parser (pipelines/sensitivity.py), so a
    bad transform or parameter is a config error before anything runs."""
    from pipelines.sensitivity import SensitivityConfig, SensitivityConfigError

    try:
        SensitivityConfig.from_mapping(section)
    except SensitivityConfigError as e:
        raise ValueError(str(e)) from None
    return section


class StagesConfig(_Section):
    predict: PredictConfig | None = None
    propose: ProposeConfig | None = None
    select_subset: SelectSubsetConfig | None = None
    tasks: TasksConfig | None = None
    votes: VotesConfig | None = None
    aggregate: AggregateConfig | None = None
    release: ReleaseConfig | None = None
    report: ReportConfig | None = None
    # Transform sensitivity: transforms, models, alpha (pipelines/sensitivity.py).
    sensitivity: Annotated[dict[str, Any], pydantic.AfterValidator(_sensitivity_section)] | None = None


class AuditConfig(_Section):
    output_dir: FileRef
    runner: RunnerConfig = RunnerConfig()
    dataset: DatasetConfig = DatasetConfig()
    stages: StagesConfig
    # Artifacts given as files instead of computed by their stage, by artifact name:
    # `label_sets: real.json` (real.json, or gold TSV / JSON) replaces the aggregate stage.
    inputs: dict[str, FileRef] = {}

    # Set by load_config: where relative paths are resolved from.
    base_dir: str = "."

    def resolve(self, ref: str) -> str:
        """A file reference as a usable path (or URI)."""
        return resolve_ref(ref, Path(self.base_dir))


def resolve_ref(ref: str, base_dir: Path) -> str:
    if ref.startswith("source:"):
        return str(sources.fetch(ref.removeprefix("source:")))
    if ref.startswith("package:"):
        # A file shipped inside an installed Python package: package:skimage/data/coffee.png
        package, _, inside = ref.removeprefix("package:").partition("/")
        try:
            return str(importlib.resources.files(package) / inside)
        except ModuleNotFoundError:
            raise ConfigError(f"{ref}: package {package!r} is not installed") from None
    if ref == TFDS_WHEEL:
        return ref
    if "://" in ref:
        from pipelines.remote import RemoteInputError, localize

        try:
            return str(localize(ref))
        except RemoteInputError as e:
            raise ConfigError(str(e)) from None
    path = Path(os.path.expanduser(ref))
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def file_refs(config: AuditConfig) -> list[tuple[str, str]]:
    """(key path, reference) of every input file the config names."""
    refs: list[tuple[str, str]] = [("dataset.original_labels", config.dataset.original_labels)]
    images = config.dataset.images
    if images is not None:
        if images.path:
            refs.append(("dataset.images.path", images.path))
        refs += [(f"dataset.images.paths[{i}]", p) for i, p in enumerate(images.paths)]
        if images.labels:
            refs.append(("dataset.images.labels", images.labels))
    s = config.stages
    if s.predict:
        refs += [(f"stages.predict.predictions.{k}", v) for k, v in s.predict.predictions.items()]
        refs += [(f"stages.predict.models[{i}].checkpoint", m.checkpoint)
                 for i, m in enumerate(s.predict.models) if m.checkpoint]
    if s.propose and s.propose.questions:
        refs.append(("stages.propose.questions", s.propose.questions))
    if s.propose and s.propose.centroid and s.propose.centroid.examples:
        refs.append(("stages.propose.centroid.examples", s.propose.centroid.examples))
    if s.select_subset:
        refs.append(("stages.select_subset.gold", s.select_subset.gold))
    if s.tasks and s.tasks.examples:
        refs.append(("stages.tasks.examples", s.tasks.examples))
    if s.votes:
        refs += [(f"stages.votes.paths[{i}]", p) for i, p in enumerate(s.votes.paths)]
        if s.votes.gold:
            gold = s.votes.gold
            refs += [(f"stages.votes.gold.{k}", getattr(gold, k)) for k in ("experts", "truth") if getattr(gold, k)]
            refs += [(f"stages.votes.gold.raters[{i}]", p) for i, p in enumerate(gold.raters)]
        if s.votes.simulate:
            refs.append(("stages.votes.simulate.truth", s.votes.simulate.truth))
            refs.append(("stages.votes.simulate.calibration_votes", s.votes.simulate.calibration_votes))
    if s.aggregate and s.aggregate.rater_history:
        refs.append(("stages.aggregate.rater_history", s.aggregate.rater_history))
    refs += [(f"inputs.{k}", v) for k, v in config.inputs.items()]
    if s.report:
        if s.report.published_labels:
            refs.append(("stages.report.published_labels", s.report.published_labels))
        refs += [(f"stages.report.predictions.{k}", v) for k, v in s.report.predictions.items()]
        for k, ref in s.report.class_folder_predictions.items():
            refs += [(f"stages.report.class_folder_predictions.{k}.top1", ref.top1),
                     (f"stages.report.class_folder_predictions.{k}.index", ref.index)]
        if s.report.paper_questions:
            refs.append(("stages.report.paper_questions", s.report.paper_questions))
    return refs


def _format_errors(path: Path, error: pydantic.ValidationError) -> str:
    lines = [f"{path}: invalid config"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike, output_dir: str | None = None,
                check_files: bool = True) -> AuditConfig:
    """Read and validate a YAML config. ``output_dir`` overrides the config's."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw["base_dir"] = str(path.resolve().parent)
    if output_dir is not None:
        raw["output_dir"] = output_dir
    try:
        config = AuditConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise ConfigError(_format_errors(path, e)) from None
    if "://" in config.output_dir:
        # An object store (gs://, s3://): outputs commit by a marker object written
        # last (pipelines/commit.py), never by renaming, which object stores cannot do.
        scheme = config.output_dir.split("://", 1)[0]
        from apache_beam.io.filesystems import FileSystems

        try:
            FileSystems.get_filesystem(config.output_dir)
        except ValueError:
            raise ConfigError(f"{path}: output_dir: no Beam filesystem for {scheme}:// is installed "
                              f"(gs:// needs apache-beam[gcp]: pip install -e '.[dataflow]')") from None
        config = config.model_copy(update={"output_dir": config.output_dir.rstrip("/")})
    elif output_dir is None:
        config = config.model_copy(update={"output_dir": config.resolve(config.output_dir)})
    else:
        config = config.model_copy(update={"output_dir": str(Path(output_dir).resolve())})
    if check_files:
        for key, ref in file_refs(config):
            try:
                resolved = config.resolve(ref)
            except (sources.SourceError, KeyError, ConfigError) as e:
                raise ConfigError(f"{path}: {key}: {e}") from None
            if resolved != TFDS_WHEEL and not os.path.exists(resolved):
                raise ConfigError(f"{path}: {key}: file not found: {resolved}")
    return config
