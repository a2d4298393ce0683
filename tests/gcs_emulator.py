"""A local GCS emulator for tests: ``gcp-storage-emulator`` (PyPI) on 127.0.0.1.

Fixtures (import them into a test module, or list this module in ``pytest_plugins``):
- ``gcs_bucket`` (session): starts the emulator on a free loopback port with a default
  bucket, sets ``STORAGE_EMULATOR_HOST`` so that Beam's own GCS filesystem and
  google-cloud-storage talk to it, yields the bucket name, stops it at the end.
- ``gcs_prefix`` (per test): a fresh ``gs://<bucket>/<test>-<id>`` prefix.
Skips only where the package is not installed.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

BUCKET = "label-audit-test"
START_TIMEOUT_S = 30

# Beam asks google.auth for credentials once per process and retries 4 times with
# exponential backoff (~25 s) before "Connecting anonymously", which is what the
# emulator needs. The test process and every process it starts (worker pools, killed
# writers) import this file first (PYTHONPATH) and start anonymous at once instead.
SITECUSTOMIZE = '''
import os
if os.environ.get("STORAGE_EMULATOR_HOST"):
    try:
        from apache_beam.internal.gcp import auth as _beam_auth
        _beam_auth._Credentials._credentials_init = True  # credentials None: anonymous client
    except ImportError:
        pass
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gcp-storage-emulator did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory) -> str:
    pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator (the test extra)")
    pytest.importorskip("apache_beam.io.gcp.gcsfilesystem", reason="needs apache-beam[gcp] (the test extra)")
    root = tmp_path_factory.mktemp("gcs_emulator")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    port = _free_port()
    log = root / "emulator.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
             "--port", str(port), "--default-bucket", BUCKET, "--in-memory"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=root)
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "PYTHONPATH")}
    try:
        _wait_for_port(port, process, log)
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), saved["PYTHONPATH"]) if p)
        sys.path.insert(0, str(site))
        exec(SITECUSTOMIZE, {})  # this process is already running
        yield BUCKET
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if str(site) in sys.path:
            sys.path.remove(str(site))


@pytest.fixture
def gcs_prefix(gcs_bucket, request) -> str:
    """A prefix no other test uses, in the emulator's bucket."""
    return f"gs://{gcs_bucket}/{request.node.name.replace('[', '-').rstrip(']')}-{uuid.uuid4().hex[:8]}"
