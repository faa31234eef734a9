"""``bertstream stream`` walked as a user at scale: progress output, refusals, memory."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.settings import Settings
from producer import Client, stream
from producer.sources import read_records
from producer.stream import RECENT_IDS
from tests.producer_helpers import lane_messages

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture
def client(bsettings: Settings) -> Iterator[Client]:
    with Client(bsettings) as c:
        yield c


def _records(lines: list[bytes]) -> Iterator:
    return read_records(io.BytesIO(b"\n".join(lines) + b"\n"))


def _env(redis_url: str, sqlite_url: str, queue: str) -> dict[str, str]:
    return {**os.environ, "BERTSTREAM_BROKER_URL": redis_url,
            "BERTSTREAM_DATABASE_URL": sqlite_url, "BERTSTREAM_QUEUE": queue}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from producer.cli import main; main()", *args]


def test_a_stream_logged_to_a_file_carries_no_progress_bar(
        redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """stderr sent to a log file (not a terminal) gets no progress bar: the bar wrote a
    carriage-return redraw per chunk into it, a log that grows all day, unless
    --no-progress was given."""
    queue = f"bst-walk-{uuid.uuid4().hex[:8]}"
    source = tmp_path / "in.txt"
    source.write_text("".join(f"text {i}\n" for i in range(600)))
    log = tmp_path / "stream.log"
    with open(log, "wb") as err:
        done = subprocess.run(_cli("stream", str(source), "--chunk-size", "5"), stdout=subprocess.PIPE,
                              stderr=err, env=_env(redis_url, sqlite_url, queue), cwd=tmp_path,
                              timeout=120)
    logged = log.read_text()
    assert done.returncode == 0, logged
    assert "accepted 600" in done.stdout.decode()
    assert "\r" not in logged and "texts/s" not in logged, logged[:500]
    assert sum(len(m["items"]) for m in lane_messages(redis_url, f"{queue}.bulk")) == 600


def test_a_stream_on_a_terminal_still_shows_its_progress_bar(
        redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """The bar is kept where someone watches it: stderr a terminal."""
    queue = f"bst-walk-{uuid.uuid4().hex[:8]}"
    source = tmp_path / "in.txt"
    source.write_text("".join(f"text {i}\n" for i in range(50)))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(_cli("stream", str(source)), stdout=subprocess.PIPE,
                                stderr=slave, env=_env(redis_url, sqlite_url, queue),
                                cwd=tmp_path)
        os.close(slave)
        shown = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            elif proc.poll() is not None:
                break
        out, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
    assert proc.returncode == 0, shown
    assert b"accepted 50" in out
    assert b"texts" in shown and b"\r" in shown, shown


def test_the_bar_redraws_by_time_not_once_per_chunk(
        client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    """A chunk sent cleared the bar's description with a redraw of its own: with small
    chunks the bar was drawn once per chunk, whatever its refresh interval."""
    lines = [f"text {i}".encode() for i in range(400)]
    report = stream(client, _records(lines), progress=True, chunk_size=1, linger_s=None)
    assert report.accepted == 400 and report.messages == 400
    drawn = capsys.readouterr().err.count("\r")
    assert drawn < 100, drawn


def test_a_control_character_in_a_json_line_is_named_once(tmp_path: Path) -> None:
    """json's message ends in "at" already: the refusal read "... character at at column 15"."""
    (record,) = read_records(io.BytesIO(b'{"text": "a\x01b"}\n'))
    assert record.error is not None
    assert "at at" not in record.error
    assert record.error == "invalid JSON (Invalid control character at column 12)"


def _id_lines(ids: list[str]) -> list[bytes]:
    return [json.dumps({"text": f"text of {i}", "id": i}).encode() for i in ids]


def test_a_bounded_stream_refuses_near_duplicates_and_forgets_old_ids(client: Client) -> None:
    """``max_tracked_ids``: an id repeated within the last N caller ids is refused as
    before; one older than that is sent (the store's idempotent upsert and its conflict
    check are left to judge it), so an endless pipe does not remember every id."""
    ids = [f"id-{i}" for i in range(30)] + ["id-25", "id-0"]
    report = stream(client, _records(_id_lines(ids)), progress=False, linger_s=None,
                    max_tracked_ids=10)
    assert report.rejected == 1 and report.accepted == 31
    (error,) = report.errors
    assert (error.index, error.id) == (31, "id-25")
    assert "duplicate id 'id-25' (first at 26)" in error.reason


def test_a_bounded_stream_holds_no_more_ids_than_its_bound(client: Client) -> None:
    """60,000 caller ids through a stream bounded to 1,000 of them: its memory stays flat
    instead of growing with every id remembered."""
    import tracemalloc

    def lines() -> Iterator[bytes]:
        for i in range(60_000):
            yield json.dumps({"text": "t", "id": f"post-{i:012d}"}).encode() + b"\n"

    class Source(io.RawIOBase):
        def __init__(self) -> None:
            self.it = lines()
            self.rest = b""

        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            while not self.rest:
                try:
                    self.rest = next(self.it)
                except StopIteration:
                    return 0
            n = min(len(buf), len(self.rest))
            buf[:n], self.rest = self.rest[:n], self.rest[n:]
            return n

    tracemalloc.start()
    try:
        report = stream(client, read_records(io.BufferedReader(Source())), progress=False,
                        linger_s=None, keep_ids=False, chunk_size=1000, max_tracked_ids=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.accepted == 60_000 and report.rejected == 0
    assert peak < 5_000_000, peak


def test_a_pipe_refuses_a_repeated_id_and_a_file_refuses_it_however_far(
        redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """stdin from a pipe (endless: ``tail -f``) remembers the recent caller ids; a file, of
    known size, every one, as before."""
    queue = f"bst-walk-{uuid.uuid4().hex[:8]}"
    env = _env(redis_url, sqlite_url, queue)
    ids = ["a", "b", "a"]
    body = b"\n".join(_id_lines(ids)) + b"\n"
    piped = subprocess.run(_cli("stream", "-", "--no-progress"), input=body, env=env,
                           capture_output=True, cwd=tmp_path, timeout=120)
    assert piped.returncode == 5, piped.stderr
    assert b"line 3: duplicate id 'a' (first at 1)" in piped.stdout
    far = [f"id-{i}" for i in range(RECENT_IDS + 5)] + ["id-0"]
    source = tmp_path / "far.jsonl"
    source.write_bytes(b"\n".join(_id_lines(far)) + b"\n")
    filed = subprocess.run(_cli("stream", str(source), "--no-progress"), env=env,
                           capture_output=True, cwd=tmp_path, timeout=300)
    assert filed.returncode == 5, filed.stderr
    assert f"line {len(far)}: duplicate id 'id-0' (first at 1)".encode() in filed.stdout


def test_the_source_is_read_a_bounded_number_of_records_ahead() -> None:
    """While the stream waits (a full queue, a slow publish) its reader thread reads ahead
    at most :data:`READ_AHEAD` records: it read 4,096, which with texts near the length
    limit held a large share of memory while backpressure waited for a worker."""
    from producer.sources import SourceRecord
    from producer.stream import READ_AHEAD, with_ticks

    read = 0

    def records() -> Iterator[SourceRecord]:
        nonlocal read
        for i in range(1, 100_000):
            read += 1
            yield SourceRecord(i, {"text": "x"})

    feed = with_ticks(records(), lambda: None)
    assert next(feed) is not None  # the consumer takes one, then stops taking
    deadline = time.monotonic() + 5
    last = -1
    while read != last and time.monotonic() < deadline:
        last = read
        time.sleep(0.2)
    assert READ_AHEAD <= 1024
    assert read <= READ_AHEAD + 2, read


def test_the_bar_says_why_it_waits_in_plain_words(
        client: Client, bsettings: Settings, redis_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A backpressure pause on the bar read "queue full (5 messages), waiting: : 20 texts"
    (tqdm adds a colon to a description, and another one when the total is unknown)."""
    import threading

    import redis

    bulk = f"{bsettings.queue}.bulk"
    r = redis.Redis.from_url(redis_url)
    r.lpush(bulk, *[f"backlog-{i}" for i in range(5)])
    paused = threading.Event()

    def drain_when_paused() -> None:
        assert paused.wait(timeout=60)
        time.sleep(0.3)  # the bar is redrawn while the stream waits
        r.delete(bulk)

    drainer = threading.Thread(target=drain_when_paused, daemon=True)
    drainer.start()
    try:
        report = stream(client, _records([f"t{i}".encode() for i in range(20)]), progress=True,
                        chunk_size=10, max_queue_length=3, max_backoff_s=0.05, linger_s=None,
                        on_wait=lambda _n: paused.set())
    finally:
        drainer.join(timeout=60)
        r.delete(bulk)
        r.close()
    assert report.accepted == 20
    err = capsys.readouterr().err
    assert "queue full (5 messages), waiting" in err, err
    assert ": :" not in err, err
