"""Label Studio's formats for crowd tasks and votes: no network here (pipelines/label_studio.py talks to the server).

The labelling interface (``label_config``) shows the image and, for each label of the task
(a ``Repeater`` over the task's ``labels``), its name, WordNet gloss, optionally an example
image, and a Yes (95% sure it is in the image) / Maybe / No (95% sure it is not) choice,
as the ReaL interface did. The choice of the task's i-th label is the control
``answer_<i>``; the task data (``task_data``) carries ``task_id``, ``file_name``, ``image``
and ``labels`` [{index, wnid, name, gloss, example?}], so that an answer maps back to a
(file_name, class index) question with no other file.

``export_to_votes`` turns Label Studio's JSON export into the vote schema of
``auditing.votes`` (task_id, file_name, label, rater_id, answer, timestamp). What it reads
is one row per (annotation, label of its task) plus one per answer to a control that is
not a label of the task; every such row ends as a vote, a gold row (annotations marked
ground truth) or a quarantine row with a reason, so ``read == votes + gold + quarantined``.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd

from auditing.tasks import ANSWER_OPTIONS
from auditing.votes import ANSWER_DTYPE, ANSWERS, QUARANTINE_COLUMNS

ANSWER_CONTROL = "answer_{position}"
_ANSWER_CONTROL_RE = re.compile(r"answer_(\d+)")
IMAGE_OBJECT = "image"
# Users that label-audit creates for raters of votes carried into a project (push with
# votes) get the email "<rater_id>@<domain>"; pulling maps them back to <rater_id>.
CARRIED_RATER_DOMAIN = "raters.label-audit.invalid"
GOLD_COLUMNS: tuple[str, ...] = ("file_name", "label", "truth")
VOTE_COLUMNS: tuple[str, ...] = ("task_id", "file_name", "label", "rater_id", "answer", "timestamp")

# Quarantine reasons; a row gets the first that applies, in this order.
NOT_A_TASK = "not_a_label_audit_task"  # the task's data lacks task_id / file_name / labels
REPLACED = "replaced_by_later_answer"  # the annotator answered the task again later
SKIPPED = "skipped"  # the annotator pressed Skip (Label Studio: was_cancelled)
LABEL_NOT_IN_TASK = "label_not_in_task"  # an answer to a control that is no label of the task
DUPLICATE_ANSWER = "duplicate_answer"  # a second answer to the same label in one annotation
UNKNOWN_ANSWER = "unknown_answer"  # not exactly one of yes / maybe / no
UNANSWERED = "unanswered"  # a label of the task left without an answer (partly answered task)
GOLD_NOT_DECISIVE = "gold_answer_maybe"  # a ground-truth annotation answering "maybe"
REASONS: tuple[str, ...] = (NOT_A_TASK, REPLACED, SKIPPED, LABEL_NOT_IN_TASK, DUPLICATE_ANSWER, UNKNOWN_ANSWER,
                            UNANSWERED, GOLD_NOT_DECISIVE)


# ---------------------------------------------------------------- the labelling interface

def label_config(with_examples: bool = False) -> str:
    """The project's labelling interface (Label Studio XML), see the module docstring."""
    # A Choice shows its value and stores its alias; inner text would replace the value.
    choices = "\n".join(f'          <Choice value={quoteattr(o["text"])} alias={quoteattr(o["value"])}/>'
                        for o in ANSWER_OPTIONS)
    example = ('      <Image name="example_{{idx}}" value="$labels[{{idx}}].example" '
               'maxWidth="160px"/>\n' if with_examples else "")
    return f"""<View>
  <Header value="Which of these are in the image? Answer every label."/>
  <Image name="{IMAGE_OBJECT}" value="$image" maxWidth="640px"/>
  <Repeater on="$labels" indexFlag="{{{{idx}}}}">
    <View style="display: flex; gap: 1em; align-items: center; border-top: 1px solid #ddd; padding: 0.5em 0">
{example}      <View>
        <Header value="$labels[{{{{idx}}}}].name" size="4"/>
        <Text name="gloss_{{{{idx}}}}" value="$labels[{{{{idx}}}}].gloss"/>
        <Choices name="{ANSWER_CONTROL.format(position='{{idx}}')}" toName="{IMAGE_OBJECT}" choice="single"
                 showInline="true" required="true">
{choices}
        </Choices>
      </View>
    </View>
  </Repeater>
</View>
"""


def task_data(record: Mapping[str, Any], image_url: str, example_url_template: str | None = None) -> dict:
    """One task of a tasks JSONL (``auditing.tasks``) as Label Studio task data."""
    labels = []
    for label in record["labels"]:
        entry = {"index": int(label["index"]), "wnid": label.get("wnid", ""), "name": label.get("name", ""),
                 "gloss": label.get("gloss", "")}
        if example_url_template is not None:
            entry["example"] = example_url_template.format(wnid=entry["wnid"], index=entry["index"])
        labels.append(entry)
    return {"task_id": record["task_id"], "file_name": record["file_name"], "image": image_url, "labels": labels}


def answer_result(position: int, answer: str) -> dict:
    """One answer as a Label Studio annotation result."""
    return {"from_name": ANSWER_CONTROL.format(position=position), "to_name": IMAGE_OBJECT,
            "type": "choices", "value": {"choices": [answer]}}


def carried_rater_email(rater_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", rater_id):
        raise ValueError(f"rater_id {rater_id!r} cannot name a Label Studio user; "
                         "use letters, digits and . _ + -")
    return f"{rater_id}@{CARRIED_RATER_DOMAIN}".lower()


def rater_id_of_user(user: Mapping[str, Any]) -> str:
    """A Label Studio user (``/api/users`` entry) as a rater_id: the email, or the rater
    id a carried-votes user was created for."""
    email = str(user.get("email") or "")
    local, _, domain = email.rpartition("@")
    if domain == CARRIED_RATER_DOMAIN:
        return local
    return email or f"label-studio-user-{user['id']}"


def annotations_from_votes(questions: pd.DataFrame, votes: pd.DataFrame) -> tuple[dict[str, list[dict]], int]:
    """Votes already collected (vote schema) as annotations of the tasks in ``questions``
    (task_id, file_name, label, position): {task_id: [{"rater_id", "result"}, ...]}, one
    annotation per (task, rater) in first-vote order, and the number of votes on questions of
    no task (left out)."""
    joined = votes[["file_name", "label", "rater_id", "answer"]].merge(
        questions[["task_id", "file_name", "label", "position"]], on=["file_name", "label"], how="left")
    outside = int(joined["task_id"].isna().sum())
    joined = joined.dropna(subset=["task_id"])
    annotations: dict[str, list[dict]] = {}
    for (task, rater), group in joined.groupby(["task_id", "rater_id"], sort=False):
        group = group.sort_values("position")
        annotations.setdefault(task, []).append({
            "rater_id": str(rater),
            "result": [answer_result(int(p), str(a)) for p, a in zip(group["position"], group["answer"])]})
    return annotations, outside


# ---------------------------------------------------------------- export -> votes

class PulledVotes(NamedTuple):
    """``votes`` (VOTE_COLUMNS), ``gold`` (GOLD_COLUMNS: truth 1 = present, 0 = absent, from
    ground-truth annotations), ``quarantine`` (``auditing.votes.QUARANTINE_COLUMNS``; ``row`` is
    the Label Studio annotation id)."""

    votes: pd.DataFrame
    gold: pd.DataFrame
    quarantine: pd.DataFrame

    def summary(self) -> dict[str, Any]:
        counts = self.quarantine["reason"].value_counts()
        by_reason = {reason: int(counts.get(reason, 0)) for reason in REASONS}
        return {"read": len(self.votes) + len(self.gold) + len(self.quarantine), "votes": len(self.votes),
                "gold": len(self.gold), "quarantined": len(self.quarantine), "quarantined_by_reason": by_reason,
                "raters": int(self.votes["rater_id"].nunique())}


@dataclasses.dataclass
class _Rows:
    votes: list[tuple] = dataclasses.field(default_factory=list)
    gold: list[tuple] = dataclasses.field(default_factory=list)
    quarantine: list[tuple] = dataclasses.field(default_factory=list)


def _choice(item: Mapping[str, Any]) -> str | None:
    choices = (item.get("value") or {}).get("choices") if isinstance(item.get("value"), Mapping) else None
    if isinstance(choices, list) and len(choices) == 1 and str(choices[0]).strip().lower() in ANSWERS:
        return str(choices[0]).strip().lower()
    return None


def _label_audit_task(data: Any) -> bool:
    return (isinstance(data, Mapping) and all(k in data for k in ("task_id", "file_name", "labels"))
            and isinstance(data["labels"], list)
            and all(isinstance(l, Mapping) and isinstance(l.get("index"), int) for l in data["labels"]))


def _latest_per_annotator(annotations: Sequence[Mapping[str, Any]]) -> set[int]:
    """Ids of the annotations a later one by the same annotator replaces (ground truth aside)."""
    latest: dict[Any, Mapping[str, Any]] = {}
    replaced = set()
    for a in annotations:
        if a.get("ground_truth"):
            continue
        key = a.get("completed_by")
        earlier = latest.get(key)
        if earlier is None:
            latest[key] = a
            continue
        order = lambda x: (str(x.get("updated_at") or x.get("created_at") or ""), int(x["id"]))  # noqa: E731
        older, newer = sorted((earlier, a), key=order)
        replaced.add(int(older["id"]))
        latest[key] = newer
    return replaced


def _user_id(completed_by: Any) -> Any:
    return completed_by.get("id") if isinstance(completed_by, Mapping) else completed_by


def _rater(completed_by: Any, raters: Mapping[int, str]) -> str:
    if isinstance(completed_by, Mapping) and completed_by.get("email"):
        return rater_id_of_user(completed_by)
    return raters.get(completed_by, f"label-studio-user-{completed_by}")


def export_to_votes(export: Iterable[Mapping[str, Any]], raters: Mapping[int, str],
                    source: str = "label-studio") -> PulledVotes:
    """Label Studio's JSON export (a list of tasks with ``annotations``) as votes, gold and a
    counted quarantine (module docstring). ``raters``: Label Studio user id -> rater_id.

    An annotator's later annotation of a task replaces the earlier one (the earlier one's
    rows are quarantined as ``replaced_by_later_answer``), as Label Studio's update does.
    Annotations marked ground truth give gold rows, not votes.
    """
    rows = _Rows()
    for task in export:
        data = task.get("data") or {}
        annotations = sorted(task.get("annotations") or [], key=lambda a: int(a["id"]))
        if not annotations:
            continue
        if not _label_audit_task(data):
            for a in annotations:
                rows.quarantine.append((source, int(a["id"]), NOT_A_TASK,
                                        f"Label Studio task {task.get('id')}: data lacks task_id, file_name "
                                        "or labels [{index}]", None, None, _rater(a.get("completed_by"), raters),
                                        None))
            continue
        replaced = _latest_per_annotator(annotations)
        for a in annotations:
            _annotation_rows(rows, task, data, a, raters, source, replaced)
    votes = pd.DataFrame(rows.votes, columns=list(VOTE_COLUMNS)).astype(
        {"task_id": object, "file_name": object, "label": np.int64, "rater_id": object})
    votes["answer"] = pd.Categorical(votes["answer"], dtype=ANSWER_DTYPE)
    votes["timestamp"] = pd.to_datetime(votes["timestamp"], utc=True, format="ISO8601")
    gold = pd.DataFrame(rows.gold, columns=list(GOLD_COLUMNS)).astype(
        {"file_name": object, "label": np.int64, "truth": np.int64})
    quarantine = pd.DataFrame(rows.quarantine, columns=list(QUARANTINE_COLUMNS))
    return PulledVotes(votes, gold, quarantine)


def _annotation_rows(rows: _Rows, task: Mapping[str, Any], data: Mapping[str, Any], annotation: Mapping[str, Any],
                     raters: Mapping[int, str], source: str, replaced: set[int]) -> None:
    """Every row one annotation contributes (module docstring), each to exactly one list."""
    labels = [int(l["index"]) for l in data["labels"]]
    file_name, tid = str(data["file_name"]), str(data["task_id"])
    annotation_id = int(annotation["id"])
    rater = _rater(annotation.get("completed_by"), raters)
    where = f"task {tid} (Label Studio task {task.get('id')}), annotation {annotation_id}"
    timestamp = annotation.get("updated_at") or annotation.get("created_at")

    def quarantine(reason: str, label: int | None, answer: Any, detail: str) -> None:
        rows.quarantine.append((source, annotation_id, reason, f"{where}: {detail}", file_name, label, rater, answer))

    answered: dict[int, Any] = {}
    for item in annotation.get("result") or []:
        name = str(item.get("from_name", "")) if isinstance(item, Mapping) else ""
        match = _ANSWER_CONTROL_RE.fullmatch(name)
        position = int(match.group(1)) if match else -1
        answer = _choice(item) if isinstance(item, Mapping) else None
        raw_answer = (item.get("value") or {}).get("choices") if isinstance(item, Mapping) else item
        if annotation_id in replaced or annotation.get("was_cancelled"):
            # Answers to the task's labels are counted with the labels, below.
            if not 0 <= position < len(labels):
                quarantine(REPLACED if annotation_id in replaced else SKIPPED, None, raw_answer,
                           f"answer to {name!r} in an annotation that is replaced or skipped")
            continue
        if not 0 <= position < len(labels):
            quarantine(LABEL_NOT_IN_TASK, None, raw_answer,
                       f"answer to {name!r}, but the task has labels answer_0..answer_{len(labels) - 1}")
        elif position in answered:
            quarantine(DUPLICATE_ANSWER, labels[position], raw_answer, f"a second answer to {name!r}")
        else:
            answered[position] = answer if answer is not None else raw_answer
            if answer is None:
                quarantine(UNKNOWN_ANSWER, labels[position], raw_answer,
                           f"{name!r}: {raw_answer!r} is not one of {list(ANSWERS)}")
    for position, label in enumerate(labels):
        if annotation_id in replaced:
            quarantine(REPLACED, label, None, "a later annotation by the same annotator replaces this one")
        elif annotation.get("was_cancelled"):
            quarantine(SKIPPED, label, None, "the annotator skipped the task")
        elif position not in answered:
            quarantine(UNANSWERED, label, None, f"no answer to {ANSWER_CONTROL.format(position=position)!r}")
        elif answered[position] not in ANSWERS:
            continue  # already quarantined as unknown_answer
        elif annotation.get("ground_truth"):
            if answered[position] == "maybe":
                quarantine(GOLD_NOT_DECISIVE, label, "maybe", "a ground-truth answer must be yes or no")
            else:
                rows.gold.append((file_name, label, int(answered[position] == "yes")))
        else:
            rows.votes.append((tid, file_name, label, rater, answered[position], timestamp))
