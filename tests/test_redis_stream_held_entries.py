"""``stream --from-redis-stream``: entries a reader has read and not yet sent.

Real Redis throughout, but for the reply shape of Redis 6.2 (only 7.x is
installed): a live reader held by backpressure keeps its entries from the
claim scans of the other readers of its group; entries read before the group
or the key vanished are still sent; an entry deleted from the stream and
claimed is reported as lost and acked whichever shape the claim reply has;
an entry acked while a claim scan runs is not handed out again.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.settings import Settings
from producer.redis_stream import LOST, RedisStreamSource
from tests.producer_helpers import invoke, jsonl_lines, lane_messages
from tests.test_redis_stream_faults import _finish, _pending, _poll, _reader


def _sent(path: Path) -> list[str]:
    """The entry ids an ``--ids-out`` file says were sent (refusals left out)."""
    return [x["entry"] for x in jsonl_lines(path) if "error" not in x] if path.exists() else []


def _add(r: redis.Redis, key: str, n: int, start: int = 0) -> list[str]:
    with r.pipeline(transaction=False) as pipe:
        for i in range(start, start + n):
            pipe.xadd(key, {"text": f"t{i}"})
        return [x.decode() for x in pipe.execute()]


# -- 1. a live reader's entries are not claimed by the others ----------------

def test_a_reader_held_by_backpressure_past_claim_idle_keeps_its_entries(
        bsettings: Settings, r: redis.Redis, tmp_path: Path) -> None:
    """Reader a reads far ahead (the read-ahead queue fills, its reading thread stops) and
    waits on backpressure longer than --claim-idle. Reader b, started then, must not
    claim and send what a holds: a is alive and sends it. Each entry is sent once."""
    key = f"{bsettings.queue}:posts"
    ids = _add(r, key, 1200)
    log, a_out, b_out = tmp_path / "a.log", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a = _reader(bsettings, key, "a", log, "--chunk-size", "100", "--max-queue", "1",
                "--claim-idle", "1", "--idle-exit", "2", "--ids-out", str(a_out))
    try:
        _poll(lambda: "queue full" in log.read_text(), 30, "reader a to wait on backpressure")
        time.sleep(2.5)  # what a holds would now be idle for longer than --claim-idle
        held = _pending(r, key)["a"]
        assert held > 512, held  # more than the read-ahead: its reading thread is stopped
        b = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "b",
                    "--claim-idle", "1", "--idle-exit", "1.5", "--max-queue", "100000",
                    "--no-progress", "--ids-out", str(b_out)], bsettings)
        assert b.exit_code == 0, b.output
        while a.poll() is None:  # let a through
            r.delete(f"{bsettings.queue}.bulk")
            time.sleep(0.1)
    finally:
        out = _finish(a, log)
    assert a.returncode == 0, out
    sent = _sent(a_out) + _sent(b_out)
    doubled = sorted({e for e in sent if sent.count(e) > 1})
    assert not doubled, f"{len(doubled)} entries sent twice (b claimed what a held)"
    assert sorted(sent) == sorted(ids)
    assert _pending(r, key) == {}


def test_a_reader_refreshes_only_its_own_pending_entries(
        bsettings: Settings, r: redis.Redis) -> None:
    """The refresh resets the idle time of the entries this consumer holds, without
    raising their delivery count, and leaves another consumer's entries to go idle."""
    key = f"{bsettings.queue}:posts"
    _add(r, key, 4)
    r.xgroup_create(key, "g", id="0")
    r.xreadgroup("g", "other", {key: ">"}, count=2)
    reader = RedisStreamSource(r, key, "g", "mine", claim_idle_s=0.4, count=2)
    try:
        assert len(reader._read(">", block=None)) == 2  # read by this reader: held
        time.sleep(0.3)
        assert reader.refresh() == 2
    finally:
        reader.close()
    pending = r.xpending_range(key, "g", "-", "+", 10)
    assert sorted((e["consumer"].decode(), e["times_delivered"]) for e in pending) == [
        ("mine", 1), ("mine", 1), ("other", 1), ("other", 1)]
    idle = {e["consumer"].decode(): e["time_since_delivered"] for e in pending}
    assert idle["other"] - idle["mine"] >= 250  # mine reset after the sleep, not other's


# -- 2. entries read before the group or the key vanished ---------------------

@pytest.mark.parametrize("how", ["destroy", "del"])
def test_entries_read_before_the_group_or_key_vanished_are_sent(
        bsettings: Settings, r: redis.Redis, redis_url: str, tmp_path: Path, how: str) -> None:
    """Reader c1 waits on backpressure with one chunk; three more entries are read (into
    the next chunk, not sent); then the group is destroyed or the key deleted. The three
    are in memory and valid: they are sent (and in --ids-out) before the one-line error,
    not dropped (re-read from the start after a destroy, gone with a deleted key)."""
    key = f"{bsettings.queue}:posts"
    bulk = f"{bsettings.queue}.bulk"
    r.rpush(bulk, "x", "y")  # the queue is full: the reader's first chunk waits
    first = _add(r, key, 5)
    log, ids_out = tmp_path / "reader.log", tmp_path / "ids.jsonl"
    proc = _reader(bsettings, key, "c1", log, "--chunk-size", "10", "--max-queue", "1",
                   "--ids-out", str(ids_out))
    try:
        _poll(lambda: "queue full" in log.read_text(), 30, "the reader to wait on backpressure")
        more = _add(r, key, 3, start=5)
        _poll(lambda: _pending(r, key).get("c1") == 8, 10, "the reader to read three more")
        if how == "destroy":
            r.xgroup_destroy(key, "g")
        else:
            r.delete(key)
        time.sleep(1.5)  # its next read (blocking at most 1 s) fails
        r.delete(bulk)  # room again
    finally:
        out = _finish(proc, log)
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [x for x in out.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "while reading" in errors[0], out
    assert _sent(ids_out) == first + more
    queued = [it["id"] for msg in lane_messages(redis_url, bulk) for it in msg["items"]]
    assert queued == first + more


# -- 3. an entry deleted and claimed: Redis 7 and Redis 6.2 reply shapes ------

class _Redis62Claims(redis.Redis):
    """A client whose XAUTOCLAIM reply has Redis 6.2's shape for the ids in ``gone``: the
    entry comes back as a plain nil, and no third list of deleted ids. Redis 7 really
    claims them (they still exist), so the pending list is left as 6.2 leaves it."""

    gone: set[str] = set()

    def xautoclaim(self, *args: Any, **kwargs: Any) -> Any:
        reply = super().xautoclaim(*args, **kwargs)
        entries = [(None, None) if i is not None and i.decode() in self.gone else (i, f)
                   for i, f in reply[1]]
        return [reply[0], entries]


@pytest.mark.parametrize("shape", ["redis-7", "redis-6.2"])
def test_a_claimed_entry_deleted_from_the_stream_is_reported_lost_and_acked(
        redis_url: str, r: redis.Redis, shape: str) -> None:
    """An entry another consumer left pending and that was then deleted: Redis 7 names it
    in the claim reply's third list, Redis 6.2 returns a nil in its place (and claims
    it). Either way it comes out as lost, by id, and is acked: it does not stay pending
    to be claimed again at every scan."""
    key = "posts"
    ids = _add(r, key, 4)
    r.xgroup_create(key, "g", id="0")
    r.xreadgroup("g", "dead", {key: ">"}, count=3)
    if shape == "redis-7":
        r.xdel(key, ids[1])
        client = redis.Redis.from_url(redis_url)
    else:
        client = _Redis62Claims.from_url(redis_url)
        client.gone = {ids[1]}
    time.sleep(0.3)
    reader = RedisStreamSource(client, key, "g", "b", claim_idle_s=0.2, idle_exit_s=0.5,
                               block_ms=100)
    try:
        got = []
        for record in reader.records():
            got.append((record.ref, record.error))
            if record.ref is not None:
                reader.ack([record.ref])
    finally:
        reader.close()
        client.close()
    assert (ids[1], LOST) in got
    assert sorted(ref for ref, error in got if error is None) == [ids[0], ids[2], ids[3]]
    assert r.xpending(key, "g")["pending"] == 0


class _AckDuringClaim(redis.Redis):
    """A client whose XAUTOCLAIM reply is held back while another thread acks ``ack_ids``
    (as the publishing thread does), for at most half a second: an ack landing between
    a claim and its check of what the reader holds."""

    reader: RedisStreamSource | None = None
    ack_ids: list[str] = []

    def xautoclaim(self, *args: Any, **kwargs: Any) -> Any:
        reply = super().xautoclaim(*args, **kwargs)
        if self.reader is not None and self.ack_ids:
            acker = threading.Thread(target=self.reader.ack, args=(self.ack_ids,))
            acker.start()
            acker.join(timeout=0.5)
            self.ack_ids = []
        return reply


def test_an_entry_acked_while_a_claim_scan_runs_is_not_handed_out_again(
        redis_url: str, r: redis.Redis) -> None:
    """Redis 7 names a pending entry deleted from the stream in every claim reply,
    however idle: the reader's own lost entry, read at start, is in the first claim
    reply; its ack by the publishing thread must not make it count as a new one (it was
    reported lost twice). The same race would send an entry of its own twice."""
    key = "posts"
    ids = _add(r, key, 4)
    r.xgroup_create(key, "g", id="0")
    r.xreadgroup("g", "c1", {key: ">"}, count=3)  # a run of c1 that died
    r.xdel(key, ids[0])
    client = _AckDuringClaim.from_url(redis_url)
    reader = RedisStreamSource(client, key, "g", "c1", idle_exit_s=0.3, block_ms=100)
    client.reader, client.ack_ids = reader, [ids[0]]
    try:
        got = [(record.ref, record.error) for record in reader.records()]
    finally:
        reader.close()
        client.close()
    assert got == [(ids[0], LOST), (ids[1], None), (ids[2], None), (ids[3], None)]
