"""``bertstream rescore`` and ``bertstream compare`` (producer/history_cli.py): the model
names they take, and the texts rescore finds, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from contract.broker import lane_queue
from contract.queries import Filters, stored_texts, text_counts
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from tests.producer_helpers import invoke, lane_messages
from tests.test_producer_interrupt import PAUSE_LINE, Run, _stop_during_the_pause

NOW = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.timezone.utc)


def row(task_id: str, model: str, minutes: int, text: str, *, kept: bool,
        meta: dict[str, Any] | None = None) -> ResultRecord:
    """A done row of ``text``; ``kept``: its worker stored the text (else only its hash)."""
    return ResultRecord(
        id=task_id, text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        text_chars=len(text), model=model, status="done",
        finished_at=NOW + dt.timedelta(minutes=minutes), text=text if kept else None,
        label="positive", score=0.9, scores={"positive": 0.9, "negative": 0.1},
        source=f"src-{model}", meta=meta, lang="en")


@pytest.fixture
def cli_settings(redis_url: str, db_url: str) -> Settings:
    return Settings(broker_url=redis_url, database_url=db_url,
                    queue=f"bst-hist-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("models", [("a b", "B"), ("A", "b/c"), ("-A", "B"), ("A", "x" * 101),
                                    ("A", "B\n")])
def test_compare_refuses_a_name_that_is_no_model_name(sqlite_url: str, redis_url: str,
                                                      models: tuple[str, str]) -> None:
    """As rescore does: a usage error (exit 2) naming the value, before any query."""
    ResultStore.from_url(sqlite_url).create_schema()
    settings = Settings(broker_url=redis_url, database_url=sqlite_url)
    out = invoke(["compare", "--model", models[0], "--model", models[1]], settings)
    assert out.exit_code == 2, out.output
    bad = next(m for m in models if m not in ("A", "B"))
    assert f"{bad!r} is not a model name" in out.stderr
    assert "Traceback" not in out.output
    # rescore says the same of the same name
    refused = invoke(["rescore", "--model", bad, "--no-progress"], settings)
    assert refused.exit_code == 2 and f"{bad!r} is not a model name" in refused.stderr


def test_compare_takes_valid_names(sqlite_url: str, redis_url: str) -> None:
    ResultStore.from_url(sqlite_url).create_schema()
    out = invoke(["compare", "--model", "a.1_x-y", "--model", "B"],
                 Settings(broker_url=redis_url, database_url=sqlite_url))
    assert out.exit_code == 0, out.output
    assert "no task has a done result from both a.1_x-y and B" in out.stdout


def test_rescore_takes_the_text_from_an_older_row_of_another_model(
        store: ResultStore, cli_settings: Settings, redis_url: str) -> None:
    """Task k1's latest row (model A) kept no text, its older row of model B did: rescore
    sends k1 with that text, under the latest row's source and meta. k2 kept its text in
    its latest row; k3 kept none anywhere, and a row of another text under k3's id does not
    count."""
    store.upsert([
        row("k1", "B", 0, "first text", kept=True, meta={"from": "B"}),
        row("k1", "A", 1, "first text", kept=False, meta={"from": "A"}),
        row("k2", "A", 2, "second text", kept=True),
        row("k3", "B", 3, "another text", kept=True),  # not k3's text (another hash)
        row("k3", "A", 4, "third text", kept=False),
    ])
    assert text_counts(store, Filters()) == (3, 2)
    assert [(r["id"], r["text"], r["source"], r["meta"]) for r in stored_texts(store, Filters())
            ] == [("k1", "first text", "src-A", {"from": "A"}),
                  ("k2", "second text", "src-A", None)]
    assert text_counts(store, Filters(source="src-B")) == (0, 0)  # by the latest row

    out = invoke(["rescore", "--model", "C", "--no-progress"], cli_settings)
    assert out.exit_code == 0, out.output
    assert "sent 2 task(s)" in out.stdout
    assert "1 of 3 matching tasks did not keep their text" in out.stderr
    queue = lane_queue(cli_settings.replace(model_name="C"), True)
    items = [it for m in lane_messages(redis_url, queue) for it in m["items"]]
    assert [(it["id"], it["text"], it.get("source")) for it in items] == [
        ("k1", "first text", "src-A"), ("k2", "second text", "src-A")]
    assert items[0]["meta"] == {"from": "A"}


def test_stored_texts_reads_in_pages_the_rows_there_when_it_began(store: ResultStore) -> None:
    """Pages of 2, rows sharing a finish time split across pages: every task once, oldest
    first. A task scored by the new model meanwhile (its new row becomes its latest, newer
    than every other) is not given again at the end."""
    store.upsert([row(f"p{i}", "A", i // 2, f"text {i}", kept=True) for i in range(7)])
    rows = stored_texts(store, Filters(), batch=2)
    first = [next(rows)["id"] for _ in range(3)]
    store.upsert([row("p0", "C", 60, "text 0", kept=True)])
    assert first + [r["id"] for r in rows] == [f"p{i}" for i in range(7)]
    assert [r["id"] for r in stored_texts(store, Filters(), batch=2)] == [
        f"p{i}" for i in range(1, 7)] + ["p0"]
    assert list(stored_texts(store, Filters(source="none such"))) == []


def test_rescore_reads_through_connections_the_database_dropped(pg_url: str) -> None:
    """text_counts and stored_texts (what rescore reads) replace a pooled connection the
    database dropped (pg_terminate_backend, as a restart does), between reads and between
    the pages of one read, as every other read does. They used engine.connect() itself:
    the dead connection failed the read (StoreUnavailable, exit 3)."""
    app_name = "bst-rescore-faults"
    seed = ResultStore.from_url(pg_url)
    seed.create_schema()
    seed.upsert([row(f"d{i}", "A", i, f"text {i}", kept=True) for i in range(5)])
    seed.close()
    store = ResultStore.from_url(f"{pg_url}?application_name={app_name}")
    admin = sa.create_engine(pg_url)

    def kill() -> int:
        with admin.connect() as conn:
            return len(conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = :name"),
                {"name": app_name}).all())

    expected = [f"d{i}" for i in range(5)]
    try:
        assert text_counts(store, Filters()) == (5, 5)  # a pooled connection, warm
        assert kill() == 1
        assert text_counts(store, Filters()) == (5, 5)
        assert kill() == 1
        assert [r["id"] for r in stored_texts(store, Filters(), batch=2)] == expected
        rows = stored_texts(store, Filters(), batch=2)
        first = [next(rows)["id"] for _ in range(3)]  # two pages read
        assert kill() == 1
        assert first + [r["id"] for r in rows] == expected
    finally:
        store.close()
        admin.dispose()


def test_rescore_refuses_when_no_row_of_any_task_kept_its_text(
        store: ResultStore, cli_settings: Settings) -> None:
    store.upsert([row("n1", "B", 0, "a text", kept=False),
                  row("n1", "A", 1, "a text", kept=False)])
    out = invoke(["rescore", "--model", "C", "--no-progress"], cli_settings)
    assert out.exit_code == 2
    assert "none of the 1 matching tasks kept its text" in out.stderr


def test_rescore_needs_a_redis_broker(store: ResultStore, cli_settings: Settings) -> None:
    """As submit and stream: another transport (memory://) would take the tasks and lose
    them at exit, with no backpressure; rescore said "sent 1 task(s)" and exited 0."""
    store.upsert([row("m1", "A", 0, "a text", kept=True)])
    out = invoke(["rescore", "--model", "C", "--no-progress", "--broker-url", "memory://"],
                 cli_settings)
    assert out.exit_code == 2, out.output
    assert "'memory://' is not a Redis URL" in out.stderr and "sent" not in out.output


@pytest.mark.parametrize("option", [["--since", "0001-01-01T00:00+01:00"],
                                    ["--until", "9999-12-31T23:00-05:00"]])
def test_a_time_out_of_range_in_utc_is_one_line_exit_2(
        sqlite_url: str, redis_url: str, option: list[str]) -> None:
    """UTC cannot hold these times: each command that takes --since/--until says so in one
    line, exit 2 (it was an OverflowError traceback, exit 1)."""
    ResultStore.from_url(sqlite_url).create_schema()
    settings = Settings(broker_url=redis_url, database_url=sqlite_url)
    for args in (["results"], ["db", "delete"], ["rescore", "--model", "C", "--no-progress"],
                 ["compare", "--model", "A", "--model", "B"], ["report", "--out", "x.png"]):
        out = invoke([*args, *option], settings)
        assert out.exit_code == 2, (args, out.output)
        assert "out of range" in out.stderr and "Traceback" not in out.output, args
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def _rescore_process(redis_url: str, sqlite_url: str, queue: str, cwd: Path) -> Run:
    """``bertstream rescore --model C`` with chunks of 2 and at most 1 message queued."""
    env = {**os.environ, "BERTSTREAM_BROKER_URL": redis_url,
           "BERTSTREAM_DATABASE_URL": sqlite_url, "BERTSTREAM_QUEUE": queue,
           "BERTSTREAM_BULK_CHUNK_SIZE": "2"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import main; main()", "rescore",
         "--model", "C", "--no-progress", "--max-queue", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, cwd=cwd)
    run = Run(proc)
    threading.Thread(target=run.read, daemon=True).start()
    return run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_rescore_says_what_was_sent_and_that_a_rerun_skips_it(
        sqlite_url: str, redis_url: str, tmp_path: Path, signum: int) -> None:
    """Stopped while backpressure holds its third chunk: exit 130, 4 tasks sent, and no
    "resume from line" (rescore reads no lines and has no such option). With --no-progress
    the pause says so on stderr, as stream's does. It used to name a line to resume
    from on SIGINT, and die silently on SIGTERM.

    The rerun the message advises is checked too: once model C did the 4 sent tasks,
    a second run sends only the 2 others."""
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()
    store.upsert([row(f"t{i}", "A", i, f"text {i}", kept=True) for i in range(1, 7)])
    queue = f"bst-hist-{uuid.uuid4().hex[:8]}"
    lane = lane_queue(Settings(queue=queue, model_name="C"), True)
    run = _rescore_process(redis_url, sqlite_url, queue, tmp_path)
    try:
        _stop_during_the_pause(run, redis_url, f"{queue}-C", signum)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(timeout=30)
        assert run.proc.stdout is not None
        run.proc.stdout.close()

    assert run.proc.returncode == 130, run.output
    assert run.lines.count(PAUSE_LINE) == 1, run.output
    assert "4 item(s) were sent" in run.output, run.output
    assert "rerun rescore: tasks already done by C are skipped" in run.output
    assert "resume from line" not in run.output and "Traceback" not in run.output
    sent = [it["id"] for m in lane_messages(redis_url, lane) for it in m["items"]]
    assert sent == ["t1", "t2", "t3", "t4"]

    # model C's worker did the 4 sent tasks; the queue is drained
    store.upsert([row(i, "C", 10, f"text {i[1:]}", kept=True) for i in sent])
    client = redis.Redis.from_url(redis_url)
    client.delete(lane)
    client.close()
    out = invoke(["rescore", "--model", "C", "--no-progress"],
                 Settings(broker_url=redis_url, database_url=sqlite_url, queue=queue))
    assert out.exit_code == 0, out.output
    assert "sent 2 task(s)" in out.stdout and "4 already scored by it" in out.stdout
    assert [it["id"] for m in lane_messages(redis_url, lane) for it in m["items"]
            ] == ["t5", "t6"]
    store.close()
