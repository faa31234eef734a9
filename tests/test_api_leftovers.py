"""API server leftovers: where ``BrokerMisconfigured`` lives, ``/metrics`` telling a refused
broker URL from an outage, and ``serve`` holding its port from the check to uvicorn.

Real Redis (a database index past the server's last for a refused URL, a closed port for
an outage) and real ``bertstream serve`` processes.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import time

import httpx
import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import ApiMetrics
from contract.settings import Settings
from tests.redis_urls import past_the_last_database
from worker.process import free_port, settings_env


def test_broker_misconfigured_is_an_error_class_of_contract_errors() -> None:
    """It lives with the other error classes; ``contract.broker`` still exports it."""
    import contract.broker
    import contract.errors

    assert contract.errors.BrokerMisconfigured is contract.broker.BrokerMisconfigured
    assert contract.errors.BrokerMisconfigured.__module__ == "contract.errors"
    assert issubclass(contract.errors.BrokerMisconfigured, contract.errors.ConfigError)


def _scrape(broker_url: str) -> dict[str, list[float]]:
    """One scrape of the queue gauges on a real Redis client for ``broker_url``."""
    settings = Settings(broker_url=broker_url, redis_connect_timeout_s=2,
                        redis_socket_timeout_s=2)
    client = redis.Redis.from_url(broker_url, socket_connect_timeout=2, socket_timeout=2)
    metrics = ApiMetrics()
    metrics.watch(client, settings)
    try:
        text = generate_latest(metrics.registry).decode()
    finally:
        client.close()
    return {family.name: [s.value for s in family.samples]
            for family in text_string_to_metric_families(text)
            if family.name in ("bertstream_redis_up", "bertstream_broker_misconfigured")}


def test_metrics_tell_a_refused_broker_url_from_an_outage(redis_url: str) -> None:
    """A database index Redis lacks: Redis is not up for this server (the gauges cannot be
    read), and ``bertstream_broker_misconfigured`` says it is a setting; an unreachable
    Redis and a healthy one say 0 there."""
    assert _scrape(past_the_last_database(redis_url)) == {
        "bertstream_redis_up": [0.0], "bertstream_broker_misconfigured": [1.0]}
    assert _scrape(f"redis://127.0.0.1:{free_port()}/0") == {
        "bertstream_redis_up": [0.0], "bertstream_broker_misconfigured": [0.0]}
    assert _scrape(redis_url) == {
        "bertstream_redis_up": [1.0], "bertstream_broker_misconfigured": [0.0]}


def _held_by_someone(port: int) -> bool:
    """Whether another socket holds ``port`` on 127.0.0.1 (this one cannot bind it); when it
    does not, this socket is left listening there for a moment (the race's other process)."""
    taker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taker.bind(("127.0.0.1", port))
    except OSError as exc:
        taker.close()
        assert exc.errno == errno.EADDRINUSE, exc
        return True
    taker.listen()
    _held_by_someone.taker = taker  # type: ignore[attr-defined]
    return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_holds_its_port_from_the_check_on(redis_url: str, sqlite_url: str,
                                                workers: str) -> None:
    """Another process taking the port right after ``serve`` announces the API cannot: the
    port is bound before the announcement and handed to uvicorn, so there is no window in
    which uvicorn's own bind fails (its errno and exit 3)."""
    port = free_port()
    settings = Settings(broker_url=redis_url, database_url=sqlite_url)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import main; main()", "serve",
         "--port", str(port), "--workers", workers], env=settings_env(settings), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "bertstream API starting" in line:
                break
        else:
            pytest.fail(f"no start line: {seen}")
        held = _held_by_someone(port)
        if not held:
            _, rest = proc.communicate(timeout=60)
            _held_by_someone.taker.close()  # type: ignore[attr-defined]
            pytest.fail(f"the port was free after the announcement; serve exited "
                        f"{proc.returncode}: {rest[-500:]}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)  # reads and closes the pipes
