"""The demo's queue is its own: it fits whatever BERTSTREAM_QUEUE is, it is no model family
of the user's queue, and the demo removes every key of it when it ends.

The demo ran on ``<queue>-demo-<hex6>``: past 88 characters of BERTSTREAM_QUEUE that
passed the 100-character queue limit and the demo stopped on a BERTSTREAM_QUEUE error
the user had not made; and ``<queue>-demo-<hex>`` is the family of a model named
``demo-<hex>``, so a production API on the same Redis counted the demo's worker as one
of its named-model workers while the demo ran. Its cleanup removed heartbeats of the
default model's family only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from contract.errors import ConfigError
from contract.liveness import family_workers, is_family_of
from contract.settings import MAX_QUEUE_CHARS, Settings
from producer.client import Client
from tests.redis_urls import past_the_last_database
from worker.demo import demo_queue, remove_queue_keys, run_demo


@pytest.mark.parametrize("user_queue", ["bertstream", "q" * MAX_QUEUE_CHARS, "bertstream_demo"])
def test_the_demo_queue_is_valid_and_no_family_of_the_users(user_queue: str) -> None:
    name = demo_queue()
    assert Settings(queue=user_queue).replace(queue=name).queue == name
    assert not is_family_of(name, user_queue)
    assert "-" not in name  # so it is no <queue>-<model> family of any queue
    assert demo_queue() != name


@pytest.mark.slow
@pytest.mark.parametrize("user_queue", ["bertstream", "q" * 95])
def test_a_production_reader_does_not_count_the_demo_worker(
        user_queue: str, redis_url: str, sqlite_url: str, tiny_model_dir: Path,
        tmp_path: Path) -> None:
    """While the demo's worker runs, the user's queue family has no worker in Redis; when
    the demo ends nothing of it is left (the fixture flushed the database before)."""
    client = redis.Redis.from_url(redis_url)
    seen: dict[str, object] = {}

    def echo(line: str) -> None:
        if line.startswith("worker ") and " ready " in line:
            seen["counted"] = family_workers(client, user_queue)
            seen["heartbeats"] = sorted(client.scan_iter(match="bertstream:workers:*"))

    try:
        settings = Settings(broker_url=redis_url, database_url=sqlite_url, queue=user_queue,
                            model=str(tiny_model_dir), cache_dir=str(tmp_path))
        assert run_demo(settings, repeat=1, echo=echo) == 0
        assert seen["counted"] == []
        assert len(seen["heartbeats"]) == 1  # type: ignore[arg-type]
        assert sorted(client.scan_iter(match="*")) == []
    finally:
        client.close()


def test_the_cleanup_removes_every_key_of_the_demo_queue(redis_url: str) -> None:
    """A named model's family (``<demo>-<name>``) and its heartbeat, priority lists, retry
    markers: all the demo's; another queue's keys stay."""
    demo = Settings(broker_url=redis_url, queue=demo_queue(), model_name="m1")
    client = redis.Redis.from_url(redis_url)
    try:
        with Client(demo) as producer:
            lanes = producer.queue_names()
        ours = [*lanes, f"_kombu.binding.{demo.queue}", f"_kombu.binding_permanent.{demo.queue}",
                f"bertstream:workers:{demo.family}:bertstream-1@h",
                f"bertstream:workers:{demo.queue}:bertstream-2@h",
                f"bertstream:retrying:{demo.family}:id-1"]
        theirs = ["bertstream.interactive", "_kombu.binding.bertstream",
                  "bertstream:workers:bertstream:bertstream-9@h",
                  "bertstream:workers:bertstream-m1:bertstream-8@h"]
        for key in ours + theirs:
            client.set(key, "x")
        assert remove_queue_keys(demo) == len(ours)
        assert sorted(k.decode() for k in client.scan_iter(match="*")) == sorted(theirs)
    finally:
        client.close()


def test_a_database_index_the_server_lacks_stops_the_demo_as_a_setting(
        redis_url: str, sqlite_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Redis answered, refusing the index: the demo said "start it with redis-server" and
    ran in memory, hiding the setting to fix."""
    url = past_the_last_database(redis_url)
    index = url.rsplit("/", 1)[1]
    lines: list[str] = []
    with pytest.raises(ConfigError, match=f"database index {index} is out of range"):
        run_demo(Settings(broker_url=url, database_url=sqlite_url, model=str(tiny_model_dir),
                          cache_dir=str(tmp_path)), repeat=1, echo=lines.append)
    assert lines == []
