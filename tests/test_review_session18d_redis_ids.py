"""``stream --from-redis-stream``: a caller id repeated in the stream, and Redis
restarted under a running reader.

The first test needs the producer/cli.py patch proposed with it (the Redis
Stream source remembers its recent caller ids, as a pipe does).
"""

from __future__ import annotations

import threading

import redis
from click.testing import Result

from contract.settings import Settings
from tests.conftest import RedisServer
from tests.producer_helpers import invoke, lane_messages
from tests.test_redis_stream import _poll


def test_a_caller_id_repeated_in_a_redis_stream_is_refused_not_silently_dropped(
        bsettings: Settings, r: redis.Redis, redis_url: str) -> None:
    """Two entries naming one post id with different texts (an edited post sent again)
    went out together as two tasks of one id, reported accepted both: the worker
    stored the first and the second's text was never analysed, with nothing said.
    The second is refused as a repeated id, as in a file or a pipe, and acked."""
    key = f"{bsettings.queue}:posts"
    r.xadd(key, {"text": "the first text", "post": "p-1"})
    second = r.xadd(key, {"text": "an edited text", "post": "p-1"}).decode()
    r.xadd(key, {"text": "another post", "post": "p-2"})
    result = invoke(["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "c1",
                     "--id-field", "post", "--idle-exit", "0.3", "--no-progress"], bsettings)
    assert result.exit_code == 5, result.output
    assert "accepted 2, rejected 1" in result.stdout
    assert f"entry #2 (id {second}, task id p-1): duplicate id 'p-1' (first at 1)" in result.stdout
    items = [it for m in lane_messages(redis_url, f"{bsettings.queue}.bulk") for it in m["items"]]
    assert [(it["id"], it["text"]) for it in items] == [("p-1", "the first text"),
                                                        ("p-2", "another post")]
    assert int(r.xpending(key, "g")["pending"]) == 0


def test_a_redis_stream_reader_rides_out_a_redis_restart(
        redis_server: RedisServer, sqlite_url: str) -> None:
    """Redis restarted under a running ``--from-redis-stream`` reader (an upgrade, a
    failover): its blocked read lost the connection and the reader exited 3 at once,
    while a file stream rides the same restart out through the publish retries. The
    read is tried again as a publish is: the entries added before and after the
    restart are all sent, once each, and acked."""
    s = Settings(broker_url=redis_server.url, database_url=sqlite_url, queue="bst-18d-rs")
    r = redis.Redis.from_url(redis_server.url)
    out: dict[str, Result] = {}
    try:
        for i in range(3):
            r.xadd("posts", {"text": f"before {i}"})
        reader = threading.Thread(target=lambda: out.setdefault("r", invoke(
            ["stream", "--from-redis-stream", "posts", "--group", "g", "--consumer", "c1",
             "--idle-exit", "5", "--no-progress"], s)))
        reader.start()
        _poll(lambda: r.llen("bst-18d-rs.bulk") >= 1, 30, "the first entries sent")
        redis_server.stop()
        redis_server.start()
        for i in range(2):
            r.xadd("posts", {"text": f"after {i}"})
        reader.join(timeout=60)
        assert not reader.is_alive()
        result = out["r"]
        assert result.exit_code == 0, result.output
        assert "accepted 5, rejected 0" in result.stdout
        texts = [it["text"] for m in lane_messages(redis_server.url, "bst-18d-rs.bulk")
                 for it in m["items"]]
        assert sorted(texts) == ["after 0", "after 1", "before 0", "before 1", "before 2"]
        assert int(r.xpending("posts", "g")["pending"]) == 0
    finally:
        r.close()
