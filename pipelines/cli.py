"""The ``label-audit`` command. Each subcommand lives in one module of ``pipelines/``
exposing ``add_arguments(parser)`` and ``main(args) -> int``.

    label-audit run CONFIG [--out DIR]       every stage the config declares  (run.py)
    label-audit reaudit CONFIG [--out DIR]   new version if anything changed  (reaudit.py)
    label-audit explain OUT STAGE            why a stage re-ran               (explain.py)
    label-audit predict --model NAME ...     predict image files              (predict.py)
    label-audit propose --predictions ...    label proposals                  (propose.py)
    label-audit tasks --proposals ...        crowd tasks                      (tasks.py)
    label-audit report --labels ...          the report                       (report.py)

Exit codes: 0 success (reaudit: a new version), 3 nothing changed (reaudit), 2 an
input error (one line naming the file, key or row), 1 an internal error (a traceback:
please report it).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from auditing.errors import InputError

EXIT_INTERNAL, EXIT_INPUT = 1, 2

# subcommand -> (module, one-line help). Modules are imported only when used, so
# `label-audit report` does not pay for importing JAX.
COMMANDS = {
    "run": ("pipelines.run", "run every stage a config declares"),
    "reaudit": ("pipelines.reaudit", "re-run a config against its latest release; exit 0 new version, "
                                     "3 nothing changed"),
    "explain": ("pipelines.explain", "say why a stage re-ran: what its stored keys were made of"),
    "predict": ("pipelines.predict", "predict image files with a model; write a predictions NPZ"),
    "propose": ("pipelines.propose", "pool label proposals from prediction NPZ files"),
    "tasks": ("pipelines.tasks", "build crowd tasks (JSONL/CSV) from proposals"),
    "report": ("pipelines.report", "write report.json and index.html for label sets and predictions"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="label-audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        # Parsers are built lazily per command to keep `--help` cheap; see main().
        command.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Only the chosen command's module is imported (and its arguments added), so that
    # `label-audit report` does not import JAX; `label-audit CMD --help` still lists them.
    # Beam warns on import, on the root logger, about GCP clients a local run never uses.
    logging.getLogger().addFilter(lambda record: not record.getMessage().startswith("apitools not found"))
    command = next((a for a in argv if a in COMMANDS), None)
    if command is not None:
        module = importlib.import_module(COMMANDS[command][0])
        module.add_arguments(parser._subparsers._group_actions[0].choices[command])  # noqa: SLF001
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "apache_beam", "jax", "tensorflow_datasets", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(module.main(args) or 0)
    except InputError as e:  # the user's input: one line, no traceback
        print(f"label-audit: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except Exception:
        traceback.print_exc()
        print("label-audit: internal error (exit 1): please report it with the traceback above",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
