"""``label-audit reaudit CONFIG``: re-run a config against its latest release.

Every stage reuses its stored output when its inputs did not change (a new model
costs only that model's predictions; pairs asked before are not asked again; the
votes of earlier audits are kept and merged with the new ones). If the label sets
come out identical to the latest release, nothing is written and the exit code is 3;
otherwise the release gets a new minor version with release notes and a diff.

Exit codes (for cron / schedulers): 0 a new version was written, 3 nothing changed,
2 a usage or input error, 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import sys

from auditing.release_diff import diff_label_sets, next_minor_version
from pipelines import release as release_lib
from pipelines import run as run_lib
from pipelines.config import load_config

EXIT_NEW_VERSION = 0
EXIT_UNCHANGED = 3
EXIT_USAGE = 2


def reaudit(config, echo=print) -> tuple[int, run_lib.RunState]:
    cfg = config.stages.release
    if cfg is None:
        raise run_lib.StageError("reaudit needs stages.release in the config")
    versions = release_lib.released_versions(config.output_dir, cfg.name)
    if not versions:
        echo(f"no release of {cfg.name} under {config.output_dir} yet: running the config as a first audit")
        state = run_lib.execute(config, echo=echo)
        return EXIT_NEW_VERSION, state
    latest = versions[-1]
    latest_dir = release_lib.release_dir(config.output_dir, cfg.name, latest)
    manifest = json.loads((latest_dir / "manifest.json").read_text())
    stages = [s for s in run_lib.declared_stages(config) if s not in ("release", "report")]
    state = run_lib.RunState.for_config(config, previous_release=latest_dir)
    run_lib.execute(config, stages=stages, echo=echo, state=state)
    if manifest.get("content_key") == state.labels_key:
        echo(f"nothing changed since {cfg.name} {latest}: no new version written")
        return EXIT_UNCHANGED, state
    new_version = next_minor_version(latest)
    old_sets = {row.file_name: frozenset(row.real_label)
                for row in release_lib.read_release(latest_dir).itertuples()}
    diff = diff_label_sets(old_sets, state.label_sets, latest, new_version)
    builder_notes = json.loads((latest_dir / "dataset_info.json").read_text()).get("releaseNotes", {})
    what = run_lib.describe_changes(manifest, state)
    notes = dict(builder_notes) | {new_version: (
        f"Re-audit of {latest}: {what}. {diff['images_changed']:,} images changed label set "
        f"({diff['labels_added']:,} labels added, {diff['labels_removed']:,} removed).")}
    run_lib.write_release_version(state, new_version, notes, diff=diff)
    echo(f"wrote {cfg.name} {new_version}: {notes[new_version]}")
    if config.stages.report is not None:
        state.diff = diff
        echo(run_lib.stage_report(state))
    return EXIT_NEW_VERSION, state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--out", help="output directory (overrides the config's output_dir)")


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, output_dir=args.out)
        code, _ = reaudit(config)
    except Exception as e:
        if isinstance(e, run_lib.input_errors()):
            return run_lib.report_input_error(e)
        raise
    return code


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace(config=sys.argv[1], out=None)))
