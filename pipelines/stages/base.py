"""What a stage is: its config section, the artifacts it consumes and produces, its
content key and its ``compute``.

An ``Artifact`` is a small typed record (a folder of files plus counts), never a
DataFrame in shared state: a stage reads what it needs from its inputs' files. The
runner (``pipelines/run.py``) orders the stages, gives each one its inputs, and skips a
stage whose key is already stored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from auditing.errors import InputError
from pipelines.config import AuditConfig
from pipelines.store import Store


class StageError(InputError):
    """A stage cannot run with what the config gives it (the message says what to add)."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A stage's output: ``folder`` holds its files; ``counts`` is its summary.json."""

    name: str
    key: str
    folder: Path
    counts: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def file(self, name: str) -> Path:
        return self.folder / name


@dataclasses.dataclass
class Context:
    """What every stage may look at besides its inputs: the config, the store, and for
    a re-audit the latest release (whose asked pairs and votes carry over)."""

    config: AuditConfig
    store: Store
    previous_release: Path | None = None
    # `reaudit` writes the next version when the labels changed; `run` writes the
    # config's version and refuses to overwrite a different one.
    mode: str = "run"
    # runner `portable`: the worker pool's HOST:PORT (the runner starts one for the run).
    environment_config: str | None = None
    # The votes pulled from the Label Studio project of stages.tasks, once per run.
    pulled_votes: str | None = None

    def resolve(self, ref: str) -> str:
        return self.config.resolve(ref)

    def previous_manifest(self) -> dict[str, Any] | None:
        if self.previous_release is None:
            return None
        from pipelines import commit

        return commit.read_json(commit.join(str(self.previous_release), "manifest.json"))

    @contextlib.contextmanager
    def beam_output(self, out: Path):
        """Where a Beam step of a stage writes its files: ``out`` itself when the store is
        local (the workers share its disk); on an object store a scratch prefix there,
        whose files are brought into ``out`` afterwards, since a worker's local disk is
        not the launcher's."""
        if not self.store.remote:
            yield out
            return
        import uuid

        from pipelines import commit

        scratch = commit.join(str(self.store.root), "_scratch", uuid.uuid4().hex)
        try:
            yield scratch
            for rel in commit.list_files(scratch):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(commit.read_bytes(commit.join(scratch, rel)))
        finally:
            commit.delete_prefix(scratch)

    def beam_args(self) -> list[str]:
        """The runner's extra flags, with the run's worker pool for ``portable``: what
        modules that build their own pipelines (predict, sensitivity) are given."""
        runner = self.config.runner
        args = list(runner.options)
        if runner.name == "portable":
            args += [f"--job_endpoint={runner.job_endpoint}",
                     f"--environment_config={self.environment_config or runner.environment_config}"]
        return args

    def beam_options(self):
        from pipelines.beam_options import make_options

        runner = self.config.runner
        return make_options(runner.name, runner.num_workers, runner.options, job_endpoint=runner.job_endpoint,
                            environment_config=self.environment_config or runner.environment_config)


Inputs = Mapping[str, Artifact]


class Stage:
    """One step of the method. Subclasses set the class attributes and implement
    ``params`` (everything the output depends on besides the input artifacts' keys)
    and ``compute`` (fill a folder, return its counts)."""

    name: ClassVar[str]  # also the store folder: store/<name>/<key>/
    produces: ClassVar[str]  # the artifact name
    consumes: ClassVar[tuple[str, ...]] = ()  # required inputs
    consumes_if_present: ClassVar[tuple[str, ...]] = ()  # used when their stage runs
    # What the stage computes from the same inputs and parameters, as a TFDS builder's
    # VERSION: part of the content key, so that an output stored by older code is not
    # reused once the computation or the output's format changes. Bump it then.
    version: ClassVar[int] = 1

    def section(self, config: AuditConfig) -> Any:
        """The stage's config section (``stages.<name>``); None means "not declared"."""
        return getattr(config.stages, self.name)

    def enabled(self, config: AuditConfig) -> bool:
        return self.section(config) is not None

    def check(self, ctx: Context, available: set[str]) -> None:
        """Raise StageError before anything runs if the stage cannot run."""
        missing = [a for a in self.consumes if a not in available]
        if missing:
            raise StageError(f"stages.{self.name} needs {', '.join(missing)}: declare the stage that "
                             f"produces it ({', '.join(PRODUCERS.get(a, '?') for a in missing)}) "
                             f"or give it under inputs.{missing[0]}")

    def params(self, ctx: Context, inputs: Inputs) -> dict[str, Any]:
        return {}

    def compute(self, ctx: Context, inputs: Inputs, out: Path) -> dict[str, Any]:
        raise NotImplementedError

    def lookup(self, ctx: Context, key: str, params: dict[str, Any]) -> Artifact | None:
        """The stored output of this key, if any (the release stage looks in tfds/)."""
        folder = ctx.store.folder(self.name, key)
        return None if folder is None else load_artifact(self.produces, folder)

    def finish(self, ctx: Context, artifact: Artifact) -> None:
        """Called with the stage's output whether computed or reused (the report
        publishes itself to <out>/report/)."""

    def describe(self, artifact: Artifact) -> str:
        """One line for the progress log."""
        return ", ".join(f"{k.replace('_', ' ')}: {v:,}" if isinstance(v, int) else
                         f"{k.replace('_', ' ')}: {v}" for k, v in artifact.counts.items()
                         if not isinstance(v, (dict, list)))

    def outputs(self, ctx: Context, artifact: Artifact) -> dict[str, str]:
        """Paths printed in the run's summary."""
        return {}


# artifact name -> the stage producing it; filled by pipelines/stages/__init__.py
PRODUCERS: dict[str, str] = {}


def load_artifact(name: str, folder: Path) -> Artifact:
    summary = folder / "summary.json"
    counts = json.loads(summary.read_text()) if summary.is_file() else {}
    key = folder.name
    return Artifact(name=name, key=key, folder=folder, counts=counts)


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def cyclic_gc_paused():
    """The cyclic garbage collector off for a block that builds ~10^5 small, acyclic,
    mostly long-lived objects (lists, dicts, tuples): each of the full collections their
    allocations set off would traverse every object of the process for nothing (a few
    tenths of a second each in a pipeline run). Reference counting still frees what is
    acyclic; cycles wait for the next collection after the block."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
