"""Pinned downloads (pipelines/download.py) from a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

import pipelines  # noqa: F401  (registers the downloader)
from auditing import sources


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "votes.npz").write_bytes(b"pinned bytes")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _declare(monkeypatch, tmp_path, url: str, sha256: str) -> None:
    monkeypatch.setitem(sources.SOURCES, "test_file", sources.Source("test/votes.npz", url, sha256))
    monkeypatch.setenv("LABEL_AUDIT_DATA", str(tmp_path / "no-data"))
    monkeypatch.setenv("LABEL_AUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "data_roots", lambda: [tmp_path / "no-data"])


def test_a_pinned_file_is_downloaded_once_into_the_cache(served, tmp_path, monkeypatch):
    _declare(monkeypatch, tmp_path, f"{served}/votes.npz", hashlib.sha256(b"pinned bytes").hexdigest())
    path = sources.fetch("test_file")
    assert path == tmp_path / "cache" / "test" / "votes.npz" and path.read_bytes() == b"pinned bytes"
    with pytest.raises(sources.SourceError, match="download not allowed"):
        monkeypatch.setitem(sources.SOURCES, "other", sources.Source("x/y", f"{served}/y", "0" * 64))
        sources.fetch("other", download=False)
    assert sources.fetch("test_file", download=False) == path  # now local


def test_a_checksum_mismatch_is_refused_and_nothing_is_kept(served, tmp_path, monkeypatch):
    _declare(monkeypatch, tmp_path, f"{served}/votes.npz", "0" * 64)
    with pytest.raises(sources.SourceError, match="expected 0000"):
        sources.fetch("test_file")
    assert not any(Path(tmp_path / "cache").rglob("*.npz"))
    assert not any(p.name.startswith(".download-") for p in Path(tmp_path / "cache").rglob("*"))
