"""Crowd tasks to a Label Studio project and its annotations back as votes, over Label Studio's HTTP API.

    client = LabelStudioClient("http://localhost:8080", api_key)
    pushed = push_tasks(client, "out/tasks/tasks.jsonl", project="imagenet-val audit")
    pulled = pull_votes(client, "imagenet-val audit")        # auditing.label_studio.PulledVotes
    write_pulled(pulled, "out/votes/label_studio.parquet")   # + .quarantine.csv, .gold.csv

or, from a config section, ``LabelStudioProject(url=..., project=..., api_key_env=...)``
with ``.push(tasks_path)`` and ``.pull(out)``.

The API key is a Label Studio personal access token (Account & Settings > Personal Access
Token), exchanged for short-lived access tokens at ``/api/token/refresh/`` and refreshed
when one expires; a legacy token (``Authorization: Token``, off by default since 1.17) works
where the server enables them. Formats (labelling interface, task data, export -> votes)
are in ``auditing.label_studio``; this module only talks to the server and writes files.
Plain ``requests``: ``label-studio-sdk`` would add pins (pydantic, httpx) for a few calls.
"""
from __future__ import annotations

from auditing.errors import InputError
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import requests

from auditing import atomic
from auditing import label_studio as formats
from auditing import tasks as tasks_lib
from auditing.votes import write_quarantine
from pipelines.config import LabelStudioConfig

IMPORT_BATCH = 500  # tasks per import request: Label Studio caps request bodies
PAGE_SIZE = 1000


class LabelStudioError(InputError):
    """A request Label Studio refused or could not answer; the message names the request."""


class LabelStudioClient:
    """The few Label Studio API calls label-audit needs, with token refresh."""

    def __init__(self, url: str, api_key: str, timeout: float = 120.0,
                 session: requests.Session | None = None) -> None:
        if not api_key:
            raise LabelStudioError("no Label Studio API key given (a personal access token)")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.session = session or requests.Session()
        self._authorization: str | None = None

    # ------------------------------------------------------------ transport

    def _authorize(self) -> str:
        try:
            response = self.session.post(f"{self.url}/api/token/refresh/", json={"refresh": self.api_key},
                                         timeout=self.timeout)
        except requests.RequestException as e:
            raise LabelStudioError(f"cannot reach Label Studio at {self.url}: {e}") from None
        if response.ok and "access" in response.json():
            return f"Bearer {response.json()['access']}"
        return f"Token {self.api_key}"  # not a personal access token: try it as a legacy token

    def send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """``method path`` (a path of the server, e.g. an image URL of a task), authorised; one
        re-authorisation on 401 (an expired access token). Raises LabelStudioError unless 2xx."""
        for attempt in (0, 1):
            if self._authorization is None or attempt:
                self._authorization = self._authorize()
            try:
                response = self.session.request(method, f"{self.url}{path}", timeout=self.timeout,
                                                headers={"Authorization": self._authorization}, **kwargs)
            except requests.RequestException as e:
                raise LabelStudioError(f"{method} {self.url}{path}: {e}") from None
            if response.status_code != 401:
                break
        if not response.ok:
            body = " ".join(response.text.split())[:300]
            hint = " (is the API key a personal access token of this server?)" if response.status_code == 401 else ""
            raise LabelStudioError(f"{method} {self.url}{path}: HTTP {response.status_code}{hint}: {body}")
        return response

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of ``method path`` (``send``)."""
        response = self.send(method, path, **kwargs)
        return response.json() if response.content else None

    def _pages(self, path: str, key: str = "results") -> list[dict]:
        items, page = [], 1
        while True:
            sep = "&" if "?" in path else "?"
            body = self.request("GET", f"{path}{sep}page={page}&page_size={PAGE_SIZE}")
            if isinstance(body, list):  # endpoints without pagination
                return body
            items.extend(body.get(key) or [])
            if not body.get("next"):
                return items
            page += 1

    # ------------------------------------------------------------ projects, tasks, users

    def find_project(self, title: str) -> dict | None:
        matches = [p for p in self._pages("/api/projects/") if p.get("title") == title]
        if len(matches) > 1:
            raise LabelStudioError(f"{len(matches)} Label Studio projects are titled {title!r} "
                                   f"(ids {[p['id'] for p in matches]}); rename all but one")
        return matches[0] if matches else None

    def ensure_project(self, title: str, label_config: str) -> tuple[dict, bool]:
        """The project titled ``title`` (created if missing, its interface updated if it
        differs), and whether it was created."""
        project = self.find_project(title)
        if project is None:
            return self.request("POST", "/api/projects/", json={"title": title, "label_config": label_config}), True
        if project.get("label_config", "").strip() != label_config.strip():
            project = self.request("PATCH", f"/api/projects/{project['id']}/", json={"label_config": label_config})
        return project, False

    def import_tasks(self, project_id: int, tasks: Sequence[Mapping[str, Any]]) -> int:
        """Import Label Studio tasks ({"data", "annotations"?}); returns the tasks created."""
        created = 0
        for start in range(0, len(tasks), IMPORT_BATCH):
            body = self.request("POST", f"/api/projects/{project_id}/import",
                                json=list(tasks[start:start + IMPORT_BATCH]))
            created += int(body.get("task_count", 0))
        return created

    def export(self, project_id: int) -> list[dict]:
        """Every task of the project with its annotations (Label Studio's JSON export)."""
        return self.request("GET", f"/api/projects/{project_id}/export?exportType=JSON&download_all_tasks=true")

    def users(self) -> list[dict]:
        return self._pages("/api/users/")

    def create_user(self, email: str) -> dict:
        return self.request("POST", "/api/users/", json={"email": email, "username": email.split("@")[0]})

    def add_local_storage(self, project_id: int, folder: str) -> None:
        """Let the project's tasks show files of ``folder`` (a folder of the server's machine,
        under its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) unless a storage already covers it."""
        storages = self.request("GET", f"/api/storages/localfiles?project={project_id}") or []
        if any(s.get("path") == folder for s in storages):
            return
        self.request("POST", "/api/storages/localfiles", json={
            "project": project_id, "path": folder, "title": f"label-audit images {folder}", "use_blob_urls": False})


# ---------------------------------------------------------------- push

@dataclasses.dataclass(frozen=True)
class PushResult:
    project_id: int
    project_title: str
    created_project: bool
    tasks_read: int
    tasks_imported: int
    tasks_already_there: int
    annotations_imported: int = 0
    votes_outside_tasks: int = 0
    votes_on_tasks_already_there: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_task_records(path: str | os.PathLike) -> list[dict]:
    """The tasks of a tasks JSONL (``auditing.tasks``), checked by its reader."""
    tasks_lib.read_tasks_jsonl(path)  # raises TaskFileError naming the file, line and field
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def local_file_url(folder: str | os.PathLike, file_name: str, document_root: str | os.PathLike) -> str:
    """The URL Label Studio serves ``folder/file_name`` at from local-files storage."""
    relative = os.path.relpath(Path(folder, file_name).resolve(), Path(document_root).resolve())
    if relative.startswith(".."):
        raise ValueError(f"image folder {folder} is not under the document root {document_root} "
                         "(LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT of the server)")
    return "/data/local-files/?d=" + requests.utils.quote(relative)


def _carried_rater_users(client: LabelStudioClient, rater_ids: Sequence[str]) -> dict[str, int]:
    """Label Studio user ids of the raters whose votes are carried in, created if missing."""
    by_email = {str(u.get("email", "")).lower(): int(u["id"]) for u in client.users()}
    ids = {}
    for rater in rater_ids:
        email = formats.carried_rater_email(rater)
        if email not in by_email:
            by_email[email] = int(client.create_user(email)["id"])
        ids[rater] = by_email[email]
    return ids


def push_tasks(client: LabelStudioClient, tasks_path: str | os.PathLike, project: str,
               image_url_template: str | None = None, example_url_template: str | None = None,
               image_folder: str | os.PathLike | None = None, document_root: str | os.PathLike = "/",
               votes: pd.DataFrame | None = None) -> PushResult:
    """Create or reuse the project titled ``project`` and import the tasks of ``tasks_path``
    that it does not hold yet (by ``task_id``), so pushing again after a re-audit adds only
    the new tasks.

    Image URL per task: ``image_url_template`` (``{file_name}``), else a local-files URL of
    ``image_folder`` (registered as the project's local-files storage; ``document_root`` is
    the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), else the task's ``image_uri``.
    ``example_url_template`` (``{wnid}``, ``{index}``) adds an example image per label.
    ``votes`` (vote schema) already collected elsewhere are carried into the new tasks as
    annotations, one Label Studio user per rater (``auditing.label_studio.carried_rater_email``).
    """
    records = read_task_records(tasks_path)
    config = formats.label_config(with_examples=example_url_template is not None)
    info, created = client.ensure_project(project, config)
    project_id = int(info["id"])
    if image_folder is not None:
        client.add_local_storage(project_id, str(Path(image_folder).resolve()))
    existing = set() if created else {
        str(t["data"].get("task_id")) for t in client.export(project_id) if isinstance(t.get("data"), Mapping)}
    new = [r for r in records if str(r["task_id"]) not in existing]

    def image_url(record: Mapping[str, Any]) -> str:
        if image_url_template is not None:
            return image_url_template.format(file_name=record["file_name"])
        if image_folder is not None:
            return local_file_url(image_folder, record["file_name"], document_root)
        return str(record.get("image_uri") or record["file_name"])

    ls_tasks = [{"data": formats.task_data(r, image_url(r), example_url_template)} for r in new]
    annotations_imported = outside = on_existing = 0
    if votes is not None and len(votes):
        questions = pd.DataFrame(
            [(r["task_id"], r["file_name"], int(l["index"]), p) for r in records for p, l in enumerate(r["labels"])],
            columns=["task_id", "file_name", "label", "position"])
        by_task, outside = formats.annotations_from_votes(questions, votes)
        on_existing = sum(len(a["result"]) for t, anns in by_task.items() if t in existing for a in anns)
        users = _carried_rater_users(client, sorted({a["rater_id"] for anns in by_task.values() for a in anns}))
        for task in ls_tasks:
            anns = by_task.get(task["data"]["task_id"], [])
            # Label Studio marks imported annotations as ground truth unless told otherwise.
            task["annotations"] = [{"result": a["result"], "completed_by": users[a["rater_id"]],
                                    "ground_truth": False} for a in anns]
            annotations_imported += len(anns)
    imported = client.import_tasks(project_id, ls_tasks) if ls_tasks else 0
    return PushResult(project_id, str(info.get("title", project)), created, len(records), imported,
                      len(records) - len(new), annotations_imported, outside, on_existing)


# ---------------------------------------------------------------- pull

def pull_votes(client: LabelStudioClient, project: str) -> formats.PulledVotes:
    """Every annotation of the project titled ``project`` as votes, gold and quarantine
    (``auditing.label_studio.export_to_votes``). Raises LabelStudioError if there is no
    such project."""
    info = client.find_project(project)
    if info is None:
        raise LabelStudioError(f"{client.url} has no project titled {project!r}")
    raters = {int(u["id"]): formats.rater_id_of_user(u) for u in client.users()}
    return formats.export_to_votes(client.export(int(info["id"])), raters,
                                   source=f"{client.url}/projects/{info['id']}")


def sibling_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Where ``write_pulled`` puts the votes, quarantine, gold and summary of ``out``."""
    out = Path(out)
    stem = out.with_suffix("")
    return {"votes": out, "quarantine": Path(f"{stem}.quarantine.csv"), "gold": Path(f"{stem}.gold.csv"),
            "summary": Path(f"{stem}.summary.json")}


def write_pulled(pulled: formats.PulledVotes, out: str | os.PathLike) -> dict[str, Path]:
    """Votes as Parquet at ``out`` (read by ``auditing.votes.read_votes``), quarantine CSV,
    gold CSV (file_name, label, truth) and a summary JSON beside it, each atomically."""
    paths = sibling_paths(out)
    with atomic.atomic_path(paths["votes"]) as tmp:
        pulled.votes.to_parquet(tmp, index=False)
    write_quarantine(pulled.quarantine, paths["quarantine"])
    with atomic.atomic_path(paths["gold"]) as tmp:
        pulled.gold.to_csv(tmp, index=False)
    atomic.write_text(paths["summary"], json.dumps(pulled.summary(), indent=2) + "\n")
    return paths


# ---------------------------------------------------------------- one project, as a config names it

class LabelStudioProject(LabelStudioConfig):
    """A Label Studio project as a config section (``stages.tasks.label_studio``,
    pipelines/config.py ``LabelStudioConfig``: its fields) names it; the key is read
    from the environment variable ``api_key_env`` so that configs hold no secrets."""

    def client(self) -> LabelStudioClient:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise LabelStudioError(f"${self.api_key_env} is not set: it should hold a personal access token "
                                   f"of {self.url}")
        return LabelStudioClient(self.url, key)

    def push(self, tasks_path: str | os.PathLike, votes: pd.DataFrame | None = None) -> PushResult:
        """``push_tasks`` of ``tasks_path`` into this project (new tasks only)."""
        return push_tasks(self.client(), tasks_path, self.project, image_url_template=self.image_url_template,
                          example_url_template=self.example_url_template, image_folder=self.image_folder,
                          document_root=self.document_root, votes=votes)

    def pull(self, out: str | os.PathLike) -> tuple[formats.PulledVotes, dict[str, Path]]:
        """Every answer so far as votes (``pull_votes``), written by ``write_pulled`` at ``out``."""
        pulled = pull_votes(self.client(), self.project)
        return pulled, write_pulled(pulled, out)
