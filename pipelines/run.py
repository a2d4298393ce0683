"""``label-audit run CONFIG``: the stage graph a config declares, run in order.

The stages are the modules of ``pipelines/stages/`` (one per config section, in the
method's order). The runner resolves which of them the config declares (a stage whose
section is absent is skipped; an artifact given under ``inputs:`` replaces its stage),
checks that every stage has its inputs before anything runs, then for each stage
computes its content key (its inputs' keys, its parameters and its code ``version``),
reuses the stored output of that key or computes it, and logs per-stage progress. ``reaudit`` and the
single-stage subcommands (``predict``, ``propose``, ``report``) run the same graph,
the latter up to their stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import AuditConfig, load_config
from pipelines.stages import STAGES, SUPPLIERS
from pipelines.stages.base import Artifact, Context, Stage, StageError
from pipelines.store import Store, content_key

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_UNCHANGED = 0, 1, 2, 3


@dataclasses.dataclass
class RunResult:
    artifacts: dict[str, Artifact]
    store: Store
    computed: list[str]  # stages whose output was computed (not reused) by this run

    @property
    def release_status(self) -> str:
        if "release" not in self.artifacts:
            return ""
        return "written" if "release" in self.computed else "unchanged"


def output_path(config: AuditConfig, *parts: str) -> str:
    """A path under ``output_dir``: a local folder or an object-store URI."""
    from pipelines import commit

    return commit.join(config.output_dir, *parts)


def plan(config: AuditConfig, target: str | None = None) -> list[Stage]:
    """The stages to run, in order; raises StageError if one lacks an input."""
    supplied = set(config.inputs)
    unknown = supplied - set(SUPPLIERS)
    if unknown:
        raise StageError(f"inputs.{sorted(unknown)[0]}: cannot be given as a file; "
                         f"artifacts that can: {', '.join(sorted(SUPPLIERS))}")
    declared = [s for s in STAGES if s.enabled(config) and s.produces not in supplied]
    if target is not None:
        names = [s.name for s in declared]
        if target not in names:
            raise StageError(f"stages.{target} is not declared in the config")
        needed = {target}
        for stage in reversed(declared[:names.index(target) + 1]):
            if stage.name in needed:
                needed |= {s.name for s in declared if s.produces in stage.consumes + stage.consumes_if_present}
        declared = [s for s in declared if s.name in needed]
    available = set(supplied)
    for stage in declared:
        stage.check(Context(config, Store(".")), available)
        available.add(stage.produces)
    return declared


def execute(config: AuditConfig, target: str | None = None, *, mode: str = "run",
            previous_release: Path | None = None, echo: Callable[..., Any] = print) -> RunResult:
    stages = plan(config, target)
    ctx = Context(config, Store(output_path(config, "store")), previous_release, mode)
    runner = config.runner
    if runner.name == "portable" and runner.environment_config is None:
        # The way Dataflow Runner v2, Flink and Spark run Python: SDK workers over the Fn
        # API, here a worker pool in its own folders (pipelines/portable.py), so that
        # nothing passes from the launcher to the workers but through output_dir.
        from pipelines.portable import worker_pool

        with worker_pool() as address:
            ctx.environment_config = address
            echo(f"portable runner: job endpoint {runner.job_endpoint}, worker pool {address}")
            return _execute(stages, ctx, echo)
    return _execute(stages, ctx, echo)


def _execute(stages: list[Stage], ctx: Context, echo: Callable[..., Any]) -> RunResult:
    config = ctx.config
    artifacts = {name: SUPPLIERS[name](ctx, ref) for name, ref in config.inputs.items()}
    computed: list[str] = []
    started = time.monotonic()
    try:
        for i, stage in enumerate(stages, start=1):
            # What the process holds so far (imported modules, earlier artifacts) is long
            # lived: frozen out of the collector, a full collection during a stage traverses
            # only that stage's objects (~80 ms each once Beam is imported, otherwise).
            gc.freeze()
            t0 = time.monotonic()
            echo(f"[{i}/{len(stages)}] {stage.name} ...", flush=True)
            inputs = {n: artifacts[n] for n in stage.consumes + stage.consumes_if_present if n in artifacts}
            params = stage.params(ctx, inputs)
            key = content_key(inputs={n: a.key for n, a in sorted(inputs.items())}, params=params,
                              version=stage.version)
            artifact = stage.lookup(ctx, key, params)
            if artifact is None:
                artifact = run_stage(stage, ctx, inputs, key, params)
                computed.append(stage.name)
            stage.finish(ctx, artifact)
            artifacts[stage.produces] = artifact
            how = "computed" if computed[-1:] == [stage.name] else "reused"
            echo(f"[{i}/{len(stages)}] {stage.name}: {stage.describe(artifact)} "
                 f"({how}, {time.monotonic() - t0:.1f} s)", flush=True)
    finally:
        # What this run froze goes back to the collector: a process that runs again (a
        # test session, a notebook) frees the cycles of the runs before.
        gc.unfreeze()
    echo(f"done in {time.monotonic() - started:.1f} s; computed this run: {', '.join(computed) or 'nothing'}")
    for stage in stages:
        for what, path in stage.outputs(ctx, artifacts[stage.produces]).items():
            echo(f"  {what:<20} {path}")
    return RunResult(artifacts, ctx.store, computed)


def run_stage(stage: Stage, ctx: Context, inputs: dict[str, Artifact], key: str,
              params: dict[str, Any]) -> Artifact:
    """Compute a stage into the store (or, for the release, wherever it writes)."""
    if hasattr(stage, "write"):
        return stage.write(ctx, inputs, key, params)
    from pipelines.stages.base import load_artifact, write_json

    def fill(out: Path) -> None:
        write_json(out / "summary.json", stage.compute(ctx, inputs, out))

    folder = ctx.store.get_or_compute(stage.name, key, fill, describe={
        "inputs": {n: a.key for n, a in sorted(inputs.items())}, "params": params, "version": stage.version})
    return load_artifact(stage.produces, folder)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--out", help="output directory or URI (overrides the config's output_dir)")
    parser.add_argument("--runner", choices=["direct", "direct-multiprocess", "portable", "dataflow"],
                        help="overrides runner.name")
    parser.add_argument("--num-workers", type=int, help="overrides runner.num_workers")
    parser.add_argument("--job-endpoint", help="portable: a job server HOST:PORT (default: embed)")
    parser.add_argument("--environment-config", help="portable: a running worker pool HOST:PORT")


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """The config, with the command line's runner flags over its ``runner`` section."""
    config = load_config(args.config, output_dir=args.out)
    overrides = {key: value for key, value in (
        ("name", getattr(args, "runner", None)), ("num_workers", getattr(args, "num_workers", None)),
        ("job_endpoint", getattr(args, "job_endpoint", None)),
        ("environment_config", getattr(args, "environment_config", None))) if value is not None}
    if overrides:
        runner = type(config.runner).model_validate(config.runner.model_dump() | overrides)
        config = config.model_copy(update={"runner": runner})
    return config


def main(args: argparse.Namespace) -> int:
    execute(config_from_args(args))
    return EXIT_OK
