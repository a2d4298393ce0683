"""``label-audit tasks``: stage 4, crowd tasks from label proposals.

    label-audit tasks --proposals DIR/proposals.parquet --out DIR \\
        [--max-labels 8] [--image-uri-template 'gs://bucket/val/{file_name}'] \\
        [--example-uri-template 'gs://bucket/train/{wnid}/'] \\
        [--original-labels LABELS.tsv --predictions A.npz B.npz ...]

``--proposals`` is stage 2's proposals.parquet (its ``sources`` tell which images
every model's top-1 agrees on, and those are skipped), or a ReaL ``raters.npz``
(its questions; no models, so no image is skipped). With ``--predictions`` and
``--original-labels``, the top-1s are read from the predictions instead.

Writes DIR/tasks.jsonl, DIR/tasks.csv (formats in ``auditing.tasks``) and
DIR/summary.json, each to a temporary file first, and prints the counts.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from auditing import labelsets
from auditing import tasks as tasks_lib
from auditing.predictions import load_predictions


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
    parser.add_argument("--proposals", required=True, metavar="PARQUET|NPZ",
                        help="stage 2's proposals.parquet, or a ReaL raters.npz")
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
    parser.add_argument("--out", required=True, metavar="DIR")


def main(args: argparse.Namespace) -> int:
    proposals = read_proposals(args.proposals)
    original, top1 = None, None
    if args.predictions:
        if not args.original_labels:
            raise SystemExit("--predictions needs --original-labels")
        original = (labelsets.original_val_labels() if args.original_labels == "tfds-wheel"
                    else labelsets.read_label_tsv(args.original_labels))
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
