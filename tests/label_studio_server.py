"""A real Label Studio server for tests: its own process, temporary data dir, SQLite.

``make label-studio`` installs it into .venv-label-studio (its pins conflict with the
project's, and it only needs to answer HTTP). ``running_server`` starts it on a free port
of 127.0.0.1, waits for /health, makes a personal access token for the admin user that
the environment variables create, and stops the process group at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
LABEL_STUDIO_BIN = REPO / ".venv-label-studio" / "bin" / "label-studio"
STARTUP_TIMEOUT_S = 420  # ~50 s on an idle machine; migrations of a fresh data dir take longer under load
ADMIN_EMAIL = "admin@label-audit.example"
ADMIN_PASSWORD = "label-audit-test-password"


@dataclasses.dataclass(frozen=True)
class Server:
    url: str
    api_key: str  # a personal access token of the admin
    document_root: Path  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def login(url: str, email: str, password: str) -> requests.Session:
    """A logged-in browser session: the CSRF cookie of the login page, then the form."""
    session = requests.Session()
    session.get(f"{url}/user/login/", timeout=60).raise_for_status()
    response = session.post(f"{url}/user/login/", data={
        "email": email, "password": password, "csrfmiddlewaretoken": session.cookies["csrftoken"]},
        headers={"Referer": f"{url}/user/login/"}, allow_redirects=False, timeout=60)
    if response.status_code != 302:
        raise RuntimeError(f"login to {url} as {email} failed: HTTP {response.status_code}")
    return session


def personal_access_token(url: str, email: str, password: str) -> str:
    session = login(url, email, password)
    response = session.post(f"{url}/api/token/", headers={"X-CSRFToken": session.cookies["csrftoken"],
                                                          "Referer": url}, timeout=60)
    response.raise_for_status()
    return response.json()["token"]


@contextlib.contextmanager
def running_server(data_dir: Path) -> Iterator[Server]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    document_root = data_dir / "files"
    document_root.mkdir(parents=True)
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir / "data"),
           "LABEL_STUDIO_USERNAME": ADMIN_EMAIL, "LABEL_STUDIO_PASSWORD": ADMIN_PASSWORD,
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
           "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the server runs from its own venv, not the project's
    log = data_dir / "label-studio.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(LABEL_STUDIO_BIN), "start", "--no-browser", "--host", "127.0.0.1",
                                    "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"label-studio exited with {process.returncode}; see {log}:\n"
                                   + log.read_text(errors="replace")[-2000:])
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=5).ok:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"label-studio did not answer {url}/health in {STARTUP_TIMEOUT_S} s; see {log}")
            time.sleep(2)
        yield Server(url, personal_access_token(url, ADMIN_EMAIL, ADMIN_PASSWORD), document_root, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
