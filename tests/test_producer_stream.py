"""stream(): bulk chunks, bad lines reported, backpressure waits for the queue to drain."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from contract.settings import Settings
from producer import Client, StreamReport, stream
from producer.sources import read_records
from producer.stream import Backpressure
from tests.producer_helpers import broker_settings, lane_messages
from worker.process import die_with_parent, settings_env


@pytest.fixture
def bsettings(redis_url: str, sqlite_url: str) -> Settings:
    return broker_settings(redis_url, sqlite_url, max_text_chars=200)


@pytest.fixture
def client(bsettings: Settings) -> Iterator[Client]:
    with Client(bsettings) as c:
        yield c


def _records(lines: list[bytes]) -> Iterator:
    return read_records(io.BytesIO(b"\n".join(lines) + b"\n"))


def test_stream_sends_chunks_and_reports_bad_lines(
    client: Client, bsettings: Settings, redis_url: str
) -> None:
    lines = [json.dumps({"text": f"text {i}", "id": f"id-{i}"}).encode() for i in range(25)]
    lines[3] = b'{"text": "unterminated'
    lines[7] = b'{"text": ""}'
    lines[11] = b'{"text": "bad \xff byte"}'
    lines[15] = json.dumps({"text": "x" * 201}).encode()
    lines[19] = json.dumps({"text": "dup", "id": "id-0"}).encode()
    lines[21] = b'{"nope": 1}'

    report = stream(client, _records(lines), progress=False, chunk_size=10, source="file")

    assert isinstance(report, StreamReport)
    assert (report.accepted, report.rejected) == (19, 6)
    assert [e.index for e in report.errors] == [4, 8, 12, 16, 20, 22]
    reasons = [e.reason for e in report.errors]
    assert "invalid JSON" in reasons[0]
    assert "empty" in reasons[1]
    assert "UTF-8" in reasons[2]
    assert "over the limit of 200" in reasons[3]
    assert "duplicate id 'id-0'" in reasons[4]
    assert "missing 'text'" in reasons[5]
    assert report.messages == 2
    assert report.rate > 0
    messages = lane_messages(redis_url, f"{bsettings.queue}.bulk")
    items = [it for m in messages for it in m["items"]]
    assert [len(m["items"]) for m in messages] == [10, 9]
    assert [it["id"] for it in items] == report.ids
    assert {it["source"] for it in items} == {"file"}


def test_stream_keeps_a_bounded_error_list(client: Client) -> None:
    lines = [b'{"broken' for _ in range(30)] + [b'{"text": "fine"}']
    report = stream(client, _records(lines), progress=False, max_errors=5, keep_ids=False)
    assert report.rejected == 30 and len(report.errors) == 5
    assert report.accepted == 1 and report.ids == []


def test_stream_progress_bar_goes_to_stderr(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    report = stream(client, _records([b"one", b"two", b""]), progress=True)
    assert report.accepted == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "texts" in captured.err


def test_stream_waits_while_the_queue_is_over_the_bound(
    client: Client, bsettings: Settings, redis_url: str
) -> None:
    bulk = f"{bsettings.queue}.bulk"
    r = redis.Redis.from_url(redis_url)
    r.lpush(bulk, *[f"backlog-{i}" for i in range(5)])
    waiting = threading.Event()
    seen_lengths: list[int] = []
    outcome: dict[str, StreamReport] = {}

    def on_wait(length: int) -> None:
        seen_lengths.append(length)
        waiting.set()

    def run() -> None:
        outcome["report"] = stream(
            client, _records([f"t{i}".encode() for i in range(20)]), progress=False,
            chunk_size=10, max_queue_length=3, max_backoff_s=0.05, on_wait=on_wait,
        )

    thread = threading.Thread(target=run, daemon=True)
    try:
        thread.start()
        assert waiting.wait(timeout=10), "stream never paused on a full queue"
        # Paused before its first chunk: nothing of ours is in the queue yet.
        assert thread.is_alive()
        assert seen_lengths == [5]
        assert r.llen(bulk) == 5
        # A worker drains the backlog: the stream resumes and finishes.
        r.delete(bulk)
        thread.join(timeout=10)
        assert not thread.is_alive()
    finally:
        r.close()

    report = outcome["report"]
    assert report.accepted == 20 and report.messages == 2
    assert report.waited_s > 0
    assert [len(m["items"]) for m in lane_messages(redis_url, bulk)] == [10, 10]


def test_backpressure_does_not_wait_under_the_bound(client: Client) -> None:
    calls: list[int] = []
    pressure = Backpressure(client, 0, on_wait=calls.append)
    assert pressure.wait_for_room() == 0.0
    assert calls == []


def test_a_quiet_source_still_sends_its_partial_chunk(
    client: Client, bsettings: Settings, redis_url: str
) -> None:
    """Like `tail -f | bertstream stream -`: texts go out once the source is quiet."""
    release = threading.Event()
    lines = [json.dumps({"text": f"live {i}"}).encode() for i in range(3)]

    def slow_source() -> Iterator:
        yield from _records(lines)
        release.wait(timeout=30)  # the pipe stays open, nothing more arrives yet

    result: list[StreamReport] = []
    runner = threading.Thread(target=lambda: result.append(
        stream(client, slow_source(), progress=False, chunk_size=100, linger_s=0.05)))
    runner.start()
    try:
        r = redis.Redis.from_url(redis_url)
        for _ in range(200):  # up to ~10 s, polling the real queue
            if r.llen(f"{bsettings.queue}.bulk") >= 1:
                break
            release.wait(0.05)
        r.close()
        messages = lane_messages(redis_url, f"{bsettings.queue}.bulk")
        assert [len(m["items"]) for m in messages] == [3]
    finally:
        release.set()
        runner.join(timeout=30)
    assert result and result[0].accepted == 3 and result[0].messages == 1


# -- a real bertstream process fed through a pipe --------------------------------


def _cli_stream(settings: Settings, *args: str) -> subprocess.Popen[bytes]:
    """``bertstream stream - ARGS`` in a process of its own, reading a pipe the test writes."""
    return subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import main; main()", "stream", "-", *args,
         "--no-progress"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=settings_env(settings), preexec_fn=die_with_parent())


def _write(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.flush()


def test_a_steady_trickle_is_sent_while_it_flows(bsettings: Settings, redis_url: str) -> None:
    """Like `tail -f busy.log | bertstream stream -`: a line every 0.1 s never leaves the
    source quiet for the linger time, yet texts go out while it flows, not once a chunk
    (256) has piled up or the input ends."""
    bulk = f"{bsettings.queue}.bulk"
    proc = _cli_stream(bsettings)
    r = redis.Redis.from_url(redis_url)
    written = 0
    try:
        while written < 200 and r.llen(bulk) < 3:  # at most 20 s of input, under a chunk
            written += 1
            _write(proc, f"trickle text {written}\n".encode())
            time.sleep(0.1)
        while_flowing = r.llen(bulk)
        out, _ = proc.communicate(timeout=60)  # the input ends
    finally:
        r.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert while_flowing >= 3, f"{while_flowing} message(s) sent while {written} lines flowed"
    assert proc.returncode == 0, out.decode()
    items = [it for m in lane_messages(redis_url, bulk) for it in m["items"]]
    assert [it["text"] for it in items] == [f"trickle text {i}" for i in range(1, written + 1)]


def test_a_csv_record_spanning_lines_resumes_after_its_last_line(
        bsettings: Settings, redis_url: str, tmp_path: Path) -> None:
    """Stopped after the record on lines 3-4 was sent, the run says to resume from line 5
    (not 4, the middle of that record)."""
    bulk = f"{bsettings.queue}.bulk"
    ids = tmp_path / "ids.jsonl"
    proc = _cli_stream(bsettings, "--format", "csv", "--ids-out", str(ids))
    try:
        _write(proc, b'id,text\n1,one line\n2,"two\nlines"\n')  # the pipe stays open
        deadline = time.monotonic() + 60
        # the ids file is written once the chunk's publish has returned
        while not ids.exists() or len(ids.read_text().splitlines()) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "nothing sent"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    output = out.decode()
    assert proc.returncode == 130, output
    assert "2 item(s) were sent" in output and "resume from line 5" in output, output
    items = [it for m in lane_messages(redis_url, bulk) for it in m["items"]]
    assert [(it["id"], it["text"]) for it in items] == [("1", "one line"), ("2", "two\nlines")]
    assert [json.loads(x)["line"] for x in ids.read_text().splitlines()] == [2, 3]
