"""``bertstream stream`` stopped by Ctrl-C or SIGTERM, and its backpressure line.

A real ``bertstream`` process on the test Redis; the stream is stopped while a
backpressure pause holds a chunk in its buffer (the pause line on stderr is
the signal that it is there), so what was sent and what was not is known.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from contract.settings import Settings
from producer.client import Client
from tests.producer_helpers import lane_messages

PAUSE_LINE = "queue full (2 messages), waiting..."


@dataclass
class Run:
    """A ``bertstream stream`` subprocess whose merged output is read as it comes."""

    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    paused: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if line == PAUSE_LINE:
                self.paused.set()
        self.paused.set()  # ended without pausing: let the test fail on its asserts

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def queue(redis_url: str) -> str:
    return f"bst-int-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def start(redis_url: str, sqlite_url: str, queue: str,
          tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start ``bertstream stream ARGS`` (chunks of 2, at most 1 message queued)."""
    runs: list[Run] = []

    def run(*args: str, stdin: bytes | None = None) -> Run:
        env = {**os.environ, "BERTSTREAM_BROKER_URL": redis_url,
               "BERTSTREAM_DATABASE_URL": sqlite_url, "BERTSTREAM_QUEUE": queue}
        proc = subprocess.Popen(
            [sys.executable, "-c", "from producer.cli import main; main()", "stream", *args,
             "--no-progress", "--chunk-size", "2", "--max-queue", "1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, cwd=tmp_path)
        r = Run(proc)
        runs.append(r)
        threading.Thread(target=r.read, daemon=True).start()
        assert proc.stdin is not None
        if stdin is not None:
            proc.stdin.write(stdin)  # stdin stays open: the stream is still reading
            proc.stdin.flush()
        return r

    yield run
    for r in runs:
        if r.proc.poll() is None:
            r.proc.kill()
        r.proc.wait(timeout=30)
        for pipe in (r.proc.stdin, r.proc.stdout):
            if pipe is not None:
                pipe.close()


def _llen_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_llen", {})
    return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0


def _stop_during_the_pause(run: Run, redis_url: str, queue: str, signum: int) -> None:
    """Wait for the pause line, let the stream poll the queue a few times, then signal."""
    assert run.paused.wait(timeout=60), run.output
    assert run.proc.poll() is None, run.output
    with Client(Settings(broker_url=redis_url, queue=queue)) as c:
        names = len(c.queue_names())
    client = redis.Redis.from_url(redis_url)
    try:
        # Each poll asks LLEN of every lane list; other users of this Redis only add calls.
        target = _llen_calls(client) + 3 * names
        deadline = time.monotonic() + 60
        while _llen_calls(client) < target and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.close()
    run.proc.send_signal(signum)
    run.proc.wait(timeout=60)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_stream_says_what_was_sent_and_where_to_resume(
        start: Callable[..., Run], redis_url: str, queue: str, tmp_path: Path, signum: int) -> None:
    """Chunks 1-2 (lines 1-4) are sent; chunk 3 waits for room and is dropped, not sent.

    The run exits 130 naming the 4 sent and line 5; the ids file and the queue
    hold exactly lines 1-4. It used to print only "Aborted!" (exit 1), or die
    silently on SIGTERM.
    """
    ids_file = tmp_path / "ids.jsonl"
    lines = "".join(f"text {i}\n" for i in range(1, 7)).encode()
    run = start("-", "--ids-out", str(ids_file), stdin=lines)
    _stop_during_the_pause(run, redis_url, queue, signum)

    assert run.proc.returncode == 130, run.output
    assert "Aborted!" not in run.output and "Traceback" not in run.output
    assert "4 item(s) were sent" in run.output and "resume from line 5" in run.output
    assert run.lines.count(PAUSE_LINE) == 1, run.output  # once per pause, not per poll
    written = [json.loads(x) for x in ids_file.read_text().splitlines()]
    assert [w["line"] for w in written] == [1, 2, 3, 4]
    queued = [it for m in lane_messages(redis_url, f"{queue}.bulk") for it in m["items"]]
    assert [it["text"] for it in queued] == [f"text {i}" for i in range(1, 5)]
    assert [it["id"] for it in queued] == [w["id"] for w in written]


def test_an_interrupted_redis_stream_leaves_the_unsent_entries_pending(
        start: Callable[..., Run], redis_url: str, queue: str) -> None:
    key = f"{queue}-posts"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries = [str(client.xadd(key, {"text": f"post {i}"})) for i in range(1, 7)]
        run = start("--from-redis-stream", key, "--group", "g",
                    "--consumer", "c1")
        _stop_during_the_pause(run, redis_url, queue, signal.SIGINT)
        assert run.proc.returncode == 130, run.output
        assert "4 item(s) were sent" in run.output, run.output
        assert "stay pending in group 'g'" in run.output and "--consumer 'c1'" in run.output
        pending = client.xpending_range(key, "g", min="-", max="+", count=10)
        assert [p["message_id"] for p in pending] == entries[4:]
    finally:
        client.close()
