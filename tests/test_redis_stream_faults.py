"""``stream --from-redis-stream`` when the stream or its group changes under the reader.

Real Redis throughout: pending entries trimmed away before a restart, the
group destroyed or the key deleted while reading, the key holding another
type, and entries stranded on a consumer that never comes back.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from contract import migrate
from contract.results import ResultStore
from contract.settings import Settings
from tests.producer_helpers import broker_settings, invoke, jsonl_lines, lane_messages
from tests.workers import WorkerProcess
from worker.process import die_with_parent, settings_env

LOST = "lost: trimmed or deleted from the stream before it was sent"




def _queued_ids(redis_url: str, settings: Settings) -> list[str]:
    return [it["id"] for msg in lane_messages(redis_url, f"{settings.queue}.bulk")
            for it in msg["items"]]


def _pending(r: redis.Redis, key: str, group: str = "g") -> dict[str, int]:
    """Pending entries by consumer name."""
    return {c["name"].decode(): int(c["pending"]) for c in r.xpending(key, group)["consumers"]}


def _poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _reader(settings: Settings, key: str, consumer: str, log: Path,
            *extra: str) -> subprocess.Popen[bytes]:
    """``bertstream stream`` from ``key`` as ``consumer`` of group g, output to ``log``."""
    args = [sys.executable, "-c", "from producer.cli import main; main()", "stream",
            "--from-redis-stream", key, "--group", "g", "--consumer", consumer, "--no-progress",
            *extra]
    with open(log, "ab") as fh:
        return subprocess.Popen(args, env=settings_env(settings), stdout=fh,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent())


def _finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> str:
    """Wait for ``proc`` (killed after ``timeout``); its output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return log.read_text()


# -- 1. pending entries trimmed away before the restart -----------------------

@pytest.mark.parametrize("how", ["xtrim", "xdel"])
def test_pending_entries_trimmed_away_are_acked_and_reported_as_lost(
        bsettings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path, how: str) -> None:
    """A reader killed holding read, unacked entries, then the stream trimmed: on restart
    XREADGROUP from 0 gives those ids with no fields. Each is acked and reported as lost
    (summary and --ids-out), once: the next restart finds nothing to report."""
    key = f"{bsettings.queue}:posts"
    ids = [r.xadd(key, {"text": f"t{i}"}, maxlen=1000).decode() for i in range(5)]
    r.xgroup_create(key, "g", id="0")
    r.xreadgroup("g", "c1", {key: ">"}, count=3)  # the killed reader's entries
    if how == "xtrim":
        r.xtrim(key, maxlen=2, approximate=False)
    else:
        r.xdel(key, *ids[:3])
    ids_out = tmp_path / "ids.jsonl"
    args = ["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "c1",
            "--idle-exit", "0.3", "--no-progress", "--ids-out", str(ids_out)]
    result = invoke(args, bsettings)
    assert result.exit_code == 5, result.output
    assert "accepted 2, rejected 3" in result.stdout
    for n, entry in enumerate(ids[:3], 1):
        assert f"entry #{n} (id {entry}): {LOST}" in result.stdout
    assert _queued_ids(redis_url, bsettings) == ids[3:]
    lost = [x for x in jsonl_lines(ids_out) if "error" in x]
    assert lost == [{"line": n, "entry": e, "id": None, "error": LOST}
                    for n, e in enumerate(ids[:3], 1)]
    assert _pending(r, key) == {}
    again = invoke(args, bsettings)  # acked: no crash, no second report
    assert again.exit_code == 0 and "accepted 0, rejected 0" in again.stdout, again.output


# -- 2. the group or the key gone, or another type ----------------------------

@pytest.mark.parametrize("how", ["destroy", "del"])
def test_group_destroyed_or_key_deleted_while_reading_stops_in_one_line(
        bsettings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path, how: str) -> None:
    """The blocked XREADGROUP fails (NOGROUP / UNBLOCKED): the reader exits 2 with one line
    saying what happened and what a rerun does, no traceback; what it sent stays sent."""
    key = f"{bsettings.queue}:posts"
    first = r.xadd(key, {"text": "before"}).decode()
    log = tmp_path / "reader.log"
    proc = _reader(bsettings, key, "c1", log)
    try:
        _poll(lambda: _queued_ids(redis_url, bsettings) == [first], 30, "the first entry")
        _poll(lambda: _pending(r, key) == {}, 10, "its ack")
        if how == "destroy":
            r.xgroup_destroy(key, "g")
        else:
            r.delete(key)
    finally:
        out = _finish(proc, log)
    assert proc.returncode == 2, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    if how == "destroy":
        assert (f"error: group 'g' of stream '{key}' was destroyed while reading: rerun to "
                "create it again, at the start of the stream (its entries are read again)"
                in out)
    else:
        assert (f"error: stream '{key}' was deleted while reading (its entries with it): "
                "rerun to create it and the group again" in out)


def test_a_key_holding_a_string_is_refused_in_one_line(bsettings: Settings,
                                                       r: redis.Redis) -> None:
    key = f"{bsettings.queue}:posts"
    r.set(key, "not a stream")
    result = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--idle-exit", "0.3",
                     "--no-progress"], bsettings)
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: '{key}' holds a string, not a stream: give "
                             "--from-redis-stream a stream key\n")
    assert r.get(key) == b"not a stream"


def test_a_key_turned_into_a_string_before_the_ack_is_not_called_unreachable(
        bsettings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """XACK on a key that became a string answers WRONGTYPE: that is the key, not Redis
    gone (exit 3, "rerun to resend them" would loop for ever); exit 2 in one line."""
    key = f"{bsettings.queue}:posts"
    for i in range(5):
        r.xadd(key, {"text": f"t{i}"})
    log = tmp_path / "reader.log"
    proc = _reader(bsettings, key, "c1", log, "--chunk-size", "2", "--max-queue", "1")
    try:  # two chunks queued: the last entry waits on backpressure, read, not acked
        _poll(lambda: "queue full" in log.read_text(), 30, "the reader to wait on backpressure")
        r.delete(key)
        r.set(key, "not a stream")
        r.delete(f"{bsettings.queue}.bulk")  # room again: the held entry is sent, then acked
    finally:
        out = _finish(proc, log)
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    assert out.strip().splitlines()[-1] == (f"error: '{key}' holds a string, not a stream: "
                                            "give --from-redis-stream a stream key"), out


# -- 3. entries stranded on a consumer that never comes back ------------------

def test_help_names_claim_idle_and_its_default() -> None:
    result = invoke(["stream", "--help"])
    assert "--claim-idle" in result.output and "[default: 600" in result.output


def test_entries_of_a_killed_consumer_are_claimed_by_another(
        bsettings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """Reader a holds read entries while it waits on backpressure and is killed; reader b,
    another consumer of the group, claims them once idle for --claim-idle and sends them.
    An entry a had trimmed meanwhile is reported as lost and acked."""
    key = f"{bsettings.queue}:posts"
    ids = [r.xadd(key, {"text": f"t{i}"}).decode() for i in range(12)]
    log = tmp_path / "a.log"
    a = _reader(bsettings, key, "a", log, "--chunk-size", "2", "--max-queue", "1")
    try:
        _poll(lambda: "queue full" in log.read_text(), 30, "reader a to wait on backpressure")
        a.send_signal(signal.SIGKILL)
    finally:
        _finish(a, log)
    stranded = [e["message_id"].decode() for e in r.xpending_range(key, "g", "-", "+", 100, "a")]
    sent_by_a = set(_queued_ids(redis_url, bsettings))
    assert stranded and sent_by_a and set(stranded) | sent_by_a == set(ids)
    r.xdel(key, stranded[0])
    r.delete(f"{bsettings.queue}.bulk")

    b = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "b",
                "--claim-idle", "1", "--idle-exit", "2", "--no-progress"], bsettings)
    assert b.exit_code == 5, b.output
    assert f"(id {stranded[0]}): {LOST}" in b.stdout
    assert set(_queued_ids(redis_url, bsettings)) == set(stranded[1:])
    assert _pending(r, key) == {}


def test_claim_idle_0_leaves_other_consumers_entries_alone(
        bsettings: Settings, r: redis.Redis, redis_url: str) -> None:
    key = f"{bsettings.queue}:posts"
    ids = [r.xadd(key, {"text": f"t{i}"}).decode() for i in range(4)]
    r.xgroup_create(key, "g", id="0")
    r.xreadgroup("g", "gone", {key: ">"}, count=2)
    time.sleep(1.1)
    result = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "b",
                     "--claim-idle", "0", "--idle-exit", "1.5", "--no-progress"], bsettings)
    assert result.exit_code == 0, result.output
    assert _queued_ids(redis_url, bsettings) == ids[2:]
    assert _pending(r, key) == {"gone": 2}


def test_entries_younger_than_claim_idle_are_left_to_their_consumer(
        bsettings: Settings, r: redis.Redis, redis_url: str) -> None:
    """A live reader may hold entries a while (backpressure): another reader claims only
    entries pending longer than --claim-idle."""
    key = f"{bsettings.queue}:posts"
    ids = [r.xadd(key, {"text": f"t{i}"}).decode() for i in range(4)]
    r.xgroup_create(key, "g", id="0")
    r.xreadgroup("g", "busy", {key: ">"}, count=2)
    result = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "b",
                     "--claim-idle", "60", "--idle-exit", "1", "--no-progress"], bsettings)
    assert result.exit_code == 0, result.output
    assert _queued_ids(redis_url, bsettings) == ids[2:]
    assert _pending(r, key) == {"busy": 2}


def test_a_reader_does_not_claim_and_resend_the_entries_it_holds(
        bsettings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """Entries a reader holds while it waits on backpressure grow idle in its own pending
    list: its claim scans take them too, but must not send them a second time."""
    key = f"{bsettings.queue}:posts"
    ids = [r.xadd(key, {"text": f"t{i}"}).decode() for i in range(8)]
    log, ids_out = tmp_path / "reader.log", tmp_path / "ids.jsonl"
    proc = _reader(bsettings, key, "c1", log, "--chunk-size", "2", "--max-queue", "1",
                   "--claim-idle", "0.5", "--idle-exit", "2", "--ids-out", str(ids_out))
    try:
        _poll(lambda: "queue full" in log.read_text(), 30, "the reader to wait on backpressure")
        time.sleep(2)  # its held entries are now idle for longer than --claim-idle
        while proc.poll() is None:  # let the rest through
            r.delete(f"{bsettings.queue}.bulk")
            time.sleep(0.1)
    finally:
        out = _finish(proc, log)
    assert proc.returncode == 0, out
    assert [x["entry"] for x in jsonl_lines(ids_out)] == ids
    assert _pending(r, key) == {}


@pytest.mark.slow
def test_an_entry_sent_twice_makes_one_row(
        settings: Settings, tiny_model_dir: Path, worker_factory: Callable[..., WorkerProcess],
        r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """A claimed entry may be sent twice (its first reader sent it, then died before the
    ack): the entry id is the task id, so the store keeps one row per entry."""
    s = settings.replace(model=str(tiny_model_dir))
    key = f"{s.queue}:posts"
    ids = [r.xadd(key, {"text": f"entry {i} is good"}).decode() for i in range(6)]
    r.xgroup_create(key, "g", id="0")
    r.xreadgroup("g", "dead", {key: ">"}, count=3)  # read, and (below) sent, never acked
    sent = invoke(["stream", "--from-redis-stream", key, "--group", "other", "--idle-exit",
                   "0.3", "--no-progress"], s)
    assert sent.exit_code == 0, sent.output
    time.sleep(1.1)
    claimed = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "b",
                      "--claim-idle", "1", "--idle-exit", "1", "--no-progress"], s)
    assert claimed.exit_code == 0, claimed.output
    assert sorted(_queued_ids(redis_url, s)) == sorted(ids + ids)  # every entry twice
    worker_factory(s)
    store = ResultStore.from_url(s.database_url)
    try:
        # both messages taken and acked by the worker (kombu's unacked index empty)
        _poll(lambda: migrate.state(store).up_to_date and r.llen(f"{s.queue}.bulk") == 0
              and r.hlen("unacked") == 0 and store.count() >= len(ids), 60, "the rows")
        rows = store.query(limit=None)
    finally:
        store.close()
    assert sorted(x.id for x in rows) == sorted(ids)


@pytest.fixture
def redis_without_xautoclaim(tmp_path: Path) -> Iterator[str]:
    """A private redis-server whose XAUTOCLAIM is renamed away, as a Redis older than 6.2
    lacks it."""
    from worker.process import free_port

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--rename-command", "XAUTOCLAIM", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent())
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        _poll(lambda: _answers(client), 20, "the private redis-server answers")
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=20)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_redis_without_xautoclaim_is_read_without_claiming(
        redis_without_xautoclaim: str, sqlite_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Claiming is on by default; a Redis without XAUTOCLAIM (before 6.2) must still be
    read, with one warning that other consumers' entries are not claimed."""
    settings = broker_settings(redis_without_xautoclaim, sqlite_url)
    r = redis.Redis.from_url(redis_without_xautoclaim)
    key = f"{settings.queue}:posts"
    try:
        ids = [r.xadd(key, {"text": f"t{i}"}).decode() for i in range(4)]
        r.xgroup_create(key, "g", id="0")
        r.xreadgroup("g", "gone", {key: ">"}, count=2)
        time.sleep(1.1)
        result = invoke(["stream", "--from-redis-stream", key, "--group", "g",
                         "--consumer", "b", "--claim-idle", "1", "--idle-exit", "1.5",
                         "--no-progress"], settings)
        assert result.exit_code == 0, result.output
        assert _queued_ids(redis_without_xautoclaim, settings) == ids[2:]
        assert _pending(r, key) == {"gone": 2}
        assert [rec.getMessage() for rec in caplog.records
                if "XAUTOCLAIM" in rec.getMessage()] == [
            "Redis has no XAUTOCLAIM (6.2 or later has it): entries left pending by other "
            "consumers of group 'g' are not claimed; rerun their --consumer to send them"]
    finally:
        r.close()
