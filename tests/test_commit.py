"""The commit protocol on local disk and on a GCS emulator (real processes, real kills)."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from pipelines import commit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "gcs"])
def parent(request, tmp_path) -> str:
    """A parent prefix on local disk or in the emulator's bucket."""
    if request.param == "local":
        return str(tmp_path / "outputs")
    return request.getfixturevalue("gcs_prefix")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_marker_is_written_last_and_lists_every_file(parent):
    uri = commit.join(parent, "stage-a")
    frame = pd.DataFrame({"x": [1, 2, 3]})
    with commit.PrefixWriter(uri) as writer:
        writer.write_text("notes.txt", "hello")
        writer.write_bytes("deep/shard-00000", b"\x00\x01" * 1000)
        writer.write_parquet("table.parquet", frame, index=False)
        assert not commit.is_committed(uri)
        assert commit.committed_children(parent) == []
        with pytest.raises(commit.NotCommittedError, match="not committed"):
            commit.read_marker(uri)
        marker = writer.commit()
    assert commit.is_committed(uri)
    assert commit.committed_children(parent) == ["stage-a"]
    assert sorted(marker["files"]) == ["deep/shard-00000", "notes.txt", "table.parquet"]
    assert marker["files"]["deep/shard-00000"] == {"size": 2000,
                                                   "sha256": hashlib.sha256(b"\x00\x01" * 1000).hexdigest()}
    assert commit.read_marker(uri) == marker == commit.verify(uri)
    # No claim is left behind: the prefix holds exactly the files and the marker.
    assert sorted(commit.list_files(uri)) == sorted([*marker["files"], commit.MARKER])
    assert commit.read_parquet(commit.join(uri, "table.parquet")).equals(frame)


def test_a_failed_commit_leaves_no_marker_and_nothing_written(parent, monkeypatch):
    uri = commit.join(parent, "stage-b")
    calls = []

    def failing_sha256(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(f"{path}: read failed")
        return hashlib.sha256(commit.read_bytes(path)).hexdigest()

    monkeypatch.setattr(commit, "sha256_of", failing_sha256)
    with pytest.raises(OSError, match="read failed"):
        with commit.PrefixWriter(uri) as writer:
            writer.write_text("a.txt", "a")
            writer.write_text("b.txt", "b")
            writer.commit()
    assert not commit.is_committed(uri)
    assert commit.list_files(uri) == {}


def test_committed_prefix_is_never_overwritten(parent):
    uri = commit.join(parent, "v1")
    with commit.PrefixWriter(uri) as writer:
        writer.write_text("a.txt", "first")
        writer.commit()
    with pytest.raises(commit.AlreadyCommittedError, match="never overwritten"):
        with commit.PrefixWriter(uri) as writer:
            writer.write_text("a.txt", "second")
    assert commit.read_text(commit.join(uri, "a.txt")) == "first"
    commit.verify(uri)


def test_crashed_writer_is_ignored_swept_and_rewritten(parent):
    crashed = commit.join(parent, "crashed")
    # A real writer process, killed with SIGKILL in the middle of its files.
    process = _python(f"""
        import os, signal
        from pipelines import commit
        writer = commit.PrefixWriter({crashed!r}).__enter__()
        writer.write_text("part-0", "written before the crash")
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    _, err = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, err
    assert commit.list_files(crashed)  # its leftovers are there...
    assert not commit.is_committed(crashed)  # ...but nothing is committed
    live = commit.join(parent, "live")
    done = commit.join(parent, "done")
    with commit.PrefixWriter(done) as writer:
        writer.write_text("a", "a")
        writer.commit()
    with commit.PrefixWriter(live) as writer:
        writer.write_text("part-0", "being written")
        assert commit.committed_children(parent) == ["done"]
        # The crashed prefix goes; the one with a live writer and the committed one stay.
        assert commit.sweep_uncommitted(parent) == ["crashed"]
        assert commit.list_files(crashed) == {}
        assert commit.list_files(live) and commit.is_committed(done)
        writer.commit()
    # A later writer of the crashed prefix also removes a crashed writer's leftovers.
    process = _python(f"""
        import os, signal
        from pipelines import commit
        writer = commit.PrefixWriter({crashed!r}).__enter__()
        writer.write_text("stale", "from a crashed run")
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    process.communicate(timeout=120)
    with commit.PrefixWriter(crashed) as writer:
        writer.write_text("part-0", "complete")
        marker = writer.commit()
    assert sorted(marker["files"]) == ["part-0"]
    assert commit.committed_children(parent) == ["crashed", "done", "live"]


def test_concurrent_writers_exactly_one_wins(parent):
    uri = commit.join(parent, "contended")
    go = Path(os.environ.get("TMPDIR", "/tmp")) / f"go-{os.getpid()}-{abs(hash(uri))}"
    code = """
        import sys, time, pathlib
        from pipelines import commit
        who, uri, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
        pathlib.Path(f"{go}.ready-{who}").touch()
        while not go.exists():
            time.sleep(0.005)
        try:
            with commit.PrefixWriter(uri) as writer:
                writer.write_text("who.txt", who)
                time.sleep(0.3)
                writer.commit()
            print("committed")
        except commit.AlreadyCommittedError:
            print("found-committed")
        except commit.PrefixBusyError:
            print("busy")
        """
    writers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(i), uri, str(go)],
                                env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(3)]
    # All three are past their imports and spinning on the go file before it appears.
    ready = [Path(f"{go}.ready-{i}") for i in range(3)]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    try:
        results = [w.communicate(timeout=180) for w in writers]
    finally:
        for flag in [go, *ready]:
            flag.unlink(missing_ok=True)
    outcomes = [out.strip() for out, _ in results]
    assert all(w.returncode == 0 for w in writers), [err[-2000:] for _, err in results]
    assert outcomes.count("committed") == 1, outcomes
    assert set(outcomes) <= {"committed", "found-committed", "busy"}
    winner = str(outcomes.index("committed"))
    assert commit.read_text(commit.join(uri, "who.txt")) == winner
    assert sorted(commit.verify(uri)["files"]) == ["who.txt"]


@pytest.mark.parametrize("tamper", ["altered", "resized", "deleted", "added"])
def test_verify_refuses_a_tampered_prefix(parent, tamper):
    uri = commit.join(parent, "v1")
    with commit.PrefixWriter(uri) as writer:
        writer.write_text("data/shard-0", "abcdef")
        writer.write_text("info.json", "{}")
        writer.commit()
    target = commit.join(uri, "data/shard-0")
    if tamper == "altered":
        commit.write_text(target, "abcdeX")
    elif tamper == "resized":
        commit.write_text(target, "abc")
    elif tamper == "deleted":
        commit.delete_files([target])
    else:
        target = commit.join(uri, "data/shard-1")
        commit.write_text(target, "extra")
    with pytest.raises(commit.VerifyError, match=r"shard-[01]"):
        commit.verify(uri)
