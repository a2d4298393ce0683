"""``label-audit tasks``: stage 4, crowd tasks from label proposals, and the round trip
through a Label Studio project.

    label-audit tasks --proposals DIR/proposals.parquet --out DIR \\
        [--max-labels 8] [--image-uri-template 'gs://bucket/val/{file_name}'] \\
        [--example-uri-template 'gs://bucket/train/{wnid}/'] \\
        [--original-labels LABELS.tsv --predictions A.npz B.npz ...]
    label-audit tasks push DIR/tasks.jsonl --label-studio URL --api-key KEY [--project NAME] \\
        [--image-url-template 'https://host/val/{file_name}' | --image-folder DIR] \\
        [--example-url-template 'https://host/examples/{wnid}.jpg'] [--votes VOTES]
    label-audit tasks pull --label-studio URL --api-key KEY --project NAME --out VOTES.parquet

``--proposals`` is stage 2's proposals.parquet (its ``sources`` tell which images
every model's top-1 agrees on, and those are skipped), or a ReaL ``raters.npz``
(its questions; no models, so no image is skipped). With ``--predictions`` and
``--original-labels``, the top-1s are read from the predictions instead.

Writes DIR/tasks.jsonl, DIR/tasks.csv (formats in ``auditing.tasks``) and
DIR/summary.json, each to a temporary file first, and prints the counts.

``push`` creates (or reuses, by title) a Label Studio project and imports the tasks it
does not hold yet; ``pull`` writes its annotations as votes (VOTES.parquet, read by the
votes stage) with VOTES.quarantine.csv, VOTES.gold.csv (tasks answered as ground truth)
and VOTES.summary.json beside it (``pipelines.label_studio``). The API key (a personal
access token) can also come from $LABEL_STUDIO_API_KEY. Input errors exit 2 with one line.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from auditing import labelsets
from auditing import tasks as tasks_lib
from auditing.predictions import load_predictions
from auditing.votes import VoteFileError, read_and_validate

DEFAULT_PROJECT = "label-audit"
API_KEY_ENV = "LABEL_STUDIO_API_KEY"


def read_proposals(path: str | Path) -> pd.DataFrame:
    """Stage-2 proposals (.parquet) or the questions of a ReaL raters.npz (.npz)."""
    path = Path(path)
    if path.suffix == ".npz":
        from auditing.votes import read_real_questions

        return read_real_questions(path)
    return pd.read_parquet(path)


def top1_by_model(prediction_paths: list[str]) -> dict[str, pd.DataFrame]:
    top1 = {}
    for path in prediction_paths:
        predictions = load_predictions(path)
        top1[Path(path).stem] = pd.DataFrame({"file_name": predictions.file_names,
                                              "label": predictions.top1_labels()})
    return top1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Building tasks takes no action word (as before push/pull existed), so its two
    # required flags are checked in main().
    parser.add_argument("--proposals", metavar="PARQUET|NPZ",
                        help="stage 2's proposals.parquet, or a ReaL raters.npz (required to build tasks)")
    parser.add_argument("--max-labels", type=int, default=tasks_lib.DEFAULT_MAX_LABELS,
                        help="labels per task at most (default 8)")
    parser.add_argument("--image-uri-template", default="{file_name}",
                        help="image URI shown to raters, e.g. 'gs://bucket/val/{file_name}'")
    parser.add_argument("--example-uri-template", default=None,
                        help="example images per label, e.g. 'gs://bucket/train/{wnid}/'")
    parser.add_argument("--original-labels", default=None, metavar="TSV",
                        help="with --predictions: file_name<TAB>label, or 'tfds-wheel'")
    parser.add_argument("--predictions", nargs="+", default=None, metavar="NPZ",
                        help="read the models' top-1 from these instead of the proposals' sources")
    parser.add_argument("--out", metavar="DIR", help="where to write the tasks (required to build tasks)")
    actions = parser.add_subparsers(dest="tasks_action", metavar="{push,pull,preview}")
    from pipelines import task_preview

    preview = actions.add_parser("preview", help="write an HTML page per task as a rater sees it",
                                 description="Write one HTML page per task (image, labels with name, gloss "
                                             "and example image, yes / maybe / no), as a rater sees it.")
    task_preview.add_arguments(preview)
    push = actions.add_parser("push", help="import tasks into a Label Studio project (created or reused by title)",
                              description="Import the tasks of a tasks.jsonl into a Label Studio project.")
    push.add_argument("tasks", metavar="TASKS", help="a tasks.jsonl written by `label-audit tasks`")
    _server_arguments(push)
    push.add_argument("--project", default=DEFAULT_PROJECT, metavar="NAME",
                      help=f"project title, created if missing (default {DEFAULT_PROJECT!r})")
    images = push.add_mutually_exclusive_group()
    images.add_argument("--image-url-template", default=None, metavar="TEMPLATE",
                        help="image URL per task, e.g. 'https://host/val/{file_name}' (default: the task's image_uri)")
    images.add_argument("--image-folder", default=None, metavar="DIR",
                        help="serve the images from this folder of the server's machine (local-files storage)")
    push.add_argument("--document-root", default=os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "/"),
                      metavar="DIR", help="the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, with --image-folder")
    push.add_argument("--example-url-template", default=None, metavar="TEMPLATE",
                      help="an example image per label, e.g. 'https://host/examples/{wnid}.jpg'")
    push.add_argument("--votes", default=None, metavar="VOTES",
                      help="votes already collected (any vote format) to carry in as annotations")
    pull = actions.add_parser("pull", help="write a Label Studio project's annotations as votes",
                              description="Export a Label Studio project's annotations as votes.")
    _server_arguments(pull)
    pull.add_argument("--project", required=True, metavar="NAME", help="project title")
    pull.add_argument("--out", required=True, metavar="VOTES.parquet",
                      help="votes file; .quarantine.csv, .gold.csv and .summary.json are written beside it")


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label-studio", required=True, metavar="URL", help="e.g. http://localhost:8080")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                        help=f"personal access token (default ${API_KEY_ENV})")


def _fail(action: str, message: object) -> int:
    print(f"label-audit tasks{' ' + action if action else ''}: error: {message}", file=sys.stderr)
    return 2


def push_main(args: argparse.Namespace) -> int:
    from pipelines import label_studio

    try:
        carried_votes = read_and_validate(args.votes) if args.votes else None
        votes = carried_votes.kept if carried_votes else None
        client = label_studio.LabelStudioClient(args.label_studio, args.api_key)
        pushed = label_studio.push_tasks(
            client, args.tasks, args.project, image_url_template=args.image_url_template,
            example_url_template=args.example_url_template, image_folder=args.image_folder,
            document_root=args.document_root, votes=votes)
    except (label_studio.LabelStudioError, tasks_lib.TaskFileError, VoteFileError, ValueError, OSError) as e:
        return _fail("push", e)
    carried = ""
    if carried_votes:
        carried = (f", {pushed.annotations_imported:,} annotations carried from {args.votes} "
                   f"({carried_votes.summary.quarantined_total:,} of its votes quarantined by the votes reader, "
                   f"{pushed.votes_outside_tasks:,} on questions of no task, "
                   f"{pushed.votes_on_tasks_already_there:,} on tasks already there: not carried)")
    print(f"project {pushed.project_title!r} (id {pushed.project_id}, "
          f"{'created' if pushed.created_project else 'reused'}): {pushed.tasks_imported:,} tasks imported, "
          f"{pushed.tasks_already_there:,} already there{carried} -> "
          f"{client.url}/projects/{pushed.project_id}/data")
    return 0


def pull_main(args: argparse.Namespace) -> int:
    from pipelines import label_studio

    try:
        client = label_studio.LabelStudioClient(args.label_studio, args.api_key)
        pulled = label_studio.pull_votes(client, args.project)
        paths = label_studio.write_pulled(pulled, args.out)
    except (label_studio.LabelStudioError, ValueError, OSError) as e:
        return _fail("pull", e)
    summary = pulled.summary()
    reasons = ", ".join(f"{r} {n:,}" for r, n in summary["quarantined_by_reason"].items() if n)
    print(f"{summary['votes']:,} votes from {summary['raters']:,} raters, {summary['gold']:,} gold answers, "
          f"{summary['quarantined']:,} quarantined{f' ({reasons})' if reasons else ''} -> {paths['votes']} "
          f"(quarantine {paths['quarantine']}, gold {paths['gold']})")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.tasks_action == "push":
        return push_main(args)
    if args.tasks_action == "pull":
        return pull_main(args)
    if args.tasks_action == "preview":
        from pipelines import task_preview

        return task_preview.main(args)
    missing = [flag for flag, value in (("--proposals", args.proposals), ("--out", args.out)) if not value]
    if missing:
        return _fail("", f"building tasks needs {' and '.join(missing)} (or use `tasks push` / `tasks pull`)")
    proposals = read_proposals(args.proposals)
    original, top1 = None, None
    if args.predictions:
        if not args.original_labels:
            return _fail("", "--predictions needs --original-labels")
        original = labelsets.load_original_labels(args.original_labels)
        top1 = top1_by_model(args.predictions)
    built = tasks_lib.build_tasks(proposals, original_labels=original, top1=top1,
                                  max_labels=args.max_labels)
    out = Path(args.out)
    tasks_lib.write_tasks_jsonl(built, out / "tasks.jsonl", image_uri_template=args.image_uri_template,
                                example_uri_template=args.example_uri_template)
    tasks_lib.write_tasks_csv(built, out / "tasks.csv", image_uri_template=args.image_uri_template)
    summary = tasks_lib.summarize_tasks(built)
    tasks_lib.write_summary(summary, out / "summary.json")
    print(f"{summary['images_to_relabel']:,} images to relabel ({summary['images_skipped_all_top1_agree']:,} "
          f"skipped: every model's top-1 is the original label), {summary['tasks']:,} tasks, "
          f"{summary['questions']:,} questions ({summary['proposals_per_image']:.2f} per image, "
          f"{summary['labels_per_task']:.2f} per task) -> {out / 'tasks.jsonl'}")
    return 0
