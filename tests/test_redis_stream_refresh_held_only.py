"""``stream --from-redis-stream``: the refresh keeps only what this reader holds.

Two readers that share a consumer name (the default, the host name: two
readers on one host) each hold entries pending under that name. When one dies,
its entries must go idle and be claimed after ``--claim-idle`` by a live
reader; the live reader's refresh used to reset the idle time of every entry
pending under the name, so they stayed pending, unsent, for as long as it ran.
A failover (the server a replica for a moment) stopped the refreshing for good.
Real Redis and a real ``bertstream stream`` process.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from contract.settings import Settings
from producer.redis_stream import RedisStreamSource
from tests.conftest import RedisServer
from tests.producer_helpers import jsonl_lines
from tests.test_redis_stream_faults import _finish, _pending, _poll, _reader


def _consumers(r: redis.Redis, key: str) -> set[str]:
    try:
        return {c["name"].decode() for c in r.xinfo_consumers(key, "g")}
    except redis.ResponseError:  # no group yet
        return set()


def test_a_dead_reader_of_the_same_name_has_its_entries_claimed_by_a_live_one(
        bsettings: Settings, r: redis.Redis, tmp_path: Path) -> None:
    """Reader a runs as consumer ``host``; another reader of that name reads three entries
    and dies without sending them (one transaction reads them ahead of a's blocking
    read). a holds none of them: after --claim-idle they are claimed, and a sends them."""
    key = f"{bsettings.queue}:posts"
    log, ids_out = tmp_path / "a.log", tmp_path / "a.jsonl"
    a = _reader(bsettings, key, "host", log, "--claim-idle", "1", "--idle-exit", "5",
                "--max-queue", "100000", "--ids-out", str(ids_out))
    try:
        _poll(lambda: "host" in _consumers(r, key), 30, "reader a to read")
        with r.pipeline(transaction=True) as pipe:  # the other reader's read, then its death
            for i in range(3):
                pipe.xadd(key, {"text": f"t{i}"})
            pipe.xreadgroup("g", "host", {key: ">"})
            *added, _read = pipe.execute()
        dead = [x.decode() for x in added]
        assert _pending(r, key) == {"host": 3}
    finally:
        out = _finish(a, log)
    assert a.returncode == 0, out
    sent = [x["entry"] for x in jsonl_lines(ids_out) if "error" not in x] \
        if ids_out.exists() else []
    assert sent == dead, out
    assert r.xpending(key, "g")["pending"] == 0


def test_the_refresh_outlives_a_failover(redis_server: RedisServer) -> None:
    """Redis a replica for a moment (a failover: writes answered READONLY) while reader a
    holds entries: its refreshing stopped for good at the first refusal, so after
    --claim-idle reader b claimed what a held and sent it too. It goes on refreshing."""
    admin = redis.Redis.from_url(redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    a = RedisStreamSource(client, "posts", "g", "a", claim_idle_s=2, block_ms=100)
    records = a.records()
    try:
        for i in range(3):
            admin.xadd("posts", {"text": f"t{i}"})
        held = [next(records).ref for _ in range(3)]  # then held by backpressure
        time.sleep(a.refresh_every_s * 1.5)
        admin.replicaof("127.0.0.1", "1")  # no such primary: a replica, refusing writes
        time.sleep(a.refresh_every_s * 2.5)  # at least one refresh refused
        admin.replicaof("no", "one")
        time.sleep(2.5)  # past --claim-idle since the failover began
        b = RedisStreamSource(admin, "posts", "g", "b", claim_idle_s=2, block_ms=100,
                              idle_exit_s=0.3)
        try:
            claimed = [record.ref for record in b.records()]
        finally:
            b.close()
    finally:
        records.close()
        a.close()
        client.close()
        admin.close()
    assert len(held) == 3
    assert claimed == [], "b claimed entries a held and was about to send"
