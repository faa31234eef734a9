"""``bertstream_api_message_items``: the items of every broker message the API publishes,
coalesced single submits and bulks alike, checked against the messages really queued in
Redis."""

from __future__ import annotations

import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contract.constants import LANE_BULK, LANE_INTERACTIVE
from contract.settings import Settings
from producer.client import Client


@pytest.fixture
def lone_settings(redis_url: str, sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=sqlite_url,
                    queue=f"bst-msg-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                    bulk_chunk_size=2, api_coalesce_ms=500)


def _histogram(url: str) -> defaultdict[tuple[str, str], float]:
    """(sample suffix, lane) -> value, plus ("le=N", lane) for the buckets (0 when absent)."""
    out: defaultdict[tuple[str, str], float] = defaultdict(float)
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name != "bertstream_api_message_items":
            continue
        for s in family.samples:
            lane = s.labels.get("lane", "")
            if s.name.endswith("_bucket"):
                out[(f"le={s.labels['le']}", lane)] = s.value
            elif s.name.endswith(("_count", "_sum")):
                out[(s.name.rsplit("_", 1)[1], lane)] = s.value
    return out


def test_items_per_published_message_are_recorded(lone_settings: Settings,
                                                  api_factory: Any) -> None:
    api = api_factory(lone_settings.replace(api_models="sentiment-v2"))  # no worker serves it
    default = Client(lone_settings)
    named = Client(lone_settings.replace(model_name="sentiment-v2"))

    def queued(lane: str) -> int:
        return default.queue_length(lane) + named.queue_length(lane)

    try:
        with httpx.Client(base_url=api.url, timeout=10) as http:
            # A bulk of 5 in messages of bulk_chunk_size (2): 2 + 2 + 1.
            r = http.post("/v1/tasks", json={"items": [{"text": f"t{i}", "id": f"b{i}"}
                                                       for i in range(5)]})
            assert r.status_code == 202 and r.json()["accepted"] == 5, r.text
            # A named model's bulk goes through its own lane, and counts too.
            r = http.post("/v1/tasks", json={"items": ["n1"], "model": "sentiment-v2"})
            assert r.status_code == 202, r.text
            # Three concurrent single submits, coalesced in messages of at most 2.
            with ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(lambda i: http.post(
                    "/v1/tasks", json={"text": f"single {i}", "id": f"s{i}"}), range(3)))
            assert [a.status_code for a in answers] == [202] * 3

            got = _histogram(api.url)
            assert got[("sum", LANE_BULK)] == 6 and got[("sum", LANE_INTERACTIVE)] == 3, got
            # One observation per message really queued.
            assert got[("count", LANE_BULK)] == queued(LANE_BULK) == 4, got
            assert got[("count", LANE_INTERACTIVE)] == queued(LANE_INTERACTIVE), got
            assert 2 <= got[("count", LANE_INTERACTIVE)] <= 3, got
            assert got[("le=1.0", LANE_BULK)] == 2 and got[("le=2.0", LANE_BULK)] == 4, got

            # Duplicates publish nothing, so nothing is recorded.
            r = http.post("/v1/tasks", json={"items": [{"text": f"t{i}", "id": f"b{i}"}
                                                       for i in range(5)]})
            assert r.status_code == 202 and r.json()["duplicates"] == 5, r.text
            assert _histogram(api.url)[("count", LANE_BULK)] == 4
    finally:
        default.close()
        named.close()
