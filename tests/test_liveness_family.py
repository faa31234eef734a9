"""One heartbeat reader for one queue family and for every family of a queue
(``contract.liveness``), against the real Redis and the workers' own Heartbeat class:
the host is what follows the family, and queue names match only themselves."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest
import redis

from contract.constants import WORKER_KEY_PREFIX
from contract.liveness import announce, family_workers, is_family_of, live_workers
from contract.settings import Settings
from producer.client import Client
from tests.polling import until
from worker.healthcheck import check
from worker.heartbeat import Heartbeat, node_name


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


def test_a_node_name_with_a_colon_keeps_its_whole_name(redis_url: str,
                                                       client: redis.Redis) -> None:
    """``worker --hostname 'w:1@%h'`` is a valid Celery node name; the heartbeat key is
    ``<family>:w:1@host``, and every reader gives the whole name back, not ``1@host``."""
    base = Settings(broker_url=redis_url, database_url="sqlite://",
                    queue=f"bst-colon-{uuid.uuid4().hex[:8]}")
    named = base.replace(model_name="v2")
    node = node_name("w:1@%h")
    assert node == f"w:1@{socket.gethostname()}"
    beats = [Heartbeat(base, node, {"model": "m"}).start(),
             Heartbeat(named, "x:y@h2", {}).start()]
    try:
        until(lambda: len(list(client.scan_iter(match=f"{WORKER_KEY_PREFIX}*"))) == 2)
        assert [w["hostname"] for w in live_workers(client, base.family)] == [node]
        assert [w["hostname"] for w in live_workers(client, named.family)] == ["x:y@h2"]
        assert [(w["family"], w["hostname"]) for w in family_workers(client, base.queue)] == [
            (base.queue, node), (named.family, "x:y@h2")]
        with Client(base) as producer:
            workers = producer.live_workers()
        assert workers is not None and [w["hostname"] for w in workers] == [node]
        assert workers[0]["model"] == "m"
    finally:
        for beat in beats:
            beat.stop()


def test_glob_characters_in_a_queue_name_match_only_that_queue(redis_url: str,
                                                               client: redis.Redis) -> None:
    """A queue name is not a pattern: ``bst-[a]*<x>`` does not take in the workers of
    the queue ``bst-a<x>``, which that pattern would match."""
    tag = uuid.uuid4().hex[:6]
    mine = Settings(broker_url=redis_url, queue=f"bst-[a]*{tag}")
    other = mine.replace(queue=f"bst-a{tag}")
    beats = [Heartbeat(mine, "celery@mine", {}).start(),
             Heartbeat(other, "celery@other", {}).start(),
             Heartbeat(other.replace(model_name="v2"), "celery@other-v2", {}).start()]
    try:
        until(lambda: len(list(client.scan_iter(match=f"{WORKER_KEY_PREFIX}*"))) == 3)
        assert [w["hostname"] for w in live_workers(client, mine.family)] == ["celery@mine"]
        assert [w["hostname"] for w in family_workers(client, mine.queue)] == ["celery@mine"]
        assert [w["hostname"] for w in live_workers(client, other.family)] == ["celery@other"]
    finally:
        for beat in beats:
            beat.stop()


def test_a_value_that_is_not_a_json_object_is_a_worker_without_facts(
        redis_url: str, client: redis.Redis) -> None:
    """Both readers treat a value that is not JSON, or JSON but no object, alike: the
    worker counts, with only what its key says; the key also wins over the value."""
    queue = f"bst-junk-{uuid.uuid4().hex[:8]}"
    for host, value in (("a", "not json"), ("b", "42"), ("c", "[1, 2]"),
                        ("d", '{"hostname": "liar", "family": "x", "model": "m"}')):
        announce(client, queue, f"celery@{host}", value)
    expected = [{"hostname": f"celery@{h}", "family": queue} for h in "abc"] + [
        {"hostname": "celery@d", "family": queue, "model": "m"}]
    assert live_workers(client, queue) == expected
    assert family_workers(client, queue) == expected


def test_one_family_is_only_that_family(redis_url: str, client: redis.Redis) -> None:
    """``live_workers`` of the default family leaves out the named models' workers and a
    longer queue name's; of a named family, only that model's (a dotted name too)."""
    base = Settings(broker_url=redis_url, queue=f"bst-one-{uuid.uuid4().hex[:8]}")
    beats = [Heartbeat(base, "celery@d", {}).start(),
             Heartbeat(base.replace(model_name="v2.1"), "celery@n", {}).start(),
             Heartbeat(base.replace(queue=base.queue + "2"), "celery@longer", {}).start()]
    try:
        until(lambda: len(list(client.scan_iter(match=f"{WORKER_KEY_PREFIX}*"))) == 3)
        assert [w["hostname"] for w in live_workers(client, base.queue)] == ["celery@d"]
        assert [w["hostname"] for w in live_workers(client, f"{base.queue}-v2.1")] == [
            "celery@n"]
        assert live_workers(client, f"{base.queue}-v2") == []
    finally:
        for beat in beats:
            beat.stop()


def test_is_family_of() -> None:
    assert is_family_of("q", "q") and is_family_of("q-v2.1", "q")
    assert not is_family_of("q2", "q") and not is_family_of("q-", "q")
    assert not is_family_of("q-.x", "q") and not is_family_of("q-a b", "q")
    assert not is_family_of("p-q", "q") and not is_family_of("q", "q-a")


def test_the_healthcheck_counts_only_its_own_queue(redis_url: str,
                                                   client: redis.Redis) -> None:
    """A worker of another queue on this host (another deployment sharing the host and
    Redis) does not make this queue's health check pass; one of a named model of this
    queue does."""
    mine = Settings(broker_url=redis_url, queue=f"bst-hc-{uuid.uuid4().hex[:8]}")
    host = f"host-{uuid.uuid4().hex[:6]}"
    beat = Heartbeat(mine.replace(queue=f"bst-elsewhere-{uuid.uuid4().hex[:8]}"),
                     f"bertstream-1@{host}", {}).start()
    try:
        until(lambda: len(list(client.scan_iter(match=f"{WORKER_KEY_PREFIX}*"))) == 1)
        assert check(mine, host, None) == f"no fresh heartbeat from a worker on {host}"
        named = Heartbeat(mine.replace(model_name="b"), f"bertstream-2@{host}", {}).start()
        try:
            until(lambda: check(mine, host, None) is None)
        finally:
            named.stop()
    finally:
        beat.stop()
