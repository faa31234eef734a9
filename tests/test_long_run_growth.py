"""Long runs: what a deployment leaves behind must not grow with the tasks or the restarts.

The soak (``bench/soak.py``) runs a few seconds, through the client and through the API,
so it cannot rot, and its end state is checked: every task stored, and no key without a
TTL but kombu's two bindings of the run's queue (a per-task key without one would fill
Redis for ever). A Redis Stream group drops the consumers that died holding nothing:
one per container name was kept for ever.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from bench import soak
from producer.redis_stream import RedisStreamSource, _text


def _consumers(r: redis.Redis, key: str, group: str) -> dict[str, int]:
    """Consumer name -> pending entries."""
    return {c["name"].decode(): int(c["pending"]) for c in r.xinfo_consumers(key, group)}


def _read(r: redis.Redis, consumer: str, key: str) -> list[bytes]:
    """One entry read by ``consumer`` of group ``g``: its id."""
    reply: Any = r.xreadgroup("g", consumer, {key: ">"}, count=1)
    return [entry_id for entry_id, _fields in reply[0][1]]


def test_consumers_that_died_holding_nothing_leave_the_group(r: redis.Redis) -> None:
    """Readers that ran once under names never used again (a container's host name) stayed
    in the group for ever; now a reader's claim scan deletes those idle past the claim
    time with nothing pending, after claiming what the dead ones held."""
    key = "posts"
    ids = [_text(r.xadd(key, {"text": f"post {i}"})) for i in range(6)]
    r.xgroup_create(key, "g", id="0")
    for n in range(4):  # ran, read one entry each, acked it, went away
        r.xack(key, "g", *_read(r, f"pod-{n}", key))
    r.xreadgroup("g", "pod-dead", {key: ">"}, count=1)  # died holding ids[4]
    time.sleep(0.4)
    reader = RedisStreamSource(r, key, "g", "now", claim_idle_s=0.3, idle_exit_s=0.5,
                               block_ms=100)
    got: list[str] = []
    try:
        for record in reader.records():
            assert record.ref is not None
            got.append(record.ref)
            reader.ack([record.ref])
    finally:
        reader.close()
    assert sorted(got) == ids[4:]
    assert _consumers(r, key, "g") == {"now": 0}


def test_a_consumer_holding_entries_or_seen_lately_stays(r: redis.Redis) -> None:
    """Deleting a consumer drops its pending entries from the group for good: one holding
    any stays however idle, and one idle for less than the claim time stays too."""
    key = "posts"
    for i in range(3):
        r.xadd(key, {"text": f"post {i}"})
    r.xgroup_create(key, "g", id="0")
    r.xreadgroup("g", "holder", {key: ">"}, count=1)
    time.sleep(0.5)
    r.xack(key, "g", *_read(r, "recent", key))
    reader = RedisStreamSource(r, key, "g", "me", claim_idle_s=0.4)
    try:
        reader._prune_consumers()
        assert set(_consumers(r, key, "g")) == {"holder", "recent"}
        time.sleep(0.5)
        reader._prune_consumers()
        assert _consumers(r, key, "g") == {"holder": 1}
    finally:
        reader.close()


@pytest.mark.parametrize("via", ["client", "api"])
def test_the_soak_runs_and_leaves_no_key_without_a_ttl(
        redis_url: str, tmp_path: Path, via: str) -> None:
    """A few seconds of ``python -m bench.soak`` with the null model on SQLite: its table
    and JSON hold start and end samples with the processes' figures, every task is
    stored, and the only keys without a TTL are kombu's bindings of the run's queue."""
    out = tmp_path / "soak.json"
    args = ["--broker-url", redis_url, "--duration", "3", "--interval", "1", "--chunk", "50",
            "--rate", "300", "--settle", "1", "--quiet", "--workdir", str(tmp_path / "w"),
            "--out", str(out)] + (["--api"] if via == "api" else [])
    assert soak.main(args) == 0
    result = json.loads(out.read_text())
    assert result["tasks"] > 0 and result["end"]["stored"] == result["tasks"]
    assert len(result["samples"]) >= 3
    procs = ["worker", "api"] if via == "api" else ["worker"]
    for row in (result["start"], result["end"]):
        for proc in procs:
            assert row[f"{proc}_rss_kib"] > 0 and row[f"{proc}_fds"] > 0
        assert row["redis_used_memory"] > 0 and row["pg_connections"] is None
    assert result["end"]["redis_keys_no_ttl"] == 2
    queue = result["queue"]
    assert result["no_ttl_families"] == {f"_kombu.binding.{queue}": 1,
                                         f"_kombu.binding_permanent.{queue}": 1}
    client = redis.Redis.from_url(redis_url)
    try:
        assert not list(client.scan_iter(match=f"*{queue}*"))  # removed at the end
    finally:
        client.close()
