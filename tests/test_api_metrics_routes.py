"""The API's request counter names the route of a request refused on its headers.

``BodyLimit`` answers a declared-oversized (413) or compressed (415) body before the
router runs, so the route was unknown and the request counted as ``unmatched``, the
label of paths that match no route: an operator alerting on 413s per route saw none.
"""
from __future__ import annotations

import re
from typing import Any

import httpx

from contract.settings import Settings


def _count(metrics: str, route: str, status: str) -> float:
    pattern = (r'^bertstream_api_requests_total\{route="' + re.escape(route)
               + r'",status="' + status + r'"\} (\S+)$')
    found = re.search(pattern, metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_header_refusals_count_under_their_route(settings: Settings, api_factory: Any) -> None:
    api = api_factory(settings.replace(api_max_body_bytes=1_000))
    with httpx.Client(base_url=api.url, timeout=30) as http:
        big = http.post("/v1/tasks", content=b'{"text": "' + b"x" * 2_000 + b'"}',
                        headers={"Content-Type": "application/json"})
        assert big.status_code == 413, big.text
        packed = http.post("/v1/tasks", content=b"\x1f\x8b", headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert packed.status_code == 415, packed.text
        status = http.request("GET", "/v1/tasks/some-id", content=b"x" * 2_000)
        assert status.status_code == 413, status.text
        assert http.get("/no/such/route").status_code == 404
        metrics = http.get("/metrics").text
    assert _count(metrics, "/v1/tasks", "413") == 1, metrics
    assert _count(metrics, "/v1/tasks", "415") == 1, metrics
    assert _count(metrics, "/v1/tasks/{task_id:path}", "413") == 1, metrics
    # A path no route serves keeps the one bounded label.
    assert _count(metrics, "unmatched", "404") == 1, metrics
    assert _count(metrics, "unmatched", "413") == 0 and _count(metrics, "unmatched", "415") == 0
