"""``label-audit reaudit CONFIG``: re-run a config against its latest release.

The same stage graph as ``run`` (pipelines/run.py), with the latest release as the
previous audit: every stage reuses its stored output when its inputs did not change (a
new model costs only that model's predictions), pairs asked before are not asked again,
and the votes of earlier audits are carried over and merged with the new ones. If the
release would hold the same records as the latest version, nothing is written (exit
3); otherwise the next version is written (MAJOR when records changed: see
pipelines/stages/release.py) with release notes and a diff.

Exit codes (for cron / schedulers): 0 a new version was written, 3 nothing changed,
2 an input error, 1 an internal error.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pipelines import release as release_lib
from pipelines import run as run_lib
from pipelines.config import AuditConfig
from pipelines.stages import StageError

EXIT_NEW_VERSION = run_lib.EXIT_OK
EXIT_UNCHANGED = run_lib.EXIT_UNCHANGED


def reaudit(config: AuditConfig, echo: Callable[..., Any] = print) -> tuple[int, run_lib.RunResult]:
    cfg = config.stages.release
    if cfg is None:
        raise StageError("reaudit needs stages.release in the config")
    versions = release_lib.released_versions(config.output_dir, cfg.name)
    if not versions:
        echo(f"no release of {cfg.name} under {config.output_dir} yet: running the config as a first audit")
        return EXIT_NEW_VERSION, run_lib.execute(config, echo=echo)
    latest = release_lib.release_dir(config.output_dir, cfg.name, versions[-1])
    result = run_lib.execute(config, mode="reaudit", previous_release=latest, echo=echo)
    if result.release_status != "written":
        echo(f"nothing changed since {cfg.name} {versions[-1]}: no new version written")
        return EXIT_UNCHANGED, result
    echo(f"wrote {cfg.name} {result.artifacts['release'].folder.name}")
    return EXIT_NEW_VERSION, result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run_lib.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    return reaudit(run_lib.config_from_args(args))[0]
