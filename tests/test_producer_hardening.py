"""The producer against poison input, a hostile terminal and a broker that goes away."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest

from contract.constants import STATUS_EXPIRED
from contract.errors import BrokerUnavailable
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from producer.formatting import render_results
from producer.sources import read_records
from producer.stream import stream
from tests.conftest import RedisServer
from tests.producer_helpers import broker_settings, invoke, lane_messages, record


def test_surrogates_and_nul_in_ids_and_sources_are_refused(redis_url: str,
                                                           sqlite_url: str) -> None:
    s = broker_settings(redis_url, sqlite_url)
    lines = [json.dumps({"text": f"good hotel {i}"}) for i in range(5)]
    lines.insert(2, '{"id": "sb-poison-\\ud800", "text": "good hotel"}')
    lines.insert(4, '{"id": "ok", "text": "good hotel", "source": "\\ud800"}')
    lines.insert(5, '{"id": "nul\\u0000", "text": "good hotel"}')
    with Client(s) as client:
        records = read_records(io.BytesIO("\n".join(lines).encode()), fmt="jsonl")
        report = stream(client, records, progress=False, linger_s=None)
    assert report.accepted == 5 and report.rejected == 3
    reasons = {e.index: e.reason for e in report.errors}
    assert "lone surrogate" in reasons[3] and "lone surrogate" in reasons[5]
    assert "control characters" in reasons[6]
    sent = [it["id"] for m in lane_messages(redis_url, f"{s.queue}.bulk") for it in m["items"]]
    assert sent == report.ids


def test_results_with_an_undecodable_id_is_a_clean_error(redis_url: str, sqlite_url: str,
                                                         store: ResultStore) -> None:
    """`bertstream results --id $'caf\\xe9'` (argv decoded with surrogateescape)."""
    s = broker_settings(redis_url, store.engine.url.render_as_string(hide_password=False))
    result = invoke(["results", "--id", "caf\udce9"], s)
    assert result.exit_code == 2  # type: ignore[attr-defined]
    assert "lone surrogate" in result.output  # type: ignore[attr-defined]
    assert result.exception is None or isinstance(result.exception, SystemExit)  # type: ignore[attr-defined]


def test_terminal_output_escapes_control_characters(redis_url: str, store: ResultStore) -> None:
    hostile = "nice \x1b]0;owned\x07 \x1b[2J hotel \x9b31m"
    store.upsert([record("ansi", text=hostile, source="web")])
    s = broker_settings(redis_url, store.engine.url.render_as_string(hide_password=False))
    for fmt in ("table", "json"):
        result = invoke(["results", "--format", fmt], s)
        out = result.output  # type: ignore[attr-defined]
        assert result.exit_code == 0, out  # type: ignore[attr-defined]
        assert not any(c in out for c in "\x1b\x07\x9b"), (fmt, out)
        assert "ansi" in out
    data = json.loads(invoke(["results", "--format", "json"], s).output)  # type: ignore[attr-defined]
    assert data[0]["text"] == hostile  # escaped for the terminal, still the same JSON value
    # CSV to a terminal is escaped; CSV to a file or pipe keeps the data as stored
    rows = store.query(limit=None)
    assert not any(c in render_results(rows, "csv", terminal=True) for c in "\x1b\x07\x9b")
    assert hostile in render_results(rows, "csv", terminal=False)


def test_results_status_expired_filter(redis_url: str, store: ResultStore) -> None:
    store.upsert([record("late", status=STATUS_EXPIRED, error="expired 3 s before it ran"),
                  record("fine")])
    s = broker_settings(redis_url, store.engine.url.render_as_string(hide_password=False))
    result = invoke(["results", "--status", "expired", "--format", "json"], s)
    assert result.exit_code == 0  # type: ignore[attr-defined]
    assert [r["id"] for r in json.loads(result.output)] == ["late"]  # type: ignore[attr-defined]


def test_ttl_travels_as_expires_at(redis_url: str, sqlite_url: str) -> None:
    s = broker_settings(redis_url, sqlite_url)
    with Client(s) as client:
        client.submit("one", ttl_s=30)
        client.submit_many(["two", "three"], ttl_s=5)
    interactive = lane_messages(redis_url, f"{s.queue}.interactive")[0]["items"][0]
    assert interactive["expires_at"] == pytest.approx(interactive["submitted_at"] + 30)
    for item in lane_messages(redis_url, f"{s.queue}.bulk")[0]["items"]:
        assert item["expires_at"] == pytest.approx(item["submitted_at"] + 5)
    without = Client(s)
    try:
        without.submit("no deadline")
    finally:
        without.close()
    assert "expires_at" not in lane_messages(redis_url, f"{s.queue}.interactive")[1]["items"][0]


def test_a_failed_stream_says_how_much_was_sent_and_where_to_resume(
        redis_server: RedisServer, sqlite_url: str) -> None:
    s = Settings(broker_url=redis_server.url, database_url=sqlite_url, queue="bst-resume",
                 publish_retries=1, publish_retry_max_s=0.1, redis_connect_timeout_s=1,
                 redis_socket_timeout_s=1)

    def records() -> object:
        lines = [json.dumps({"text": f"text {i}"}) for i in range(1, 401)]
        for n, rec in enumerate(read_records(io.BytesIO("\n".join(lines).encode())), 1):
            if n == 251:
                redis_server.stop()  # the broker goes away mid-stream
            yield rec

    with Client(s) as client, pytest.raises(BrokerUnavailable) as info:
        stream(client, records(), chunk_size=100, progress=False, linger_s=None)  # type: ignore[arg-type]
    assert info.value.sent == 200 and info.value.resume_line == 201
    assert "200 item(s) were sent" in str(info.value) and "resume from line 201" in str(info.value)


def test_the_cli_prints_the_resume_point(redis_server: RedisServer, sqlite_url: str,
                                         tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"t {i}"}) for i in range(50)))
    s = Settings(broker_url=redis_server.url, database_url=sqlite_url, queue="bst-resume-cli",
                 publish_retries=1, publish_retry_max_s=0.1, redis_connect_timeout_s=1)
    redis_server.stop()
    result = invoke(["stream", str(src), "--no-progress"], s)
    assert result.exit_code == 3  # type: ignore[attr-defined]
    assert "0 item(s) were sent" in result.output and "resume from line 1" in result.output  # type: ignore[attr-defined]


def test_publishes_ride_out_a_redis_restart(redis_server: RedisServer, sqlite_url: str) -> None:
    """The producer retries with bounded backoff while Redis restarts; nothing is lost."""
    s = Settings(broker_url=redis_server.url, database_url=sqlite_url, queue="bst-restart-p",
                 publish_retries=20, publish_retry_max_s=0.5, bulk_chunk_size=10)
    with Client(s) as client:
        first = client.submit_many([f"before {i}" for i in range(50)]).ids
        redis_server.stop()
        # the broker comes back while the next publishes are being retried
        restart = threading.Timer(1.0, redis_server.start)
        restart.start()
        try:
            second = client.submit_many([f"after {i}" for i in range(50)]).ids
        finally:
            restart.join()
    sent = [it["id"] for m in lane_messages(redis_server.url, "bst-restart-p.bulk")
            for it in m["items"]]
    assert sorted(sent) == sorted(first + second)


def test_a_stream_rides_out_a_redis_restart(redis_server: RedisServer,
                                            sqlite_url: str) -> None:
    """The backpressure check before each chunk asks Redis for the queue length; while
    Redis restarts it is asked again as a publish would be, so the stream goes on and
    every record is queued (it used to fail at the first chunk after the stop)."""
    s = Settings(broker_url=redis_server.url, database_url=sqlite_url, queue="bst-restart-s",
                 publish_retries=20, publish_retry_max_s=0.5, redis_connect_timeout_s=1,
                 redis_socket_timeout_s=1)
    restart = threading.Timer(1.0, redis_server.start)

    def records() -> object:
        lines = [json.dumps({"text": f"text {i}"}) for i in range(1, 301)]
        for n, rec in enumerate(read_records(io.BytesIO("\n".join(lines).encode())), 1):
            if n == 151:
                redis_server.stop()  # back within a second, while the next chunk waits
                restart.start()
            yield rec

    try:
        with Client(s) as client:
            report = stream(client, records(), chunk_size=50, progress=False,  # type: ignore[arg-type]
                            linger_s=None)
    finally:
        restart.join()
    assert report.accepted == 300 and report.messages == 6
    sent = [it["text"] for m in lane_messages(redis_server.url, "bst-restart-s.bulk")
            for it in m["items"]]
    assert sorted(sent) == sorted(f"text {i}" for i in range(1, 301))


def test_a_stream_from_an_open_stdin_exits_cleanly_when_redis_goes(
        redis_server: RedisServer, sqlite_url: str, tmp_path: Path) -> None:
    """``tail -f log | bertstream stream -`` with Redis gone for good: the command says how
    far it got and exits 3 at once, while stdin is still open. The source is read in a
    daemon thread blocked on stdin; the interpreter's shutdown used to abort on stdin's
    lock ("Fatal Python error", exit 134)."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "BERTSTREAM_BROKER_URL": redis_server.url,
           "BERTSTREAM_DATABASE_URL": sqlite_url, "BERTSTREAM_QUEUE": "bst-stdin",
           "BERTSTREAM_PUBLISH_RETRIES": "1", "BERTSTREAM_PUBLISH_RETRY_MAX_S": "0.1",
           "BERTSTREAM_REDIS_CONNECT_TIMEOUT_S": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import main; main()", "stream", "-",
         "--no-progress"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    assert proc.stdin is not None
    try:
        for i in range(40):  # lines keep coming, as from tail -f
            if i == 10:
                redis_server.stop()
            if proc.poll() is not None:
                break
            try:
                proc.stdin.write(f"line {i}\n".encode())
                proc.stdin.flush()
            except BrokenPipeError:
                break
            time.sleep(0.2)
        proc.wait(timeout=60)  # stdin still open: a hang here is the bug
        assert proc.stdout is not None
        text = proc.stdout.read().decode("utf-8", "replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdin.close()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 3, text
    assert "Fatal Python error" not in text and "resume from line" in text
