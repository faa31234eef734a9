"""The API's queue metrics on a Redis that refuses scripts: an ACL user without
``+@scripting``, or a server without Lua (here: a redis-server whose scripting commands
are renamed away). The depth walk then runs from the client, and the metrics read the
same as on a Redis that runs the script; the refusal is logged once, not per scrape.
Private redis-servers, real ACL users."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import ApiMetrics, BindingWalk
from api.submit import broker_redis
from bench.metrics_scrape import bind
from contract.broker import lane_keys
from contract.constants import queue_name
from contract.liveness import announce
from contract.settings import Settings
from producer.client import Client
from tests.scriptless_redis import REFUSALS, Server, refusing_server


@pytest.fixture(params=REFUSALS)
def refusing(request: Any, tmp_path: Path) -> Iterator[tuple[Server, str]]:
    """A private server and the URL of a user on it whose scripts Redis refuses."""
    with refusing_server(request.param, tmp_path) as found:
        yield found


Sample = tuple[str, tuple[tuple[str, str], ...]]


def _scrape(metrics: ApiMetrics) -> dict[Sample, float]:
    """Every sample of one scrape but the request counters, by (name, labels)."""
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        if family.name.startswith("bertstream_api_"):
            continue
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_queue_depth_and_workers_are_reported_when_redis_refuses_scripts(
        refusing: tuple[Server, str], caplog: pytest.LogCaptureFixture) -> None:
    server, url = refusing
    queue = f"bst-noscript-{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=url, queue=queue)
    # Published as a producer does (no script needed), to this server's model and another.
    with Client(settings) as producer:
        producer.submit("one")
        producer.submit_many(["two", "three"])
        producer.submit("four", model="other")
    announce(server.admin, queue, "celery@w1", "{}")
    client = broker_redis(settings)
    try:
        metrics = ApiMetrics()
        metrics.watch(client, settings)
        with caplog.at_level(logging.WARNING, logger="api.metrics"):
            first = _scrape(metrics)
            second = _scrape(metrics)
    finally:
        client.close()
    assert first[("bertstream_redis_up", ())] == 1.0
    assert first[("bertstream_broker_misconfigured", ())] == 0.0
    assert first[("bertstream_queue_depth", (("lane", "interactive"),))] == 1.0
    assert first[("bertstream_queue_depth", (("lane", "bulk"),))] == 1.0
    assert first[("bertstream_family_queue_depth",
                  (("family", f"{queue}-other"), ("lane", "interactive")))] == 1.0
    assert first[("bertstream_workers_alive", ())] == 1.0
    assert first[("bertstream_bound_queues", ())] == 3.0  # the lanes published to
    assert second == first
    refusals = [r for r in caplog.records if "refuses scripts" in r.getMessage()]
    assert len(refusals) == 1


def test_the_walk_without_scripts_reads_what_the_script_reads(tmp_path: Path) -> None:
    """Step by step, past the limit of a scrape and in chunks, the walk from the client
    finds what the script finds: bound queues, the ones left unexamined, every family
    holding messages (in any priority list), none of another queue's."""
    server = Server(tmp_path, [])
    try:
        plain = redis.Redis.from_url(server.add_user_without_scripting())
        queue = "bst-walk"
        families = [queue] + [f"{queue}-m{i}" for i in range(60)]
        bind(server.admin, queue, [*families, f"{queue}x", f"{queue}x-m1"])
        for i, family in enumerate(families[::7]):
            keys = lane_keys(queue_name(family, "bulk" if i % 2 else "interactive"))
            server.admin.rpush(keys[0], *["m"] * (i + 1))
            server.admin.rpush(keys[-1], "p")
        server.admin.rpush(queue_name(f"{queue}x", "interactive"), "foreign")
        always = [f"{queue}-m{i}" for i in (1, 2, 3, 4, 5, 6)]
        scripted, unscripted = (BindingWalk(queue, limit=25, chunk=10) for _ in range(2))
        for step in range(8):
            if step == 4:  # a family found holding messages empties; another fills
                server.admin.delete(*lane_keys(queue_name(families[7], "bulk")))
                server.admin.rpush(queue_name(families[3], "bulk"), "late")
            want = scripted.depths(server.admin, always)
            got = unscripted.depths(plain, always)
            assert got == want, step
            assert (unscripted.bound, unscripted.unexamined) == (scripted.bound,
                                                                 scripted.unexamined)
        assert scripted.scripted and not unscripted.scripted
        assert any(sum(lanes.values()) for lanes in want.values())
        plain.close()
    finally:
        server.stop()
