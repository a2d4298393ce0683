"""Run a pipeline the way Dataflow Runner v2, Flink and Spark run Python.

The pipeline goes to a job service (``--job_endpoint=embed``: Beam's own, in this
process; or ``HOST:PORT`` of a running Flink or Spark job server) and is executed by SDK
worker processes over the Fn API (``--environment_type=EXTERNAL``). Without an
``environment_config`` a worker pool is started here, in a folder of its own (its own
working directory, TMPDIR and HOME), so nothing passes between the launcher and the
workers through a local disk except what the pipeline writes under its output::

    with beam_options.runner_options("portable", num_workers=2) as options:
        with beam.Pipeline(options=options) as p:
            ...

The pool listens on 127.0.0.1 only. It is Beam's worker-pool service
(``BeamFnExternalWorkerPoolServicer``, as run by ``python -m
apache_beam.runners.worker.worker_pool_main``, which binds every interface); it starts
each worker as ``python``, so the venv's ``bin`` comes first on its PATH.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT_S = 60


class WorkerPoolError(RuntimeError):
    """The worker pool did not start (one line, with the end of its log)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["TMPDIR"] = str(root / "tmp")
    env["HOME"] = str(root / "home")
    # The workers run in another folder: relative import paths would point elsewhere.
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [os.getcwd()]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(os.path.abspath(p) for p in paths))
    return env


@contextlib.contextmanager
def worker_pool(root: str | os.PathLike | None = None,
                start_timeout_s: float = START_TIMEOUT_S) -> Iterator[str]:
    """Start a worker pool on 127.0.0.1 in an isolated folder; yields its address
    (``127.0.0.1:PORT``, the ``environment_config``). Stops it and its workers at the end."""
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="beam-worker-pool-") if own_root else root)
    for sub in ("work", "tmp", "home"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log_path = root / "worker_pool.log"
    with open(log_path, "wb") as log:
        # Its own session: stopping the group stops the workers it started too.
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.portable", "worker-pool", f"--port={port}"],
            cwd=root / "work", env=_worker_env(root), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise WorkerPoolError(f"worker pool exited with {process.returncode}: "
                                      f"{log_path.read_text(errors='replace')[-1500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise WorkerPoolError(f"worker pool not listening on 127.0.0.1:{port} after "
                                          f"{start_timeout_s:.0f} s; log: {log_path}") from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_group(process)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def _stop_group(process: subprocess.Popen, timeout_s: float = 10) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # workers that did not stop
    except ProcessLookupError:
        pass
    process.wait()


def portable_args(environment_config: str, job_endpoint: str = "embed", num_workers: int = 1) -> list[str]:
    """PortableRunner flags for workers at ``environment_config`` (``HOST:PORT`` of a pool)."""
    return ["--runner=PortableRunner", f"--job_endpoint={job_endpoint}",
            "--environment_type=EXTERNAL", f"--environment_config={environment_config}",
            f"--sdk_worker_parallelism={num_workers}"]


def _serve_worker_pool(port: int) -> None:
    import grpc
    from apache_beam.portability.api import beam_fn_api_pb2_grpc
    from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
    from apache_beam.utils import thread_pool_executor

    server = grpc.server(thread_pool_executor.shared_unbounded_instance())
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise WorkerPoolError(f"cannot listen on 127.0.0.1:{port}")
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(
        BeamFnExternalWorkerPoolServicer(use_process=True), server)
    server.start()
    print(f"worker pool listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pipelines.portable")
    parser.add_argument("command", choices=["worker-pool"])
    parser.add_argument("--port", type=int, required=True)
    _serve_worker_pool(parser.parse_args().port)
