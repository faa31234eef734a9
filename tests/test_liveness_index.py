"""Finding live workers takes a fixed number of Redis round trips, however many other keys
the database holds (the API keeps a claim per accepted item for days): the readers of
``contract.liveness``, the health check and the worker's heartbeat write, counted on a
client whose connections tally what they send (one write of a command or of a pipeline,
then its replies, is one round trip; bench/metrics_scrape.py's, a new connection's
handshake left out)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from bench.metrics_scrape import Tally, counting_client
from contract.constants import ACCEPTED_KEY_PREFIX
from contract.liveness import family_workers, live_workers
from contract.settings import Settings
from tests.polling import until
from worker import healthcheck
from worker.heartbeat import Heartbeat

#: Unrelated keys stored first: a SCAN of 500 keys a round trip needs 10 or more.
OTHER_KEYS = 5_000


@pytest.fixture
def crowded(redis_url: str) -> Iterator[redis.Redis]:
    """The test database holding ``OTHER_KEYS`` keys like the API's id claims."""
    client = redis.Redis.from_url(redis_url)
    with client.pipeline(transaction=False) as pipe:
        for i in range(OTHER_KEYS):
            pipe.set(f"{ACCEPTED_KEY_PREFIX}t:{i:08d}", "0" * 64, ex=600)
        pipe.execute()
    yield client
    client.close()


def counted(tally: Tally, read: Any) -> tuple[Any, int]:
    """``read()`` and the round trips it took."""
    tally.reset()
    out = read()
    return out, tally.trips


def test_readers_take_two_round_trips_whatever_else_the_database_holds(
        redis_url: str, crowded: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    base = Settings(broker_url=redis_url, queue=f"bst-trips-{uuid.uuid4().hex[:8]}")
    named = base.replace(model_name="v2")
    host = socket.gethostname()
    beats = [Heartbeat(base, f"celery@{host}", {"model": "m"}).start(),
             Heartbeat(named, "w:1@elsewhere", {}).start(),
             Heartbeat(base.replace(queue=base.queue + "2"), "celery@other", {}).start()]
    tally = Tally()
    client = counting_client(redis_url, tally, handshake=False)
    try:
        until(lambda: len(family_workers(crowded, base.queue)) == 2
              and live_workers(crowded, base.queue + "2"))
        every, n = counted(tally, lambda: family_workers(client, base.queue))
        assert [(w["family"], w["hostname"], w.get("model")) for w in every] == [
            (base.queue, f"celery@{host}", "m"), (named.family, "w:1@elsewhere", None)]
        assert n <= 2
        one, n = counted(tally, lambda: live_workers(client, named.family))
        assert [w["hostname"] for w in one] == ["w:1@elsewhere"] and n <= 2
        one, n = counted(tally, lambda: live_workers(client, base.family))
        assert [w["hostname"] for w in one] == [f"celery@{host}"] and n <= 2

        # The health check, on a client that counts too (it closes the one it gets).
        monkeypatch.setattr(healthcheck, "redis_client",
                            lambda settings: counting_client(redis_url, tally, handshake=False))
        assert counted(tally, lambda: healthcheck.check(base, host, None)) == (None, 2)
        assert counted(tally, lambda: healthcheck.check(base, "nowhere", None))[0] == (
            "no fresh heartbeat from a worker on nowhere")
        assert tally.trips <= 2
    finally:
        for beat in beats:
            beat.stop()
        client.close()


def test_a_dead_worker_is_gone_with_its_key_and_the_read_stays_bounded(
        redis_url: str, crowded: redis.Redis) -> None:
    """A worker that dies stops refreshing; once its key expires it is not listed, while
    another worker of the queue still is, in the same two round trips."""
    base = Settings(broker_url=redis_url, queue=f"bst-dead-{uuid.uuid4().hex[:8]}")
    alive = Heartbeat(base, "celery@alive", {}).start()
    dead = Heartbeat(base.replace(model_name="gone"), "celery@dead", {}).start()
    tally = Tally()
    client = counting_client(redis_url, tally, handshake=False)
    try:
        until(lambda: len(family_workers(crowded, base.queue)) == 2)
        dead._stop.set()  # a crash: no clean stop, the key is left to expire
        dead._thread.join()
        crowded.pexpire(dead.key, 200)  # as if its last beat were nearly a TTL ago
        until(lambda: not crowded.exists(dead.key))
        got, n = counted(tally, lambda: family_workers(client, base.queue))
        assert [w["hostname"] for w in got] == ["celery@alive"] and n <= 2
        got, n = counted(tally, lambda: live_workers(client, dead.family))
        assert got == [] and n <= 2
    finally:
        alive.stop()
        dead.client.close()
        client.close()
