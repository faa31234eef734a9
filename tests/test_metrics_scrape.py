"""What a scrape of the API's queue metrics costs Redis as kombu's bindings pile up, and
that it stays right: kombu never removes a binding, so every model family ever published
to stays bound with its queues empty. A scrape must not send a command per bound family,
and must still report every family that holds messages, however many empty ones there
are. Counted on the client's connections against the real Redis."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from kombu.transport.redis import Channel as RedisChannel
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import api.metrics
from api.metrics import EXAMINE_CHUNK, MAX_DEPTH_FAMILIES, ApiMetrics
from bench.metrics_scrape import Tally, bind, counting_client
from contract.broker import lane_keys
from contract.constants import queue_name
from contract.liveness import announce
from contract.settings import Settings

STALE = 20_000


@pytest.fixture
def counted(redis_url: str) -> Any:
    tally = Tally()
    client = counting_client(redis_url, tally)
    yield client, tally
    client.close()


def _settings(redis_url: str, **kw: Any) -> Settings:
    return Settings(broker_url=redis_url, queue=f"bst-scrape-{uuid.uuid4().hex[:8]}", **kw)


def _scrape(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """One scrape's depth gauges: ``up``, per lane, per (family, lane)."""
    metrics = ApiMetrics()
    metrics.watch(client, settings)
    out: dict[str, Any] = {"up": None, "lane": {}, "family": {}}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            if family.name == "bertstream_redis_up":
                out["up"] = s.value
            elif family.name == "bertstream_queue_depth":
                out["lane"][s.labels["lane"]] = s.value
            elif family.name == "bertstream_family_queue_depth":
                out["family"][(s.labels["family"], s.labels["lane"])] = s.value
    return out


def _stale(client: redis.Redis, queue: str, count: int) -> list[str]:
    families = [queue] + [f"{queue}-m{i}" for i in range(count)]
    bind(client, queue, families)
    return families


def _cost(client: redis.Redis, tally: Tally, settings: Settings) -> tuple[int, int, int]:
    """Round trips, commands and bytes sent of a scrape (after one that lets Redis see
    any script the scrape runs)."""
    metrics = ApiMetrics()
    metrics.watch(client, settings)
    generate_latest(metrics.registry)
    tally.reset()
    generate_latest(metrics.registry)
    return tally.trips, tally.commands, tally.sent


def test_a_scrape_sends_no_command_per_bound_family(
        redis_url: str, counted: tuple[redis.Redis, Tally]) -> None:
    client, tally = counted
    settings = _settings(redis_url)
    _stale(client, settings.queue, STALE)
    trips, commands, sent = _cost(client, tally, settings)
    assert commands == trips  # no pipeline of a command per family
    assert trips <= -(-2 * (STALE + 1) // EXAMINE_CHUNK) + 4
    assert sent < 400 * trips  # no key of a bound family goes over the wire


def test_past_the_limit_a_scrape_costs_the_same(
        redis_url: str, counted: tuple[redis.Redis, Tally],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.metrics, "MAX_EXAMINED_QUEUES", 1_000)
    monkeypatch.setattr(api.metrics, "EXAMINE_CHUNK", 100)
    client, tally = counted
    cost = {}
    for count in (1_000, STALE):
        settings = _settings(redis_url)
        _stale(client, settings.queue, count)
        cost[count] = _cost(client, tally, settings)
    assert cost[STALE][0] <= 1_000 // 100 + 4
    assert cost[STALE][0] - cost[1_000][0] <= 2  # SSCAN's COUNT is a hint
    assert cost[STALE][1] == cost[STALE][0]
    assert cost[STALE][2] < 400 * cost[STALE][0]


def test_families_with_messages_among_empty_ones_are_all_reported(
        redis_url: str, counted: tuple[redis.Redis, Tally]) -> None:
    """Every family holding messages shows (a priority step's list counts), none of the
    empty ones does, and the lane series of the server's own family stay."""
    client, _ = counted
    settings = _settings(redis_url)
    queue = settings.queue
    _stale(client, queue, STALE)
    client.rpush(queue_name(f"{queue}-m0", "interactive"), "a", "b")
    client.rpush(lane_keys(queue_name(f"{queue}-m19999", "bulk"))[-1], "c")  # priority 9
    client.rpush(lane_keys(queue_name(f"{queue}-m12345", "bulk"))[1], "d")
    client.rpush(queue_name(f"{queue}-m12345", "bulk"), "e")
    client.rpush(queue_name(queue, "interactive"), "f")
    seen = _scrape(client, settings)
    assert seen["lane"] == {"interactive": 1.0, "bulk": 0.0}
    assert seen["family"] == {
        (queue, "interactive"): 1.0, (queue, "bulk"): 0.0,
        (f"{queue}-m0", "interactive"): 2.0, (f"{queue}-m0", "bulk"): 0.0,
        (f"{queue}-m12345", "interactive"): 0.0, (f"{queue}-m12345", "bulk"): 2.0,
        (f"{queue}-m19999", "interactive"): 0.0, (f"{queue}-m19999", "bulk"): 1.0}


def test_past_the_limit_the_rest_are_summed_and_served_families_show(
        redis_url: str, counted: tuple[redis.Redis, Tally]) -> None:
    """With more families holding messages than get a label, the deepest keep theirs and
    ``other`` sums the rest; a family with a live worker shows while empty and unbound,
    and messages in a served family's lists count even where no binding names them."""
    client, _ = counted
    settings = _settings(redis_url)
    queue = settings.queue
    _stale(client, queue, 2_000)
    for i in range(MAX_DEPTH_FAMILIES + 10):
        client.rpush(queue_name(f"{queue}-m{i}", "bulk"), *["x"] * (1 + i))
    for name in ("idle", "busy"):  # what a worker's heartbeat writes
        announce(client, f"{queue}-{name}", f"celery@{name}", "{}")
    client.rpush(queue_name(f"{queue}-busy", "interactive"), "y", "y", "y")
    seen = _scrape(client, settings)
    families = {family for family, _ in seen["family"]}
    kept = {f"{queue}-m{i}" for i in range(13, MAX_DEPTH_FAMILIES + 10)}
    assert families == {queue, f"{queue}-idle", f"{queue}-busy", "other"} | kept
    assert seen["family"][(f"{queue}-busy", "interactive")] == 3.0
    assert seen["family"][(f"{queue}-idle", "bulk")] == 0.0
    assert seen["family"][("other", "bulk")] == sum(range(1, 14))
    assert sum(seen["family"].values()) == sum(range(1, MAX_DEPTH_FAMILIES + 11)) + 3


def test_a_queue_bound_twice_counts_once_and_foreign_queues_do_not_count(
        redis_url: str, counted: tuple[redis.Redis, Tally]) -> None:
    """A lane bound under two routing keys is one queue; a queue bound to the exchange
    that is no lane of a family of this queue (another name, a bad model name) is none
    of the metric's business."""
    client, _ = counted
    settings = _settings(redis_url)
    queue = settings.queue
    lane = queue_name(f"{queue}-twice", "bulk")
    key = RedisChannel.keyprefix_queue % (queue,)
    client.sadd(key, RedisChannel.sep.join([lane, "", lane]),
                RedisChannel.sep.join(["elsewhere", "", lane]))
    foreign = ["unrelated.bulk", queue_name(f"{queue}-bad name", "bulk"),
               f"{queue}-x.other"]
    for name in foreign:
        client.sadd(key, RedisChannel.sep.join([name, "", name]))
        client.rpush(name, "z")
    client.rpush(lane, "a", "b")
    seen = _scrape(client, settings)
    assert seen["family"] == {(queue, "interactive"): 0.0, (queue, "bulk"): 0.0,
                              (f"{queue}-twice", "interactive"): 0.0,
                              (f"{queue}-twice", "bulk"): 2.0}


def test_past_the_limit_the_walk_goes_on_and_a_family_found_stays(
        redis_url: str, counted: tuple[redis.Redis, Tally],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With more bound queues than a scrape reads, the scrapes that follow read the rest
    and say how many they left; a family found holding messages is reported at every
    scrape after, until it is empty, whatever part of the bindings a scrape reads."""
    monkeypatch.setattr(api.metrics, "MAX_EXAMINED_QUEUES", 1_000)
    monkeypatch.setattr(api.metrics, "EXAMINE_CHUNK", 250)
    client, _ = counted
    settings = _settings(redis_url)
    queue = settings.queue
    _stale(client, queue, 5_000)
    late = f"{queue}-m4321"
    client.rpush(queue_name(late, "interactive"), "a")
    metrics = ApiMetrics()
    metrics.watch(client, settings)

    def scrape() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for family in text_string_to_metric_families(
                generate_latest(metrics.registry).decode()):
            for s in family.samples:
                key = (s.labels.get("family"), s.labels.get("lane"))
                out.setdefault(family.name, {})[key] = s.value
        return out

    found = None
    for n in range(12):  # 10,002 bound queues, 1,000 a scrape
        seen = scrape()
        assert seen["bertstream_bound_queues"] == {(None, None): 10_002}
        assert seen["bertstream_bound_queues_unexamined"][(None, None)] > 0
        if (late, "interactive") in seen["bertstream_family_queue_depth"]:
            found = n
            break
    assert found is not None
    for _ in range(12):
        depth = scrape()["bertstream_family_queue_depth"]
        assert depth[(late, "interactive")] == 1.0
        assert set(depth) == {(queue, "interactive"), (queue, "bulk"),
                              (late, "interactive"), (late, "bulk")}
    client.delete(queue_name(late, "interactive"))
    assert (late, "interactive") not in scrape()["bertstream_family_queue_depth"]


def test_past_the_limit_every_family_with_messages_is_counted(
        redis_url: str, counted: tuple[redis.Redis, Tally],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the walk has been round, the depth gauge sums every message waiting, however
    many families hold them, and a scrape still sends a command per chunk: the families
    read by name go a chunk at a time too."""
    monkeypatch.setattr(api.metrics, "MAX_EXAMINED_QUEUES", 1_000)
    monkeypatch.setattr(api.metrics, "EXAMINE_CHUNK", 100)
    client, tally = counted
    settings = _settings(redis_url)
    queue = settings.queue
    _stale(client, queue, 3_000)
    for i in range(0, 3_000, 2):  # 1,500 families hold messages
        client.rpush(queue_name(f"{queue}-m{i}", "bulk" if i % 4 else "interactive"), "x")
    metrics = ApiMetrics()
    metrics.watch(client, settings)
    for _ in range(8):  # 6,002 bound queues, 1,000 a scrape
        generate_latest(metrics.registry)
    tally.reset()
    text = generate_latest(metrics.registry).decode()
    assert tally.trips == tally.commands <= 1_000 // 100 + 3_000 // 100 + 4
    total = sum(s.value for family in text_string_to_metric_families(text)
                for s in family.samples if family.name == "bertstream_family_queue_depth")
    assert total == 1_500


def test_the_workers_scrape_reads_its_own_lanes_only(
        redis_url: str, counted: tuple[redis.Redis, Tally]) -> None:
    """A worker's queue depth is its own family's two lanes, one pipeline, whatever else
    is bound."""
    from worker.metrics import _QueueDepth

    client, tally = counted
    settings = _settings(redis_url)
    _stale(client, settings.queue, STALE)
    client.rpush(lane_keys(queue_name(settings.queue, "bulk"))[2], "x")
    depth = _QueueDepth(settings)
    assert depth.client is not None
    depth.client.close()
    depth.client = client
    tally.reset()
    [family] = depth.collect()
    assert {s.labels["lane"]: s.value for s in family.samples} == {"interactive": 0,
                                                                   "bulk": 1}
    assert (tally.trips, tally.commands) == (1, 2 * len(lane_keys("q")))
