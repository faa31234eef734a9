"""``submit --wait`` and ``stream --wait`` cut short: every queued id still reaches the user.

A wait that ends early (its ``--timeout``, Ctrl-C or SIGTERM, the database
gone) prints the results that are ready on stdout as a full wait would, and
``submit`` names every other id on stderr (``missing: ID``, one per line)
before the error line. A stand-in worker stores rows for the first texts
once their message is on the queue; real signals go to a real process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from contract.results import ResultStore
from contract.settings import Settings
from tests.producer_helpers import broker_settings, invoke, lane_messages, record

NO_WORKER = "warning: no worker is alive"


@pytest.fixture
def settings(redis_url: str, sqlite_url: str, sqlite_store: ResultStore) -> Settings:
    return broker_settings(redis_url, sqlite_url)


def _queued(redis_url: str, lane: str) -> list[dict]:
    return [it for m in lane_messages(redis_url, lane) for it in m["items"]]


def _finish_first(redis_url: str, lane: str, store: ResultStore, n: int) -> threading.Thread:
    """A worker stand-in: once ``n`` items are on ``lane``, store done rows for those ``n``."""

    def run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            items = _queued(redis_url, lane)
            if len(items) >= n:
                store.upsert([record(it["id"], text=it["text"]) for it in items[:n]])
                return
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _missing(stderr: str) -> list[str]:
    return [line[len("missing: "):] for line in stderr.splitlines() if line.startswith("missing: ")]


def test_a_timed_out_submit_prints_the_ready_results_and_every_missing_id(
        settings: Settings, redis_url: str, sqlite_store: ResultStore) -> None:
    """7 texts, 3 finished: stdout has those 3 (valid JSON), stderr the other 4 ids. It
    used to print nothing on stdout and only the first 5 missing ids ("and 2 more")."""
    finisher = _finish_first(redis_url, f"{settings.queue}.interactive", sqlite_store, 3)
    result = invoke(["submit", *(f"text {i}" for i in range(1, 8)), "--wait", "--timeout", "3",
                     "--format", "json"], settings)
    finisher.join(timeout=30)
    assert result.exit_code == 4, result.output
    queued = [it["id"] for it in _queued(redis_url, f"{settings.queue}.interactive")]
    assert len(queued) == 7
    assert [row["id"] for row in json.loads(result.stdout)] == queued[:3]
    assert _missing(result.stderr) == queued[3:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 4 result(s) not ready before the timeout")
    assert "listed above" in last and " more" not in last


def test_a_submit_wait_with_the_database_gone_names_every_queued_id(redis_url: str) -> None:
    """The texts are queued, then the wait cannot read the store: exit 3 naming them all
    (it used to exit 3 naming none)."""
    settings = broker_settings(redis_url, "postgresql+psycopg://postgres@127.0.0.1:1/nope")
    result = invoke(["submit", "one", "two", "three", "--wait", "--timeout", "5", "--format",
                     "json"], settings)
    assert result.exit_code == 3, result.output
    queued = [it["id"] for it in _queued(redis_url, f"{settings.queue}.interactive")]
    assert len(queued) == 3
    assert json.loads(result.stdout) == []
    assert _missing(result.stderr) == queued
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot reach the results database" in last and "all 3 item(s) were sent" in last


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["submit", "stream"])
def test_a_wait_stopped_by_a_signal_exits_130_with_what_is_ready_and_what_is_not(
        command: str, signum: int, redis_url: str, sqlite_url: str, sqlite_store: ResultStore,
        tmp_path: Path) -> None:
    """4 texts sent, 2 finished, then Ctrl-C or SIGTERM while waiting for the rest.

    Exit 130 saying all 4 were sent; submit prints the 2 results and names the 2
    missing ids, stream counts the 2 done and names the missing ids. It used to
    print "Aborted!" (exit 1), and SIGTERM killed ``submit --wait`` outright.
    """
    settings = broker_settings(redis_url, sqlite_url)
    texts = [f"text {i}" for i in range(1, 5)]
    if command == "submit":
        args = ["submit", *texts, "--format", "json"]
        lane = f"{settings.queue}.interactive"
    else:
        path = tmp_path / "in.txt"
        path.write_text("".join(f"{t}\n" for t in texts), encoding="utf-8")
        args = ["stream", str(path), "--no-progress"]
        lane = f"{settings.queue}.bulk"
    env = {**os.environ, "BERTSTREAM_BROKER_URL": redis_url, "BERTSTREAM_DATABASE_URL": sqlite_url,
           "BERTSTREAM_QUEUE": settings.queue}
    finisher = _finish_first(redis_url, lane, sqlite_store, 2)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import main; main()", *args, "--wait",
         "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=tmp_path)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # printed once the wait has begun
        assert first.startswith(NO_WORKER), first
        finisher.join(timeout=30)
        proc.send_signal(signum)
        out, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    err = first + rest
    assert proc.returncode == 130, (out, err)
    assert "Aborted!" not in err and "Traceback" not in err
    queued = [it["id"] for it in _queued(redis_url, lane)]
    assert len(queued) == 4
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted: all 4 item(s) were sent; waiting stopped"), err
    if command == "submit":
        assert [row["id"] for row in json.loads(out)] == queued[:2]
        assert _missing(err) == queued[2:]
    else:
        assert "accepted 4" in out and "results: 2 done" in out
        assert "2 result(s) missing" in last and all(i in last for i in queued[2:])
