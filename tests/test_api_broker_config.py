"""A broker URL Redis refuses (a database index past its ``databases``, credentials it does
not take) is a setting to fix, in the HTTP API as in the CLI and the worker.

The API answered it as an outage (503 ``broker_unavailable``, "retry later"), as a bare
500 or a broken connection; ``bertstream serve`` started and announced itself on it; and
a publish on it went through kombu's retries (seconds) before failing. Now: a 503
``broker_misconfigured`` without Retry-After naming the setting (never a password or a
host), ``/readyz`` saying "misconfigured", ``serve`` refusing at start (exit 2, one
line), and the publish failing at once. An unreachable Redis stays an outage: ``serve``
starts on it (Redis may come up later) and says so.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.submit import Submitter
from contract.constants import ACCEPTED_KEY_PREFIX
from contract.errors import BrokerUnavailable, ConfigError
from contract.messages import make_item
from contract.settings import Settings
from producer.client import Client
from worker.process import free_port, settings_env

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-Pw"


def _past_the_last_database(redis_url: str) -> tuple[str, int]:
    """The test Redis's URL with a database index one past its last, and that index."""
    client = redis.Redis.from_url(redis_url)
    try:
        databases = int(client.config_get("databases")["databases"])
    finally:
        client.close()
    parts = urlsplit(redis_url)
    return f"{parts.scheme}://{parts.netloc}/{databases}", databases


def _misconfigured(response: httpx.Response, says: str) -> None:
    """A 503 ``broker_misconfigured`` naming the setting and ``says``: no Retry-After (no
    wait mends it), no host, no password, nothing of an outage."""
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "broker_misconfigured", error
    assert "BERTSTREAM_BROKER_URL" in error["message"] and says in error["message"], error
    assert "Retry-After" not in response.headers
    for absent in ("127.0.0.1", SECRET, "cannot be reached", "retry later"):
        assert absent not in error["message"], error


@pytest.fixture
def out_of_range(redis_url: str, tmp_path: Path) -> tuple[Settings, int]:
    url, index = _past_the_last_database(redis_url)
    return Settings(broker_url=url, database_url=f"sqlite:///{tmp_path}/r.db",
                    queue=f"bst-{uuid.uuid4().hex[:8]}"), index


def test_a_database_index_the_server_lacks_is_a_503_naming_the_setting(
        out_of_range: tuple[Settings, int], caplog: pytest.LogCaptureFixture) -> None:
    """Every route that reads Redis: single and bulk submits (the queue bound, the claims),
    a status read, and ``model=default`` (the workers' heartbeats), each at once."""
    settings, index = out_of_range
    says = f"database index {index} is out of range"
    caplog.set_level(logging.WARNING)
    with TestClient(create_app(settings), raise_server_exceptions=False) as http:
        for method, path, body in (("POST", "/v1/tasks", {"text": "hello"}),
                                   ("POST", "/v1/tasks", {"text": "hello", "id": "a"}),
                                   ("POST", "/v1/tasks", {"items": ["x", {"text": "y",
                                                                          "id": "b"}]}),
                                   ("GET", "/v1/tasks/a", None),
                                   ("GET", "/v1/tasks/a?model=default", None)):
            t0 = time.monotonic()
            answer = http.request(method, path, json=body)
            assert time.monotonic() - t0 < 2, (path, body)
            _misconfigured(answer, says)
        ready = http.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["redis"].startswith("misconfigured: BERTSTREAM_BROKER_URL"), checks
    assert says in checks["redis"] and "127.0.0.1" not in checks["redis"], checks
    assert checks["workers"] == "unknown: Redis refuses the broker URL", checks
    # the server's log names the URL, for its operator
    assert f"BERTSTREAM_BROKER_URL={settings.broker_url!r}: {says}" in caplog.text


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of the test's own (no password yet): its port."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(tmp_path), "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    client.close()
    yield port
    proc.terminate()
    proc.wait(timeout=20)


def test_a_password_redis_stops_taking_is_a_503_and_never_shown(
        private_redis: int, tmp_path: Path, api_factory: Any) -> None:
    """A real server whose Redis is given a password (and its clients dropped) while it
    runs: submits, status reads and /readyz say the credentials are refused, never the
    password; once Redis takes the credentials again, submits are accepted again."""
    settings = Settings(broker_url=f"redis://:{SECRET}@127.0.0.1:{private_redis}/0",
                        database_url=f"sqlite:///{tmp_path}/r.db", queue="bst-auth")
    api = api_factory(settings)
    admin = redis.Redis(port=private_redis)
    try:
        with httpx.Client(base_url=api.url, timeout=30) as http:
            assert http.post("/v1/tasks", json={"text": "hi", "id": "a"}).status_code == 202
            admin.config_set("requirepass", "another-one")
            admin.client_kill_filter(_type="normal", skipme=True)
            for method, path, body in (("POST", "/v1/tasks", {"text": "hello", "id": "b"}),
                                       ("POST", "/v1/tasks", {"items": ["x", "y"]}),
                                       ("GET", "/v1/tasks/zz", None)):
                _misconfigured(http.request(method, path, json=body), "refused the credentials")
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["redis"].startswith(
                "misconfigured: BERTSTREAM_BROKER_URL: the Redis server there refused the "
                "credentials"), ready.text
            assert SECRET not in ready.text
            admin.config_set("requirepass", "")
            again = http.post("/v1/tasks", json={"text": "hello", "id": "b"})
            assert again.status_code == 202 and again.json()["duplicate"] is False, again.text
    finally:
        admin.close()
    log = api.log()
    assert "refused the credentials" in log and SECRET not in log, log


def _serve(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from producer.cli import main; main()", "serve",
         "--port", str(free_port())],
        env=settings_env(settings), capture_output=True, text=True, timeout=60, cwd=ROOT)


def _one_error_line(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 2, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    return lines[0]


def test_serve_refuses_a_database_index_the_server_lacks(
        out_of_range: tuple[Settings, int]) -> None:
    settings, index = out_of_range
    assert _one_error_line(_serve(settings)) == (
        f"error: BERTSTREAM_BROKER_URL={settings.broker_url!r}: database index {index} is out "
        "of range for the Redis server there (it has fewer databases: its `databases` "
        "setting)")


def test_serve_refuses_credentials_redis_does_not_take(private_redis: int,
                                                        tmp_path: Path) -> None:
    admin = redis.Redis(port=private_redis)
    try:
        admin.config_set("requirepass", "the-right-one")
    finally:
        admin.close()
    url = f"redis://:{SECRET}@127.0.0.1:{private_redis}/0"
    line = _one_error_line(_serve(Settings(broker_url=url,
                                           database_url=f"sqlite:///{tmp_path}/r.db")))
    assert line.startswith(f"error: BERTSTREAM_BROKER_URL='redis://:***@127.0.0.1:"
                           f"{private_redis}/0': the Redis server there refused the "
                           "credentials"), line
    assert SECRET not in line


def test_serve_starts_on_an_unreachable_redis_and_says_so(tmp_path: Path,
                                                          api_factory: Any) -> None:
    """Redis may come up after the API (a restarted stack): the API starts, warns, answers
    submits with the outage's 503 and /readyz with not ready."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    api = api_factory(Settings(broker_url=url, database_url=f"sqlite:///{tmp_path}/r.db"))
    with httpx.Client(base_url=api.url, timeout=60) as http:
        down = http.post("/v1/tasks", json={"text": "hello"})
        assert down.status_code == 503 and down.json()["error"]["code"] == "broker_unavailable"
        assert int(down.headers["Retry-After"]) > 0
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"].startswith("unreachable"), ready.text
    assert f"warning: cannot reach Redis at {url}" in api.log(), api.log()


def test_a_publish_redis_refuses_for_the_url_fails_at_once(redis_url: str,
                                                           tmp_path: Path) -> None:
    """No publish retries for a config error (they took seconds with the default
    ``publish_retries``); the API's submitter keeps no claim for what it did not queue."""
    url, index = _past_the_last_database(redis_url)
    db = f"sqlite:///{tmp_path}/r.db"
    bad = Settings(broker_url=url, database_url=db, queue="bst-pub")
    assert bad.publish_retries > 0
    with Client(bad) as client:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"database index {index} is out of range"):
            client.submit("hello")
        assert time.monotonic() - t0 < 1
    # claims on a database the server has, publishes to one it lacks
    good = Settings(broker_url=redis_url, database_url=db, queue="bst-pub")
    with Client(bad) as client:
        submitter = Submitter(good, client)
        try:
            t0 = time.monotonic()
            with pytest.raises(ConfigError, match="out of range"):
                submitter.submit([make_item("hello", good, id="kept?")], lane="interactive",
                                 caller_ids=frozenset({"kept?"}))
            assert time.monotonic() - t0 < 1
            assert submitter.redis.exists(f"{ACCEPTED_KEY_PREFIX}bst-pub:kept?") == 0
        finally:
            submitter.close()


def test_an_unreachable_redis_is_still_retried(sqlite_url: str) -> None:
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0",
                        database_url=sqlite_url, publish_retries=2, publish_retry_max_s=0.2)
    with Client(settings) as client:
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="start it with `redis-server`"):
            client.submit("hello")
        assert time.monotonic() - t0 >= 0.2  # the pauses between the tries
