"""``label-audit tasks preview TASKS --out DIR``: every exported task as the HTML page a
rater would see (the image; per label its name, WordNet gloss and an example image;
yes / maybe / no), one ``<task_id>.html`` per task plus an ``index.html`` listing them.

    label-audit tasks preview out/store/tasks/<key>/tasks.jsonl --images IMAGES_DIR \\
        [--examples ../shared/data/imagenet_class_examples] --out preview/

``TASKS`` is a tasks JSONL (``auditing.tasks``). Each task's image is its ``image_uri``
where that is a local file, else ``file_name`` under ``--images``. A label's example
is its ``example_image`` (``auditing.task_labels.with_example_images``) under
``--examples``, or, for task files written without it, the class's image found there
by wnid. A missing image is shown as missing, never silently skipped.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from auditing import atomic, task_labels, templating
from auditing.imagenet import load_classes
from auditing.tasks import task_record

log = logging.getLogger(__name__)


def read_task_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The task records of a tasks JSONL; a bad line raises ``TaskFileError`` naming it."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                # The one validator of a task line (auditing.tasks, which read_tasks_jsonl uses).
                yield task_record(path, number, line)


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _image_path(record: dict[str, Any], images_dir: Path) -> Path:
    uri = str(record.get("image_uri") or "")
    if uri and "://" not in uri and Path(uri).is_absolute():
        return Path(uri)
    return images_dir / (uri if uri and "://" not in uri else record["file_name"])


def write_previews(tasks_path: str | os.PathLike, out_dir: str | os.PathLike,
                   images_dir: str | os.PathLike | None = None,
                   examples_dir: str | os.PathLike | None = None,
                   limit: int | None = None) -> list[Path]:
    """Write one page per task (the first ``limit`` tasks) and an index; returns the pages."""
    tasks_path, out = Path(tasks_path), Path(out_dir)
    images_dir = Path(images_dir) if images_dir is not None else tasks_path.parent
    examples: dict[int, str] = {}
    if examples_dir is not None:
        examples = task_labels.examples_by_class(
            (p.relative_to(examples_dir).as_posix() for p in Path(examples_dir).rglob("*") if p.is_file()),
            load_classes())
    out.mkdir(parents=True, exist_ok=True)
    pages, listed = [], []
    for record in read_task_records(tasks_path):
        if limit is not None and len(pages) >= limit:
            break
        record = task_labels.with_example_images([record], examples)[0] if examples else record
        example_bytes = {}
        for label in record["labels"]:
            name = label.get("example_image")
            if name and examples_dir is not None and name not in example_bytes:
                data = _read_bytes(Path(examples_dir) / name)
                if data is not None:
                    example_bytes[name] = data
        image = _read_bytes(_image_path(record, images_dir))
        if image is None:
            log.warning("%s: image %s not found under %s", record["task_id"], record["file_name"], images_dir)
        page = out / f"{record['task_id']}.html"
        atomic.write_text(page, task_labels.render_task_page(record, image, example_bytes))
        pages.append(page)
        listed.append({"href": page.name, "task_id": record["task_id"], "file_name": record["file_name"],
                       "labels": [label["name"] for label in record["labels"]], "has_image": image is not None})
    atomic.write_text(out / "index.html", templating.render("task_index.html.j2", tasks=listed,
                                                            source=str(tasks_path)))
    return pages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tasks", type=Path, help="a tasks JSONL (stages.tasks' export)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the HTML pages")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder holding the images (default: the tasks file's folder)")
    parser.add_argument("--examples", type=Path, default=None,
                        help="folder of example images per class, named <wnid>_... or <wnid>/...")
    parser.add_argument("--limit", type=int, default=None, help="preview only the first N tasks")


def main(args: argparse.Namespace) -> int:
    pages = write_previews(args.tasks, args.out, args.images, args.examples, args.limit)
    print(f"wrote {len(pages)} task page(s) and index.html to {args.out}")
    return 0
