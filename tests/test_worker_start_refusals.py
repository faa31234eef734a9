"""A worker started with settings it cannot run with says so in one line and exits 2.

Each case used to start (or load the model) and then die with a traceback, exit 1:
redis-py refusing the broker URL in the heartbeat, the socket layer overflowing
on a socket timeout past time_t, torch overflowing on a thread count.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contract.errors import ConfigError
from contract.settings import Settings
from worker.heartbeat import Heartbeat
from worker.process import settings_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("env", "says"), [
    ({"BERTSTREAM_BROKER_URL": "memory://"},
     "error: the worker needs a Redis broker: BERTSTREAM_BROKER_URL='memory://' reaches no "
     "other process (only `bertstream demo` runs on it, its worker in the same process)"),
    ({"BERTSTREAM_BROKER_URL": ""},
     "error: BERTSTREAM_BROKER_URL='' is not a Redis URL"),
    ({"BERTSTREAM_BROKER_URL": "redis://127.0.0.1:notaport/0"},
     "error: BERTSTREAM_BROKER_URL='redis://127.0.0.1:notaport/0' cannot be parsed"),
    ({"BERTSTREAM_REDIS_SOCKET_TIMEOUT_S": "1e12"},
     "error: BERTSTREAM_REDIS_SOCKET_TIMEOUT_S must be > 0 and at most 86400 seconds"),
    ({"BERTSTREAM_TORCH_THREADS": "10000000000"},
     "error: BERTSTREAM_TORCH_THREADS must be >= 0 and at most 1024"),
], ids=["memory", "empty", "bad-port", "socket-timeout", "torch-threads"])
def test_a_worker_refuses_settings_it_cannot_run_with(redis_url: str, sqlite_url: str,
                                                      tiny_model_dir: Path, env: dict[str, str],
                                                      says: str) -> None:
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        model=str(tiny_model_dir), torch_threads=1)
    out = subprocess.run([sys.executable, "-m", "worker", "--device", "cpu"],
                         env={**settings_env(settings), "HF_HUB_OFFLINE": "1", **env},
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-3000:]
    [line] = [line for line in out.stderr.splitlines() if line.strip()]
    assert line.startswith(says), line


def test_the_heartbeat_uses_the_broker_settings(redis_url: str) -> None:
    """Its Redis client has the configured timeouts (it had a fixed 5 s), like every other."""
    settings = Settings(broker_url=redis_url, redis_socket_timeout_s=7.5,
                        redis_connect_timeout_s=2.5, redis_health_check_s=11)
    beat = Heartbeat(settings, "celery@h4", {})
    try:
        kwargs = beat.client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"],
                kwargs["health_check_interval"]) == (7.5, 2.5, 11)
    finally:
        beat.client.close()


def test_a_heartbeat_needs_a_redis_broker() -> None:
    with pytest.raises(ConfigError, match="heartbeat needs a Redis broker"):
        Heartbeat(Settings(broker_url="memory://"), "celery@h4", {})
