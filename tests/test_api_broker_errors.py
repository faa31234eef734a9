"""The API's broker at start and when Redis refuses a command.

``memory://`` reaches no worker and holds no claims: ``bertstream serve`` refuses it in one
line (exit 2) instead of a traceback from the server process. A Redis that answers with
an error is not an outage: a full one (OOM) is a 503 that says so, any other refusal an
internal error (500, its reply logged), never "cannot reach Redis".
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.app import create_app
from api.errors import ApiError
from api.submit import Submitter
from contract.constants import ACCEPTED_KEY_PREFIX
from contract.errors import ConfigError
from contract.messages import make_item
from contract.settings import Settings
from producer.client import Client
from worker.process import free_port, settings_env


def test_serve_refuses_the_memory_broker_in_one_line(tmp_path: Path) -> None:
    settings = Settings(broker_url="memory://", database_url=f"sqlite:///{tmp_path}/r.db")
    run = subprocess.run(
        [sys.executable, "-c", "from producer.cli import main; main()", "serve",
         "--port", str(free_port())],
        env=settings_env(settings), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "memory://" in lines[0] and "Redis" in lines[0]


def test_the_app_refuses_the_memory_broker(tmp_path: Path) -> None:
    """``uvicorn --factory api.app:app_from_env`` and embedding callers: a clear error."""
    settings = Settings(broker_url="memory://", database_url=f"sqlite:///{tmp_path}/r.db")
    with pytest.raises(ConfigError, match="needs a Redis broker"):
        create_app(settings)


def test_a_full_redis_is_a_503_that_says_so(redis_server: Any, tmp_path: Path,
                                            api_factory: Any) -> None:
    settings = Settings(broker_url=redis_server.url,
                        database_url=f"sqlite:///{tmp_path}/r.db", queue="bst-oom")
    api = api_factory(settings)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        with httpx.Client(base_url=api.url, timeout=30) as http:
            for body in ({"text": "hello", "id": "a"}, {"items": ["x", "y"]}):
                full = http.post("/v1/tasks", json=body)
                assert full.status_code == 503, full.text
                error = full.json()["error"]
                assert error["code"] == "broker_full", error
                assert "out of memory" in error["message"], error
                assert "cannot be reached" not in error["message"]
                assert int(full.headers["Retry-After"]) > 0
            admin.config_set("maxmemory", 0)
            again = http.post("/v1/tasks", json={"text": "hello", "id": "a"})
            assert again.status_code == 202 and again.json()["duplicate"] is False, again.text
    finally:
        admin.close()
    assert "OOM" in api.log() or "maxmemory" in api.log()


def test_a_redis_refusal_is_an_internal_error_with_its_reply_logged(
        settings: Settings, api_factory: Any) -> None:
    """A key of another type where the API keeps a claim (a shared Redis): the claim
    script fails with WRONGTYPE. Redis is up: a 500, the reply in the server's log."""
    api = api_factory(settings)
    foreign = redis.Redis.from_url(settings.broker_url)
    try:
        foreign.lpush(f"{ACCEPTED_KEY_PREFIX}{settings.queue}:clash", "not a hash")
    finally:
        foreign.close()
    with httpx.Client(base_url=api.url, timeout=30) as http:
        refused = http.post("/v1/tasks", json={"text": "hello", "id": "clash"})
        assert refused.status_code == 500, refused.text
        assert refused.json()["error"]["code"] == "internal_error"
        assert "cannot be reached" not in refused.text
        assert http.post("/v1/tasks", json={"text": "hello", "id": "fine"}).status_code == 202
    assert "WRONGTYPE" in api.log()


def test_an_invalid_expiry_is_an_internal_error(redis_url: str, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Settings built directly skip validation: Redis refuses the claim's expiry
    ("invalid expire time"), which is no outage."""
    settings = Settings(broker_url=redis_url, database_url=f"sqlite:///{tmp_path}/r.db",
                        queue=f"bst-{uuid.uuid4().hex[:8]}", api_id_ttl_s=2**62)
    with Client(settings) as client:
        submitter = Submitter(settings, client)
        try:
            with pytest.raises(ApiError) as refused:
                submitter.submit([make_item("hello", settings)], lane="interactive")
        finally:
            submitter.close()
    assert refused.value.status == 500 and refused.value.code == "internal_error"
    assert "invalid expire time" in caplog.text
