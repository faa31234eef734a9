"""Review of the session's serve --workers metrics, long-poll disconnect and CLI changes,
on a real ``bertstream serve`` over the test Redis and SQLite."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contract.settings import Settings
from worker.process import free_port, settings_env


def test_a_long_poll_sent_a_body_over_the_limit_logs_no_lost_exception(
        bsettings: Settings, api_factory: Any) -> None:
    """A GET long poll sent a chunked body over BERTSTREAM_API_MAX_BODY_BYTES is refused
    (413) as any request is: the disconnect watch, which reads the body behind
    ``BodyLimit``, ends the poll and the refusal replaces its answer (a check that held)."""
    api = api_factory(dataclasses.replace(bsettings, api_max_wait_s=600, api_max_body_bytes=1024))
    r = httpx.post(f"{api.url}/v1/tasks", json={"text": "no worker serves this", "id": "gone-2"})
    assert r.status_code == 202, r.text
    host, port = httpx.URL(api.url).host, httpx.URL(api.url).port
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(f"GET /v1/tasks/gone-2?wait=600 HTTP/1.1\r\nHost: {host}\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n".encode())
        time.sleep(0.5)
        raw.sendall(b"800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n")
        answer = raw.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    time.sleep(1.0)
    httpx.get(f"{api.url}/healthz")
    assert "never retrieved" not in api.log(), api.log()


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this process cannot create files in: a read-only tmpfs for root (whom
    modes do not stop), else a directory of mode 0555."""
    path = tmp_path / "counts"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"no read-only tmpfs to be had: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_serve_refuses_a_metrics_directory_it_cannot_write(bsettings: Settings,
                                                           unwritable_dir: Path) -> None:
    """``serve --workers 2`` with PROMETHEUS_MULTIPROC_DIR naming a directory it cannot
    write exits 2 naming it: it started, and every request then logged a traceback (each
    process's counter file could not be made), found only in the server's log."""
    env = {**settings_env(bsettings), "PROMETHEUS_MULTIPROC_DIR": str(unwritable_dir)}
    serve = subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import main; main()", "serve",
         "--port", str(free_port()), "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = serve.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        serve.terminate()
        out, _ = serve.communicate(timeout=30)
        raise AssertionError(f"serve started on a directory it cannot write: {out}") from None
    assert serve.returncode == 2, out
    assert f"PROMETHEUS_MULTIPROC_DIR={unwritable_dir}" in out
    assert "Traceback" not in out


def test_api_metrics_show_no_worker_counts_of_a_shared_directory(
        bsettings: Settings, tmp_path: Path, api_factory: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker given the same PROMETHEUS_MULTIPROC_DIR as ``serve --workers 2`` (one
    environment for both on a host) keeps its counts in that directory too: the API's
    ``/metrics`` summed every file there, so it served the worker's series (Prometheus,
    scraping both, got each twice). It serves its own families only."""
    shared = tmp_path / "counts"
    with monkeypatch.context() as patch:  # for serve (it reads this process's environment)
        patch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
        api = api_factory(bsettings, "--workers", "2")
    worker = subprocess.run(
        [sys.executable, "-c", "from worker.metrics import WorkerMetrics\n"
         "m = WorkerMetrics('default')\nm.up.set(1)\nm.messages.inc()"],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)},
        capture_output=True, text=True, timeout=60)
    assert worker.returncode == 0, worker.stderr
    text = httpx.get(f"{api.url}/metrics", timeout=10).text
    assert "bertstream_api_requests_total" in text
    assert "bertstream_worker_up" not in text
    assert "bertstream_flush_messages" not in text


def test_a_server_process_started_on_a_refusing_database_answers_readyz(
        bsettings: Settings, tmp_path: Path) -> None:
    """``serve`` refuses a database that refuses it before its processes start (exit 2);
    a process that starts later on one (a password rotated, then uvicorn restarting it)
    starts and says so at /readyz, rather than failing its start over and over."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is no SQLite database " * 100)
    settings = dataclasses.replace(bsettings, database_url=f"sqlite:///{junk}")
    with TestClient(create_app(settings)) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert "misconfigured" in ready.json()["checks"]["database"], ready.json()
