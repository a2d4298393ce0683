"""What a rater sees of each label in a task: its name, its WordNet gloss and an example
image of the class, as the ReaL rating interface showed them (Beyer et al. 2020, Fig. 2).

Example images come from a configurable folder (``imagenet_class_examples/`` in the
shared data: one ImageNet image per class named ``<wnid>_<name>.JPEG``), referenced by
file name within that folder; a class folder layout (``<wnid>/<file>``) works too.
Pure: the folder listing is given as file names (``pipelines/`` lists it).
"""
from __future__ import annotations

from auditing.errors import InputError
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from auditing.imagenet import ImageNetClasses

_WNID = re.compile(r"(?:^|/)(n\d{8})(?:[_/.]|$)")


class ExamplesFolderError(InputError):
    """An examples folder whose file names say no class; the message names the file."""


def example_class(file_name: str, classes: ImageNetClasses) -> int:
    """The class an example file shows, from the wnid that starts its name (or its folder)."""
    match = _WNID.search(file_name)
    if match is None:
        raise ExamplesFolderError(f"{file_name}: an example's name must start with its class's wnid "
                                  "(e.g. n01440764_tench.JPEG, or n01440764/any.JPEG)")
    try:
        return classes.index_of(match.group(1))
    except KeyError as e:
        raise ExamplesFolderError(f"{file_name}: {e.args[0]}") from None


def examples_by_class(file_names: Iterable[str], classes: ImageNetClasses) -> dict[int, str]:
    """{class index: the example's file name}; the first name in sorted order where a class
    has several, so the choice does not depend on the listing order."""
    chosen: dict[int, str] = {}
    for name in sorted(file_names):
        chosen.setdefault(example_class(name, classes), name)
    return chosen


@dataclasses.dataclass(frozen=True)
class LabelInfo:
    """One label of a task as a rater reads it."""

    index: int
    wnid: str
    name: str
    lemmas: str
    gloss: str
    example_image: str | None  # file name within the examples folder; None if the class has none

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def label_info(label: int, classes: ImageNetClasses, examples: Mapping[int, str] | None = None) -> LabelInfo:
    label = int(label)
    if not 0 <= label < len(classes):
        raise ValueError(f"label {label} is outside [0, {len(classes)})")
    return LabelInfo(index=label, wnid=classes.wnids[label], name=classes.names[label],
                     lemmas=classes.lemmas[label], gloss=classes.glosses[label],
                     example_image=(examples or {}).get(label))


def with_example_images(records: Sequence[Mapping[str, Any]], examples: Mapping[int, str]
                        ) -> list[dict[str, Any]]:
    """Task records (``auditing.tasks.task_records``) with ``example_image`` added to each
    label (None where the examples folder has no image of that class)."""
    out = []
    for record in records:
        labels = [{**label, "example_image": examples.get(int(label["index"]))}
                  for label in record["labels"]]
        out.append({**record, "labels": labels})
    return out


def render_task_page(record: Mapping[str, Any], image: bytes | None,
                     example_images: Mapping[str, bytes]) -> str:
    """One task as a rater sees it (HTML): the image, then per label its name, gloss,
    lemmas, example image and the yes / maybe / no choice. ``record`` is a task record
    (``with_example_images``); ``image`` the encoded image to rate; ``example_images``
    {example file name: encoded bytes}. Images are inlined, so the page stands alone."""
    from auditing import templating

    labels = []
    for label in record["labels"]:
        example = label.get("example_image")
        data = example_images.get(example) if example else None
        labels.append({**label, "example_uri": templating.thumbnail_uri(data, 160) if data else None})
    return templating.render("task_preview.html.j2", task=record, labels=labels,
                             image_uri=templating.thumbnail_uri(image, 640) if image else None,
                             answer_options=record.get("answer_options") or _default_answers())


def _default_answers() -> list[dict[str, str]]:
    from auditing.tasks import ANSWER_OPTIONS

    return list(ANSWER_OPTIONS)
