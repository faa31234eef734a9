"""``stream --from-redis-stream``: consumer groups, acks after enqueue, pending entries resent.

Real Redis throughout. The last test kills a reader with SIGKILL mid-stream,
restarts it beside a real worker, and checks every entry made exactly one row.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from click.testing import Result

from contract import migrate
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.conftest import RedisServer
from tests.producer_helpers import invoke, lane_messages
from tests.workers import WorkerProcess
from worker.process import die_with_parent, settings_env


def _queued_items(redis_url: str, settings: Settings) -> list[dict]:
    return [it for msg in lane_messages(redis_url, f"{settings.queue}.bulk") for it in msg["items"]]


def _pending(r: redis.Redis, key: str, group: str) -> int:
    return int(r.xpending(key, group)["pending"])


def test_entries_become_tasks_keyed_by_entry_id_and_are_acked(
    bsettings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    key = f"{bsettings.queue}:posts"
    ids = [r.xadd(key, {"text": f"post {i}", "source": "s"}).decode() for i in range(5)]
    bad = r.xadd(key, {"text": "   "}).decode()
    nofield = r.xadd(key, {"body": "no text field"}).decode()
    ids_out = tmp_path / "ids.jsonl"
    result = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "c1",
                     "--idle-exit", "0.3", "--no-progress", "--chunk-size", "2",
                     "--ids-out", str(ids_out)], bsettings)
    assert result.exit_code == 5, result.output  # refused entries: a distinct exit code
    assert "accepted 5, rejected 2" in result.stdout
    assert f"entry #6 (id {bad}): text is empty" in result.stdout
    assert f"entry #7 (id {nofield}): missing 'text'" in result.stdout
    assert "rejected entries (first 2):" in result.stdout

    items = _queued_items(redis_url, bsettings)
    assert [it["id"] for it in items] == ids  # the entry id is the task id
    assert [it["text"] for it in items] == [f"post {i}" for i in range(5)]
    assert all(it["source"] == "s" for it in items)
    assert _pending(r, key, "g") == 0  # refused entries are acked too: nothing is resent

    lines = [json.loads(x) for x in ids_out.read_text().splitlines()]
    assert [(x["entry"], x["id"]) for x in lines if "error" not in x] == [(i, i) for i in ids]
    refused = {x["entry"]: x for x in lines if "error" in x}
    assert set(refused) == {bad, nofield} and "empty" in refused[bad]["error"]

    # A second run of the group finds nothing new: no task is sent twice.
    again = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "c1",
                    "--idle-exit", "0.2", "--no-progress"], bsettings)
    assert again.exit_code == 0 and "accepted 0, rejected 0" in again.stdout
    assert len(_queued_items(redis_url, bsettings)) == 5


def test_a_restarted_reader_first_resends_its_own_pending_entries(
    bsettings: Settings, r: redis.Redis, redis_url: str
) -> None:
    key = f"{bsettings.queue}:posts"
    r.xgroup_create(key, "g", id="0", mkstream=True)
    ids = [r.xadd(key, {"text": f"t{i}"}).decode() for i in range(6)]
    # A reader that read three entries and died before it enqueued them:
    r.xreadgroup("g", "c1", {key: ">"}, count=3)
    assert _pending(r, key, "g") == 3
    r.xdel(key, ids[1])  # one of them was trimmed away meanwhile: reported as lost

    result = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "c1",
                     "--idle-exit", "0.3", "--no-progress"], bsettings)
    assert result.exit_code == 5, result.output
    assert f"entry #2 (id {ids[1]}): lost: trimmed or deleted" in result.stdout
    sent = [it["id"] for it in _queued_items(redis_url, bsettings)]
    assert sent == [ids[0], ids[2], ids[3], ids[4], ids[5]]  # pending first, then new
    assert _pending(r, key, "g") == 0


def test_field_mapping_for_stream_entries(bsettings: Settings, r: redis.Redis,
                                          redis_url: str) -> None:
    key = f"{bsettings.queue}:posts"
    r.xadd(key, {"body": "好极了", "post_id": "p-1", "site": "weibo",
                 "at": "2026-11-28T10:00:00Z", "meta": '{"lang": "zh"}'})
    r.xadd(key, {"body": "meh", "site": "", "at": ""})
    r.xadd(key, {"body": "x", "meta": "{oops"})
    result = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--idle-exit", "0.3",
                     "--no-progress", "--text-field", "body", "--id-field", "post_id",
                     "--source-field", "site", "--time-field", "at", "--source", "default"],
                    bsettings)
    assert result.exit_code == 5, result.output
    assert "'meta' is not valid JSON" in result.stdout
    first, second = _queued_items(redis_url, bsettings)
    assert first["id"] == "p-1" and first["source"] == "weibo" and first["text"] == "好极了"
    assert first["meta"] == {"lang": "zh", "time": "2026-11-28T10:00:00Z"}
    assert second["source"] == "default" and second["meta"] is None and "-" in second["id"]


@pytest.mark.parametrize("meta", ['{"a": ' + "[" * 5000 + "]" * 5000 + "}",
                                  '{"a": ' + "1" * 5000 + "}"], ids=["deep", "huge-number"])
def test_an_entry_whose_meta_json_cannot_be_read_is_refused_and_acked(
        bsettings: Settings, r: redis.Redis, redis_url: str, meta: str) -> None:
    """json.loads raises RecursionError / ValueError for these: the entry used to crash
    the reader and stay pending, so every restart crashed on it again."""
    key = f"{bsettings.queue}:posts"
    r.xadd(key, {"text": "good one"})
    poison = r.xadd(key, {"text": "poison", "meta": meta}).decode()
    r.xadd(key, {"text": "good two"})
    args = ["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "c1",
            "--idle-exit", "0.3", "--no-progress"]
    result = invoke(args, bsettings)
    assert result.exit_code == 5, result.output
    assert f"entry #2 (id {poison}): 'meta' is not valid JSON (" in result.stdout
    assert [it["text"] for it in _queued_items(redis_url, bsettings)] == ["good one", "good two"]
    assert _pending(r, key, "g") == 0
    again = invoke(args, bsettings)
    assert again.exit_code == 0 and "accepted 0, rejected 0" in again.stdout, again.output


@pytest.mark.parametrize("id_field", [None, "post"])
def test_a_refused_entry_names_its_task_id(bsettings: Settings, r: redis.Redis,
                                           tmp_path: Path, id_field: str | None) -> None:
    """A refused entry names its task id in ``--ids-out``: the entry id, or the
    ``--id-field`` value when the entry has one; its entry id stays in ``entry``."""
    key = f"{bsettings.queue}:posts"
    nofield = r.xadd(key, {"body": "no text field", "post": "p1"}).decode()
    badmeta = r.xadd(key, {"text": "t", "meta": "{oops"}).decode()
    ids_out = tmp_path / "ids.jsonl"
    args = ["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "c1",
            "--idle-exit", "0.3", "--no-progress", "--ids-out", str(ids_out)]
    result = invoke(args + (["--id-field", id_field] if id_field else []), bsettings)
    assert result.exit_code == 5, result.output
    got = {x["entry"]: x for x in map(json.loads, ids_out.read_text().splitlines())}
    assert got[nofield]["id"] == ("p1" if id_field else nofield)
    assert got[badmeta]["id"] == badmeta  # no id field: the entry id is the task id
    assert "missing 'text'" in str(got[nofield]["error"])
    assert "not valid JSON" in str(got[badmeta]["error"])
    if id_field:  # the summary names a task id that is not the entry id
        assert f"entry #1 (id {nofield}, task id p1): missing 'text'" in result.stdout


def test_a_steady_trickle_of_entries_is_sent_and_acked_while_it_flows(
        bsettings: Settings, r: redis.Redis, redis_url: str) -> None:
    """An entry every 0.1 s never leaves the stream quiet for the linger time, yet each
    is sent (and acked) within a fraction of a second, not once 256 have piled up."""
    key = f"{bsettings.queue}:posts"
    bulk = f"{bsettings.queue}.bulk"
    args = [sys.executable, "-c", "from producer.cli import main; main()", "stream",
            "--from-redis-stream", key, "--group", "g", "--consumer", "c1", "--idle-exit", "2",
            "--no-progress"]
    proc = subprocess.Popen(args, env=settings_env(bsettings), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
    added: list[str] = []
    try:
        while len(added) < 200 and r.llen(bulk) < 3:  # at most 20 s of entries
            added.append(r.xadd(key, {"text": f"entry {len(added)}"}).decode())
            time.sleep(0.1)
        while_flowing = r.llen(bulk)
        acked_while_flowing = len(added) - _pending(r, key, "g")
        out, _ = proc.communicate(timeout=60)  # no entry for 2 s: it stops
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert while_flowing >= 3, f"{while_flowing} message(s) sent for {len(added)} entries"
    assert acked_while_flowing >= 3
    assert proc.returncode == 0, out.decode()
    assert [it["id"] for it in _queued_items(redis_url, bsettings)] == added
    assert _pending(r, key, "g") == 0


def test_usage_errors(bsettings: Settings, tmp_path: Path) -> None:
    both = invoke(["stream", str(tmp_path / "x"), "--from-redis-stream", "k", "--group", "g"],
                  bsettings)
    assert both.exit_code == 2 and "either FILE or --from-redis-stream" in both.stderr
    nogroup = invoke(["stream", "--from-redis-stream", "k"], bsettings)
    assert nogroup.exit_code == 2 and "needs --group" in nogroup.stderr
    stray = invoke(["stream", "-", "--group", "g"], bsettings)
    assert stray.exit_code == 2


# -- kill -9 mid-stream, with a real worker ----------------------------------

ENTRIES = 300


def _reader(settings: Settings, key: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    code = "from producer.cli import main; main()"
    args = [sys.executable, "-c", code, "stream", "--from-redis-stream", key, "--group", "g",
            "--consumer", "reader-1", "--no-progress", "--chunk-size", "10", "--max-queue", "3",
            *extra]
    with open(log, "ab") as fh:
        return subprocess.Popen(args, env=settings_env(settings), stdout=fh,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent())


def _poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_reader_killed_mid_stream_loses_nothing_and_duplicates_nothing(
    settings: Settings, tiny_model_dir: Path, worker_factory: Callable[..., WorkerProcess],
    r: redis.Redis, redis_url: str, tmp_path: Path,
) -> None:
    s = settings.replace(model=str(tiny_model_dir))
    key = f"{s.queue}:posts"
    entry_ids = [r.xadd(key, {"text": f"entry number {i} is {'good' if i % 2 else 'bad'}",
                              "source": "xs"}).decode() for i in range(ENTRIES)]
    log = tmp_path / "reader.log"

    # No worker yet: the reader fills the queue to --max-queue and waits there
    # for backpressure, holding entries it read but has not enqueued.
    first = _reader(s, key, log)
    try:
        with Client(s) as client:
            _poll(lambda: client.queue_length() > 3 and _pending(r, key, "g") > 0, 60,
                  "the reader to block on backpressure")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    sent_before = {it["id"] for it in _queued_items(redis_url, s)}
    pending = _pending(r, key, "g")
    assert 0 < len(sent_before) < ENTRIES and pending > 0
    # Entries enqueued and acked are no longer pending; the rest are.
    assert len(sent_before) + pending >= ENTRIES

    worker_factory(s)
    ids_out = tmp_path / "ids.jsonl"
    second = _reader(s, key, log, "--idle-exit", "1", "--ids-out", str(ids_out))
    try:
        assert second.wait(timeout=120) == 0, log.read_text()
    finally:
        if second.poll() is None:
            second.kill()
    resent = [json.loads(x)["entry"] for x in ids_out.read_text().splitlines()]
    assert set(resent) | sent_before == set(entry_ids)
    assert len(resent) == len(set(resent))
    assert _pending(r, key, "g") == 0

    store = ResultStore.from_url(s.database_url)
    try:
        # up_to_date: the worker has finished setting the schema up, not just begun.
        _poll(lambda: migrate.state(store).up_to_date and store.count() >= ENTRIES, 120,
              "every row")
        rows = store.query(limit=None)
    finally:
        store.close()
    assert len(rows) == ENTRIES  # exactly one row per entry: none lost, none doubled
    assert sorted(x.id for x in rows) == sorted(entry_ids)
    by_id = {x.id: x for x in rows}
    for n, entry in enumerate(entry_ids):
        assert by_id[entry].text == f"entry number {n} is {'good' if n % 2 else 'bad'}"
        assert by_id[entry].status == "done" and by_id[entry].source == "xs"


def test_a_broker_failure_says_what_was_sent_and_that_the_rest_stays_pending(
    redis_server: RedisServer, sqlite_url: str
) -> None:
    s = Settings(broker_url=redis_server.url, database_url=sqlite_url, queue="bst-rs-fail",
                 redis_socket_timeout_s=2, redis_connect_timeout_s=1, publish_retries=0)
    r = redis.Redis.from_url(redis_server.url)
    try:
        for i in range(40):
            r.xadd("posts", {"text": f"t{i}"})
    finally:
        r.close()
    out: dict[str, Result] = {}
    reader = threading.Thread(target=lambda: out.setdefault("r", invoke(
        ["stream", "--from-redis-stream", "posts", "--group", "g", "--consumer", "c1",
         "--chunk-size", "5", "--max-queue", "1", "--no-progress"], s)))
    reader.start()
    with Client(s) as client:  # two chunks queued: the reader now waits on backpressure
        _poll(lambda: client.queue_length() >= 2, 30, "two chunks in the queue")
    redis_server.stop()
    reader.join(timeout=60)
    assert not reader.is_alive()
    result = out["r"]
    assert result.exit_code == 3, result.output
    assert "10 item(s) were sent before the failure" in result.stderr
    assert "stay pending in group 'g': rerun with --consumer 'c1' to resend them" in result.stderr
    assert "resume from line" not in result.stderr
