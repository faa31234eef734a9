"""``stream --from-redis-stream``: an entry Redis hands out again is sent again.

A Redis that comes back from a restart or a failover without its last writes (the
default ``appendfsync everysec``, an RDB snapshot, a lagging replica) has the group's
read position from before: the entries read since are handed out again, and the
broker queue lost the tasks sent for them. The recent caller ids refused each one as
a ``duplicate id`` of itself and acked it: the texts were never analysed. An entry
whose id (the entry id, or its ``--id-field``) comes again under the same entry id is
the same entry: it is sent again (one row, the store's upsert), not refused.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import redis
from click.testing import Result

from contract.settings import Settings
from tests.conftest import RedisServer
from tests.producer_helpers import invoke, lane_messages
from tests.test_redis_stream import _poll


@pytest.mark.parametrize("id_field", [None, "post"])
def test_entries_handed_out_again_after_a_redis_lost_its_last_writes_are_sent_again(
        redis_server: RedisServer, sqlite_url: str, tmp_path: Path, id_field: str | None) -> None:
    s = Settings(broker_url=redis_server.url, database_url=sqlite_url, queue="bst-18r2-rd")
    r = redis.Redis.from_url(redis_server.url)
    out: dict[str, Result] = {}
    try:
        for i in range(3):
            r.xadd("posts", {"text": f"text {i}", "post": f"p-{i}"})
        r.xgroup_create("posts", "g", id="0")
        before = tmp_path / "before"  # what the disk (a replica) holds: nothing read yet
        shutil.copytree(redis_server.workdir, before)
        args = ["stream", "--from-redis-stream", "posts", "--group", "g", "--consumer", "c1",
                "--idle-exit", "4", "--no-progress"]
        args += ["--id-field", id_field] if id_field else []
        reader = threading.Thread(target=lambda: out.setdefault("r", invoke(args, s)))
        reader.start()
        _poll(lambda: r.llen("bst-18r2-rd.bulk") >= 1, 30, "the entries sent")
        redis_server.stop()
        shutil.rmtree(redis_server.workdir)
        shutil.copytree(before, redis_server.workdir)
        redis_server.start()
        reader.join(timeout=60)
        assert not reader.is_alive()
        result = out["r"]
        assert result.exit_code == 0, result.output
        assert "duplicate id" not in result.stdout
        assert "accepted 6, rejected 0" in result.stdout
        texts = [it["text"] for m in lane_messages(redis_server.url, "bst-18r2-rd.bulk")
                 for it in m["items"]]
        assert sorted(texts) == ["text 0", "text 1", "text 2"]
        assert int(r.xpending("posts", "g")["pending"]) == 0
    finally:
        r.close()
