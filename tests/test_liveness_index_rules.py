"""The heartbeat index (``contract.liveness``) answers what a SCAN of the keys with the
family rules answered (the readers did that before the index): the family rules, values
that are no JSON object, TTLs; and a key no index lists is no worker."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from bench.metrics_scrape import Tally, counting_client
from contract.constants import WORKER_KEY_PREFIX
from contract.liveness import (
    HEARTBEAT_TTL_S,
    INDEX_GRACE_S,
    INDEX_KEY_PREFIX,
    announce,
    family_workers,
    index_key,
    index_queues,
    is_family_of,
    live_workers,
    withdraw,
    worker_key,
)
from contract.settings import Settings
from tests.polling import until
from worker.heartbeat import Heartbeat


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


def indexes(client: redis.Redis) -> list[bytes]:
    return sorted(client.scan_iter(match=INDEX_KEY_PREFIX + "*"))


def reads(client: redis.Redis, queues: list[str]) -> dict[str, Any]:
    """What both readers give for each of ``queues`` (as a queue and as a family)."""
    return {q: (family_workers(client, q), live_workers(client, q)) for q in queues}


def scanned(client: redis.Redis, queue: str) -> tuple[list[str], list[str]]:
    """The hosts a SCAN of the heartbeat keys finds for ``queue`` by the family rules: as
    a queue (its default family, and ``<queue>-<model name>``), and as one family."""
    prefix = f"{WORKER_KEY_PREFIX}{queue}"
    families, own = [], []
    for key in sorted(k.decode() for k in client.scan_iter(match=f"{WORKER_KEY_PREFIX}*")):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest.startswith(":"):
            families.append((queue, rest[1:]))
            own.append(rest[1:])
        elif rest.startswith("-"):
            name, sep, host = rest[1:].partition(":")
            if sep and is_family_of(f"{queue}-{name}", queue):
                families.append((f"{queue}-{name}", host))
    return [host for _, host in sorted(families)], own


def test_index_queues() -> None:
    assert index_queues("q") == ["q"]
    assert index_queues("q-v2.1") == ["q-v2.1", "q"]
    assert index_queues("a-b-c") == ["a-b-c", "a", "a-b"]
    assert index_queues("q-.x") == ["q-.x"]  # ".x" is no model name


def test_the_index_answers_what_the_scan_answered(client: redis.Redis) -> None:
    """Workers of default and named families, hosts with ':', a queue with glob characters,
    a longer queue name, a queue that is also a named family of a shorter one: every
    reader gives the same with the indexes as without them (where it SCANs)."""
    tag = uuid.uuid4().hex[:6]
    q = f"bst-eq{tag}"
    workers = [(q, "celery@d"), (q, "w:1@h"), (f"{q}-v2.1", "celery@n"), (f"{q}-v2.1", "x:y@z"),
               (f"{q}2", "celery@longer"), (f"{q}-a-b", "celery@ab"),
               (f"bst-[a]*{tag}", "celery@glob"), (f"bst-a{tag}", "celery@plain")]
    for family, host in workers:
        announce(client, family, host, f'{{"model": "{host}"}}')
    queues = sorted({f for f, _ in workers} | {q, f"{q}-a", "bst", f"bst-[a]*{tag}"})
    indexed = reads(client, queues)
    assert indexed[q][0] and indexed[f"bst-[a]*{tag}"][1]
    assert [w["hostname"] for w in indexed[q][0]] == [
        "celery@d", "w:1@h", "celery@ab", "celery@n", "x:y@z"]
    assert [w["hostname"] for w in indexed[f"bst-a{tag}"][0]] == ["celery@plain"]
    for queue in queues:
        by_family, own = scanned(client, queue)
        assert [w["hostname"] for w in indexed[queue][0]] == by_family, queue
        assert [w["hostname"] for w in indexed[queue][1]] == own, queue


def test_a_value_that_is_not_a_json_object_through_the_index(client: redis.Redis) -> None:
    queue = f"bst-junk-{uuid.uuid4().hex[:8]}"
    for host, value in (("a", "not json"), ("b", "42"), ("c", "[1, 2]"),
                        ("d", '{"hostname": "liar", "family": "x", "model": "m"}')):
        announce(client, queue, f"celery@{host}", value)
    expected = [{"hostname": f"celery@{h}", "family": queue} for h in "abc"] + [
        {"hostname": "celery@d", "family": queue, "model": "m"}]
    assert client.exists(index_key(queue))
    assert live_workers(client, queue) == expected
    assert family_workers(client, queue) == expected


def test_one_beat_is_two_round_trips_and_a_clean_stop_leaves_nothing(
        redis_url: str, client: redis.Redis) -> None:
    tally = Tally()
    counting = counting_client(redis_url, tally, handshake=False)
    try:
        announce(counting, "q-v2", "celery@h", "{}")
        assert tally.trips == 2  # the server's TIME (hosts' clocks drift), the transaction
        assert indexes(client) == [b"bertstream:workers-index:q", b"bertstream:workers-index:q-v2"]
        assert 0 < client.ttl(index_key("q")) <= HEARTBEAT_TTL_S
        assert 0 < client.ttl(worker_key("q-v2", "celery@h")) <= HEARTBEAT_TTL_S
        tally.reset()
        withdraw(counting, "q-v2", "celery@h")
        assert tally.trips == 1 and client.dbsize() == 0
    finally:
        counting.close()
    base = Settings(broker_url=redis_url, queue=f"bst-stop-{uuid.uuid4().hex[:8]}")
    beats = [Heartbeat(base, "celery@a", {}).start(),
             Heartbeat(base.replace(model_name="m"), "celery@b", {}).start()]
    until(lambda: len(family_workers(client, base.queue)) == 2)
    for beat in beats:
        beat.stop()
    assert client.dbsize() == 0


def test_writers_prune_members_long_expired(client: redis.Redis) -> None:
    """A crashed worker's member goes at another worker's beat once its key has been
    expired for ``INDEX_GRACE_S`` (room for clocks apart); the index never lists it."""
    now = time.time()
    stale, recent = worker_key("q", "celery@crashed"), worker_key("q", "celery@just-died")
    client.zadd(index_key("q"), {stale: now - INDEX_GRACE_S - 5, recent: now - 5})
    announce(client, "q", "celery@alive", "{}")
    assert client.zrange(index_key("q"), 0, -1) == [
        recent.encode(), worker_key("q", "celery@alive").encode()]
    assert [w["hostname"] for w in family_workers(client, "q")] == ["celery@alive"]


def test_a_key_no_index_lists_is_no_worker(redis_url: str, client: redis.Redis) -> None:
    """Readers trust the index alone: a heartbeat key written without it (by hand, or by
    a build before the index) is not counted, and a queue with no index costs no SCAN."""
    queue = f"bst-old-{uuid.uuid4().hex[:8]}"
    client.set(f"{WORKER_KEY_PREFIX}{queue}:celery@old", "{}", ex=60)
    client.set(f"{WORKER_KEY_PREFIX}{queue}-m:celery@old-m", "{}", ex=60)
    tally = Tally()
    counting = counting_client(redis_url, tally, handshake=False)
    try:
        assert family_workers(counting, queue) == []
        assert live_workers(counting, f"{queue}-m") == []
        assert tally.trips == 2  # one read of each index, no SCAN
    finally:
        counting.close()
    announce(client, f"{queue}-m", "celery@new", "{}")
    assert [w["hostname"] for w in family_workers(client, queue)] == ["celery@new"]
    assert [w["hostname"] for w in live_workers(client, f"{queue}-m")] == ["celery@new"]
    assert live_workers(client, queue) == []


def test_the_healthcheck_through_the_index(redis_url: str, client: redis.Redis) -> None:
    """Glob characters in the queue (settings refuse them now; a reader must still take
    them literally) and a named model's worker of this host, read from the index."""
    from worker.healthcheck import check

    mine = dataclasses.replace(Settings(broker_url=redis_url),
                               queue=f"bst-[h]*{uuid.uuid4().hex[:6]}")
    other = dataclasses.replace(mine, queue=mine.queue.replace("[h]*", "h"))
    beats = [Heartbeat(other, "celery@host1", {}).start()]
    try:
        until(lambda: family_workers(client, other.queue))
        assert check(mine, "host1", None) == "no fresh heartbeat from a worker on host1"
        beats.append(Heartbeat(dataclasses.replace(mine, model_name="b"), "w:2@host1",
                               {}).start())
        until(lambda: check(mine, "host1", None) is None)
        assert client.exists(index_key(mine.queue))
    finally:
        for beat in beats:
            beat.stop()
