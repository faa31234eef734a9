"""Workers on hosts whose clocks are apart share one heartbeat index (``contract.liveness``):
no worker's clock decides whether another worker is listed.

Two announcers in this process stand for two hosts: one has its clock moved (``time.time``
patched around its beats), a fault one host cannot cause for real; Redis is real.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from contract.liveness import HEARTBEAT_TTL_S, announce, family_workers, index_key, worker_key

#: Clock offsets of the skewed host: two minutes and an hour, behind and ahead.
SKEWS = [-3600.0, -120.0, 120.0, 3600.0]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url)
    yield r
    r.close()


def beat(client: redis.Redis, monkeypatch: pytest.MonkeyPatch, queue: str, host: str,
         skew: float) -> None:
    """One heartbeat of ``host``, whose clock is ``skew`` seconds off."""
    real = time.time
    with monkeypatch.context() as patch:
        patch.setattr(time, "time", lambda: real() + skew)
        announce(client, queue, f"celery@{host}", "{}")


@pytest.mark.parametrize("skew", SKEWS)
def test_a_skewed_host_stays_listed_through_every_beat(
        client: redis.Redis, monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """Beats of both hosts, in turns: readers see both workers after every one of them."""
    queue = f"bst-skew-{uuid.uuid4().hex[:8]}"
    seen = []
    for host, offset in [("right", 0.0), ("skewed", skew), ("right", 0.0), ("skewed", skew),
                         ("right", 0.0)]:
        beat(client, monkeypatch, queue, host, offset)
        seen.append([w["hostname"] for w in family_workers(client, queue)])
    assert seen[1:] == [["celery@right", "celery@skewed"]] * 4


@pytest.mark.parametrize("skew", SKEWS)
def test_scores_are_by_the_servers_clock(
        client: redis.Redis, monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """A member's score is when its key expires by the Redis server's clock, whatever the
    writer's clock says (an hour-ahead host's member would outlive its dead worker by an
    hour in the index)."""
    beat(client, monkeypatch, "q", "skewed", skew)
    seconds, micros = client.time()
    score = client.zscore(index_key("q"), worker_key("q", "celery@skewed"))
    assert score is not None
    assert abs(score - (seconds + micros / 1e6 + HEARTBEAT_TTL_S)) < 5
