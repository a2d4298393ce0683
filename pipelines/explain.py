"""``label-audit explain OUT STAGE``: why a stage re-ran.

Every stored output keeps in ``_key.json`` what its key was made of: the keys of the
input artifacts, the stage's parameters (file sha256s, settings) and its code
version (``Stage.version``). This command
lists the stored outputs of STAGE, oldest first, and for each one after the first
says what differs from the one before it.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.stages import STAGES, StageError
from pipelines.store import Store


def differences(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ, with both values (short)."""
    lines = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, "(absent)"), after.get(key, "(absent)")
        path = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            lines += differences(a, b, path + ".")
        elif a != b:
            lines.append(f"{path}: {_short(a)} -> {_short(b)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def explain(out_dir: str | Path, stage: str) -> list[str]:
    names = [s.name for s in STAGES]
    if stage not in names:
        raise StageError(f"unknown stage {stage!r}; stages: {', '.join(names)}")
    from pipelines import commit

    records = Store(commit.join(str(out_dir), "store")).keys(stage)
    if not records:
        raise StageError(f"{out_dir}: no stored output of stage {stage!r} (was it run with this --out?)")
    lines = [f"{len(records)} stored output(s) of {stage}, oldest first:"]
    for i, record in enumerate(records):
        lines.append(f"  {record['key'][:12]}")
        if i == 0:
            inputs = ", ".join(f"{n} {k[:12]}" for n, k in record.get("inputs", {}).items()) or "none"
            lines.append(f"    first run; inputs: {inputs}")
            continue
        diff = differences(records[i - 1], record)
        diff = [d for d in diff if not d.startswith("key:")]
        lines += [f"    re-ran because {d}" for d in diff] or ["    (same inputs and parameters)"]
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="the run's output directory")
    parser.add_argument("stage", help="a stage name: " + ", ".join(s.name for s in STAGES))


def main(args: argparse.Namespace) -> int:
    print("\n".join(explain(args.out, args.stage)))
    return 0
