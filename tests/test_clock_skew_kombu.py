"""kombu's visibility timeout on real Redis when worker hosts' clocks are apart.

Every worker's sweep restores the unacked messages recorded longer ago than the
visibility timeout (worker/kombu_redis.py, point 4). Here the receiving, renewing or
sweeping "host" has its clock moved (``time.time`` and the names kombu and
worker.kombu_redis took of it, patched), a fault one host cannot cause for real: no
message still in flight is restored, and a dead worker's is, by the server's clock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kredis

from tests.conftest import kombu_broker
from tests.test_kombu_receive import FIRST, _consumer, _publish
from worker import kombu_redis

#: Clock offsets of the skewed host: two minutes and an hour, behind and ahead.
SKEWS = [-3600.0, -120.0, 120.0, 3600.0]
#: The visibility timeout of these tests: shorter than the two-minute skews, as the
#: default (300 s) is shorter than an hour.
TIMEOUT_S = 60


@pytest.fixture
def skewed_broker(redis_url: str) -> Iterator[tuple[Connection, redis.Redis]]:
    """A kombu connection with bertstream's receive installed (visibility timeout
    ``TIMEOUT_S``) and a plain client."""
    with kombu_broker(redis_url, TIMEOUT_S) as pair:
        yield pair


@contextlib.contextmanager
def host_clock(monkeypatch: pytest.MonkeyPatch, skew: float) -> Iterator[None]:
    """Inside the block this process's clock is ``skew`` seconds off."""
    real = time.time

    def skewed() -> float:
        return real() + skew

    with monkeypatch.context() as patch:
        patch.setattr(time, "time", skewed)
        patch.setattr(kombu_redis, "time", skewed)
        patch.setattr(kredis, "time", skewed)
        yield


def receive(conn: Connection, got: list[Any], n: int) -> None:
    """Drain until ``got`` holds ``n`` messages, acking none (they stay in flight)."""
    deadline = time.monotonic() + 10
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} delivered"
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.2)


def server_now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


def sweep(channel: Any) -> None:
    channel.qos.restore_visible(num=10, interval=1)


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic-receive", "kombu-brpop"])
@pytest.mark.parametrize("skew", SKEWS)
def test_a_skewed_receiver_is_not_swept_early_nor_late(
        skewed_broker: tuple[Connection, redis.Redis], monkeypatch: pytest.MonkeyPatch,
        skew: float, atomic: bool) -> None:
    """A message received on a skewed host is scored by the server's clock: a sweep by a
    host whose clock is right leaves it in flight."""
    conn, r = skewed_broker
    got: list[Any] = []
    try:
        assert kombu_redis.install(atomic_receive=atomic)
        channel = _consumer(conn, got)
        _publish(conn, "in flight")
        with host_clock(monkeypatch, skew):
            receive(conn, got, 1)
    finally:
        kombu_redis.install()
    (_, message), = got
    score = r.zscore("unacked_index", message.delivery_tag)
    assert score is not None and abs(score - server_now(r)) < 5
    sweep(channel)
    assert r.llen(FIRST) == 0 and r.hlen("unacked") == 1
    message.ack()


@pytest.mark.parametrize("skew", SKEWS)
def test_a_skewed_sweeper_restores_by_the_servers_clock(
        skewed_broker: tuple[Connection, redis.Redis], monkeypatch: pytest.MonkeyPatch,
        skew: float) -> None:
    """Two messages in flight, one recorded past the visibility timeout (a dead worker's):
    a sweep by a skewed host restores that one only."""
    conn, r = skewed_broker
    got: list[Any] = []
    channel = _consumer(conn, got)
    _publish(conn, "alive")
    _publish(conn, "dead")
    receive(conn, got, 2)
    (_, alive), (_, dead) = got
    r.zadd("unacked_index", {dead.delivery_tag: server_now(r) - TIMEOUT_S - 1}, xx=True)
    with host_clock(monkeypatch, skew):
        sweep(channel)
    assert r.llen(FIRST) == 1 and r.hexists("unacked", alive.delivery_tag)
    assert not r.hexists("unacked", dead.delivery_tag)
    alive.ack()


@pytest.mark.parametrize("skew", SKEWS)
def test_a_skewed_holder_renews_by_the_servers_clock(
        skewed_broker: tuple[Connection, redis.Redis], monkeypatch: pytest.MonkeyPatch,
        skew: float) -> None:
    """A held message renewed (``keep_visible``) on a skewed host is scored by the server's
    clock, so a sweep by a host whose clock is right leaves it held."""
    conn, r = skewed_broker
    got: list[Any] = []
    channel = _consumer(conn, got)
    _publish(conn, "held")
    receive(conn, got, 1)
    (_, held), = got
    r.zadd("unacked_index", {held.delivery_tag: server_now(r) - TIMEOUT_S - 1}, xx=True)
    with host_clock(monkeypatch, skew):
        kombu_redis.keep_visible([held])
    score = r.zscore("unacked_index", held.delivery_tag)
    assert score is not None and abs(score - server_now(r)) < 5
    sweep(channel)
    assert r.llen(FIRST) == 0 and r.hlen("unacked") == 1
    held.ack()


def test_the_server_clock_is_guarded_by_kombus_version() -> None:
    """kombu's methods are replaced only for the versions their code was read for; the
    installed kombu is one (pyproject pins it), and its sweep is the replacement."""
    assert kombu_redis.install()
    assert kombu_redis.server_clock_refusal(tuple(__import__("kombu").VERSION), kredis) is None
    assert kredis.QoS.restore_visible is kombu_redis._restore_visible
    for outside in [(5, 3, 9), (5, 8, 0), (6, 0, 0)]:
        refusal = kombu_redis.server_clock_refusal(outside, kredis)
        assert refusal is not None and ".".join(map(str, outside)) in refusal


def test_another_kombu_keeps_its_own_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a kombu outside the known versions nothing of kombu's is replaced, and the
    receive script and renewals score by the local clock, as kombu's sweep does."""
    import kombu

    assert kombu_redis.install()

    class FakeQoS:
        restore_visible = object()

    class FakeRedis:
        QoS = FakeQoS
        Mutex = MutexHeld = object()

    monkeypatch.setattr(kombu, "VERSION", (5, 8, 0, "", ""))
    monkeypatch.setattr(kombu_redis, "_SERVER_CLOCK", True)
    assert not kombu_redis._patch_clock(FakeRedis)
    assert FakeQoS.restore_visible is not kombu_redis._restore_visible
    assert kombu_redis._SERVER_CLOCK is False
