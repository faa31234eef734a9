"""A Redis Stream entry the reader refuses names its task id in ``--ids-out``: the entry
id, or the ``--id-field`` value when the entry has one; its entry id stays in ``entry``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from contract.settings import Settings
from tests.producer_helpers import broker_settings, invoke


@pytest.fixture
def bsettings(redis_url: str, sqlite_url: str) -> Settings:
    return broker_settings(redis_url, sqlite_url)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.mark.parametrize("id_field", [None, "post"])
def test_a_refused_entry_names_its_task_id(bsettings: Settings, r: redis.Redis,
                                           tmp_path: Path, id_field: str | None) -> None:
    key = f"{bsettings.queue}:posts"
    nofield = r.xadd(key, {"body": "no text field", "post": "p1"}).decode()
    badmeta = r.xadd(key, {"text": "t", "meta": "{oops"}).decode()
    ids_out = tmp_path / "ids.jsonl"
    args = ["stream", "--from-redis-stream", key, "--group", "g", "--consumer", "c1",
            "--idle-exit", "0.3", "--no-progress", "--ids-out", str(ids_out)]
    result = invoke(args + (["--id-field", id_field] if id_field else []), bsettings)
    assert result.exit_code == 5, result.output
    got = {x["entry"]: x for x in map(json.loads, ids_out.read_text().splitlines())}
    assert got[nofield]["id"] == ("p1" if id_field else nofield)
    assert got[badmeta]["id"] == badmeta  # no id field: the entry id is the task id
    assert "missing 'text'" in str(got[nofield]["error"])
    assert "not valid JSON" in str(got[badmeta]["error"])
    if id_field:  # the summary names a task id that is not the entry id
        assert f"entry #1 (id {nofield}, task id p1): missing 'text'" in result.stdout
