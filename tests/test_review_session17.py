"""Review of the ScriptSwitch, stream I/O, cursor and long-poll shutdown changes: a line
over the limit whose bytes at the limit are a run of CRs, a server stopping while another
app of the same process long-polls, and the WATCH/MULTI twin of DROP_CLAIMS given no id."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.security import HeadDeadlineH11
from contract.claims import DROP_CLAIMS, drop_claims_args, drop_claims_in_transaction
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.sources import default_line_limit, read_records
from tests.producer_helpers import broker_settings, lane_messages
from tests.served_app import served
from worker.process import settings_env

LIMIT = 10
ROOT = Path(__file__).resolve().parents[1]


def bertstream(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("fmt", ["lines", "jsonl"])
def test_a_line_over_the_limit_with_crs_at_the_limit_is_one_refused_line(fmt: str) -> None:
    """A line of the limit followed by two CRs and more bytes is over the limit: refused
    as one line, not cut at the CRs into a line of the limit and a line of its tail (the
    tail was read as the next line, and every later line numbered one too high)."""
    body = b'{"text":"abc"}' if fmt == "jsonl" else b"x" * LIMIT
    limit = len(body)
    after = b'{"text":"nxt"}' if fmt == "jsonl" else b"next"
    for tail in (b"\r\rXYZ\n", b"\r" * 20 + b"\n"):
        got = list(read_records(io.BytesIO(body + tail + after + b"\n"), fmt=fmt,
                                max_line_bytes=limit, keep_blank=True))
        assert [(r.line, r.error) for r in got] == [
            (1, f"line is over the limit of {limit} bytes"), (2, None)], (tail, got)


def test_stream_does_not_send_the_tail_of_a_line_over_the_limit(
        redis_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """`stream` of a file with such a line: the line is refused (exit 5) and its tail is
    not queued as a task of its own."""
    settings = broker_settings(redis_url, sqlite_url)
    source = tmp_path / "posts.txt"
    source.write_bytes(b"x" * default_line_limit(settings) + b"\r\rTAIL\n" + b"next\n")
    out = bertstream(settings, "stream", str(source), "--no-progress")
    assert out.returncode == 5, out.stderr
    assert f"line 1: line is over the limit of {default_line_limit(settings)} bytes" in out.stdout
    texts = [item["text"] for m in lane_messages(redis_url, f"{settings.queue}.bulk")
             for item in m["items"]]
    assert texts == ["next"], out.stdout


def test_a_stopping_server_leaves_the_long_polls_of_another_app_alone(
        bsettings: Settings, tmp_path: Path) -> None:
    """release_all ends the long polls of the server that stops: another app of the same
    process (an embedding, a test's TestClient) on another event loop keeps its
    ``?wait=``, which still answers the row stored while it waits."""
    store = ResultStore.from_url(bsettings.database_url)
    store.create_schema()
    other = dataclasses.replace(bsettings, queue=f"{bsettings.queue}-b")
    with TestClient(create_app(bsettings)) as http:
        r = http.post("/v1/tasks", json={"text": "good", "id": "kept-1"})
        assert r.status_code == 202, r.text
        # another app, served by a real uvicorn as serve runs it, stops with a connection open
        with served(create_app(other), http=HeadDeadlineH11) as url:
            host, port = url.removeprefix("http://").split(":")
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.close()

        def store_later() -> None:
            time.sleep(1.0)  # while the long poll below waits
            store.upsert([ResultRecord(id="kept-1", text_sha256="0" * 64, text_chars=4,
                                       model="m", status="done",
                                       label="positive", score=0.9, text="good",
                                       finished_at=dt.datetime.now(dt.timezone.utc))])

        writer = threading.Thread(target=store_later)
        writer.start()
        try:
            r = http.get("/v1/tasks/kept-1", params={"wait": 30})
        finally:
            writer.join()
            store.close()
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "done", r.json()


def test_drop_claims_twin_given_no_id_writes_nothing_as_the_script(r: redis.Redis) -> None:
    """DROP_CLAIMS given no id (or an empty one among others) touches no key; its
    WATCH/MULTI twin deleted the key named by the bare claim prefix, and the bare pointer
    prefix when it held the family."""
    prefix, any_prefix, family = "rv17:claim:", "rv17:any:", "fam"
    script = r.register_script(DROP_CLAIMS)
    for ids in ([], ["", "a"]):
        for run in (lambda a: script(args=a), lambda a: drop_claims_in_transaction(r, a)):
            r.set(prefix, b"1")
            r.set(any_prefix, family)
            r.set(prefix + "a", b"1")
            run(drop_claims_args(prefix, any_prefix, family, ids))
            assert r.get(prefix) == b"1" and r.get(any_prefix) == family.encode(), ids
            assert r.exists(prefix + "a") == (0 if ids else 1), ids
            r.delete(prefix, any_prefix, prefix + "a")

