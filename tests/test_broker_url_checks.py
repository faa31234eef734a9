"""A Redis broker URL is checked whole at start, and Redis refusing it is a setting to fix.

A database index that is not a number (``redis://h:6379/abc``) passed the scheme check
and failed in kombu with a traceback (exit 1) in `submit`, `stream`, `worker` and
``Client.submit``; redis-py quietly used database 0 for it. A database index the
server does not have (``/99`` on a Redis with fewer databases) read as "cannot reach
Redis ... start it with redis-server" (exit 3) while Redis was running. And kombu has
no ``unix://`` transport: a socket URL, accepted at start, failed at the first publish.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.constants import STATUS_DONE
from contract.errors import BrokerUnavailable, ConfigError, exit_code
from contract.settings import Settings
from producer.client import Client
from tests.redis_urls import past_the_last_database
from worker.process import die_with_parent, settings_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("url", "says"), [
    ("redis://localhost:6379/abc", "the database index in the path must be a whole number "
                                   "from 0 (got 'abc')"),
    ("redis://localhost:6379/-1", "(got '-1')"),
    ("redis://localhost:6379/0/", "(got '0/')"),
    ("rediss://localhost/2147483648", "(got '2147483648')"),
    ("redis://h:99999/0", "port '99999' is not a TCP port (1 to 65535)"),
    ("redis://h:0/0", "port 0 is not a TCP port"),
    ("redis://:secretpw@h:notaport/0", "port 'notaport' is not a TCP port"),
    ("redis://[::1/0", "Invalid IPv6 URL"),
    ("redis://h/0?db=3", "give the database index in the path"),
    ("redis://h/0?foo=1", "query parameter 'foo' is not one Celery's Redis transport takes"),
    ("unix:///run/redis.sock?db=abc", "the database index in ?db= must be a whole number"),
    ("unix:///run/redis.sock?db=-2", "(got '-2')"),
    ("unix:///run/redis.sock?db=1&socket_timeout=x", "unix:// takes the database index as "
                                                    "?db=N and no other parameter"),
    ("unix://", "a unix:// URL names the socket's path"),
])
def test_a_redis_url_that_does_not_parse_is_refused_in_one_line(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"BERTSTREAM_BROKER_URL": url})
    message = str(info.value)
    assert message.startswith("BERTSTREAM_BROKER_URL='") and " cannot be parsed: " in message
    assert says in message and "\n" not in message and "secretpw" not in message
    with pytest.raises(ConfigError):
        Settings().replace(broker_url=url)


@pytest.mark.parametrize("url", ["redis://h:6379/0", "redis://h:6379/", "redis://h", "rediss://h/15",
                                 "redis://:pw@h:1/3", "redis://[::1]:6379/2",
                                 "rediss://h/1?ssl_cert_reqs=none", "unix:///tmp/r.sock",
                                 "unix:///tmp/r.sock?db=3", "unix://:pw@/tmp/r.sock?db=0"])
def test_redis_urls_both_clients_read_are_accepted(url: str) -> None:
    assert Settings.from_env({"BERTSTREAM_BROKER_URL": url}).broker_url == url


def test_a_long_url_is_cut_in_the_message() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(broker_url="redis://h/" + "9" * 5_000).validate()
    assert len(str(info.value)) < 300


def test_a_database_url_port_past_65535_is_a_setting_to_fix() -> None:
    """psycopg refused it when it connected, read as the database being unreachable."""
    with pytest.raises(ConfigError, match=r"BERTSTREAM_DATABASE_URL=postgresql://u:\*\*\*@h:"
                                          r"99999/db: port '99999' is not a TCP port"):
        Settings(database_url="postgresql://u:pw@h:99999/db").validate()
    for fine in ("postgresql://u@h:5432/db", "postgresql+psycopg://u@[::1]:5432/db",
                 "postgresql://u@h1:5432,h2:5433/db", "sqlite:///x.db"):
        Settings(database_url=fine).validate()


def _cli(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env=env, input=stdin, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def _one_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip() and "texts/s" not in line
             and not line.startswith(("\r", "0.00"))]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("command", [["submit", "hi"], ["stream", "-", "--no-progress"],
                                     ["worker", "--device", "cpu"]])
def test_a_bad_database_index_exits_2_in_every_command(command: list[str], sqlite_url: str,
                                                        tmp_path: Path) -> None:
    env = settings_env(Settings(database_url=sqlite_url, model="null",
                                cache_dir=str(tmp_path)))
    out = _cli([*command, "--broker-url", "redis://localhost:6379/abc"], env, stdin="hi\n")
    assert out.returncode == 2, out.stderr[-3000:]
    assert _one_line(out) == ("error: --broker-url='redis://localhost:6379/abc' cannot "
                              "be parsed: the database index in the path must be a whole number "
                              "from 0 (got 'abc')")


def test_client_submit_refuses_a_bad_database_index(sqlite_url: str) -> None:
    with pytest.raises(ConfigError, match="cannot be parsed"):
        with Client(Settings(database_url=sqlite_url,
                             broker_url="redis://localhost:6379/abc")) as client:
            client.submit("hi")


def test_a_database_index_the_server_lacks_is_a_setting_not_an_outage(
        redis_url: str, sqlite_url: str) -> None:
    url = past_the_last_database(redis_url)
    index = url.rsplit("/", 1)[1]
    settings = Settings(broker_url=url, database_url=sqlite_url, publish_retries=0)
    with pytest.raises(ConfigError) as info, Client(settings) as client:
        client.submit("hi")
    message = str(info.value)
    assert message == (f"BERTSTREAM_BROKER_URL={url!r}: database index {index} is out of range "
                       "for the Redis server there (it has fewer databases: its `databases` "
                       "setting)")
    assert exit_code(info.value) == 2 and "redis-server" not in message
    with pytest.raises(ConfigError, match="out of range"), Client(settings) as client:
        client.queue_length()


@pytest.mark.parametrize("command", [["submit", "hi"], ["worker", "--device", "cpu"]])
def test_a_database_index_the_server_lacks_exits_2(command: list[str], redis_url: str,
                                                   sqlite_url: str, tmp_path: Path) -> None:
    """The worker said nothing of it and retried for ever; submit said to start Redis."""
    url = past_the_last_database(redis_url)
    env = settings_env(Settings(database_url=sqlite_url, model="null", publish_retries=0,
                                cache_dir=str(tmp_path)))
    out = _cli([*command, "--broker-url", url], env)
    assert out.returncode == 2, out.stderr[-3000:]
    line = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert line == [f"error: --broker-url={url!r}: database index {url.rsplit('/', 1)[1]}"
                    " is out of range for the Redis server there (it has fewer databases: its "
                    "`databases` setting)"], out.stderr[-3000:]


def test_a_redis_that_is_down_is_still_an_outage(sqlite_url: str) -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0", database_url=sqlite_url,
                        publish_retries=0)
    with pytest.raises(BrokerUnavailable, match="start it with `redis-server`"), \
            Client(settings) as client:
        client.submit("hi")


@pytest.fixture
def unix_redis(tmp_path: Path) -> Any:
    """A redis-server of the test's own on a unix socket (no TCP port)."""
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock),
                             "--dir", str(tmp_path), "--save", "", "--databases", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent())
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
        time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait(timeout=20)


def test_a_unix_socket_broker_carries_tasks_to_a_worker(unix_redis: Path, sqlite_url: str,
                                                        tmp_path: Path, worker_factory: Any) -> None:
    """kombu has no unix:// transport: the first publish failed (No such transport: unix)."""
    url = f"unix://{unix_redis}?db=2"
    settings = Settings(broker_url=url, database_url=sqlite_url, model="null",
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path),
                        max_wait_ms=20)
    worker_factory(settings)
    with Client(settings) as client:
        task_id = client.submit("over a socket")
        rows = client.wait([task_id], timeout=60)
    assert rows[task_id].status == STATUS_DONE
    direct = redis.Redis(unix_socket_path=str(unix_redis), db=2)
    try:  # the queue lives in database 2, as ?db=2 says, for kombu and redis-py alike
        assert direct.exists(f"_kombu.binding.{settings.queue}")
    finally:
        direct.close()
