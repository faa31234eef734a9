"""The upper bounds of the settings, held against the real services that take the values.

A bound is only worth having if its largest value still works: Redis takes the
longest id TTL as an expiry, the socket layer the longest Redis timeouts, torch
the most threads.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import redis

from contract.broker import redis_client
from contract.constants import ACCEPTED_KEY_PREFIX
from contract.settings import MAX_API_ID_TTL_S, MAX_DURATION_S, MAX_TORCH_THREADS, Settings


def test_the_longest_id_ttl_is_an_expiry_redis_takes(redis_url: str, sqlite_url: str,
                                                     api_factory: Any) -> None:
    """10**17 s made every POST a 503 (Redis: "invalid expire time in 'set' command")."""
    longest = Settings(broker_url=redis_url, database_url=sqlite_url,
                       queue=f"bst-ttl-{uuid.uuid4().hex[:8]}", api_id_ttl_s=MAX_API_ID_TTL_S)
    api = api_factory(longest)
    with httpx.Client(base_url=api.url, timeout=10) as http:
        r = http.post("/v1/tasks", json={"text": "a remembered text", "id": "ttl-1"})
    assert r.status_code == 202, r.text
    client = redis.Redis.from_url(redis_url)
    try:
        ttl = client.ttl(f"{ACCEPTED_KEY_PREFIX}{longest.family}:ttl-1")
    finally:
        client.close()
    assert MAX_API_ID_TTL_S - 60 < ttl <= MAX_API_ID_TTL_S


def test_the_longest_redis_timeouts_connect(redis_url: str) -> None:
    """1e12 s was past time_t: OverflowError at the first connection."""
    client = redis_client(Settings(broker_url=redis_url, redis_socket_timeout_s=MAX_DURATION_S,
                                   redis_connect_timeout_s=MAX_DURATION_S,
                                   redis_health_check_s=MAX_DURATION_S))
    assert client is not None
    try:
        assert client.ping()
    finally:
        client.close()


def test_torch_takes_the_most_threads() -> None:
    """10**10 overflowed torch.set_num_threads when the model loaded."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(MAX_TORCH_THREADS)
        assert torch.get_num_threads() == MAX_TORCH_THREADS
    finally:
        torch.set_num_threads(before)
