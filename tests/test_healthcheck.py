"""``python -m worker.healthcheck``, the containers' health check, against the real Redis."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from contract.settings import Settings
from tests.polling import until
from worker.healthcheck import check, main
from worker.heartbeat import Heartbeat


@pytest.fixture
def hc_settings(redis_url: str) -> Settings:
    return Settings(broker_url=redis_url, queue=f"bst-hc-{uuid.uuid4().hex[:8]}")


def test_healthy_only_while_a_worker_of_this_host_beats(hc_settings: Settings,
                                                        tmp_path: Path) -> None:
    host = f"container-{uuid.uuid4().hex[:6]}"
    ready = tmp_path / "ready"
    assert check(hc_settings, host, None) == f"no fresh heartbeat from a worker on {host}"

    # A worker of another model (its own queue family) on this host counts too.
    beat = Heartbeat(hc_settings.replace(model_name="other"), f"bertstream-7@{host}", {}).start()
    try:
        until(lambda: check(hc_settings, host, None) is None)
        assert check(hc_settings, "elsewhere", None) is not None
        assert check(hc_settings, host, str(ready)) == f"not consuming yet ({ready} missing)"
        ready.write_text("bertstream-7@" + host)
        assert check(hc_settings, host, str(ready)) is None
    finally:
        beat.stop()
    assert check(hc_settings, host, None) is not None  # a clean stop deletes the key


def test_exit_codes(hc_settings: Settings, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTSTREAM_BROKER_URL", hc_settings.broker_url)
    monkeypatch.setenv("BERTSTREAM_QUEUE", hc_settings.queue)
    assert main([]) == 1
    beat = Heartbeat(hc_settings, f"bertstream-1@{socket.gethostname()}", {}).start()
    try:
        until(lambda: main([]) == 0)
        assert main(["--ready-file", str(tmp_path / "absent")]) == 1
    finally:
        beat.stop()


def test_unreachable_redis_is_unhealthy() -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0", redis_connect_timeout_s=0.5)
    reason = check(settings, "h", None)
    assert reason is not None and reason.startswith("cannot reach Redis")


def test_a_broker_password_is_not_shown() -> None:
    reason = check(Settings(broker_url="sentinel://:secretpw@sentinel:26379/0"), "h", None)
    assert reason is not None and "secretpw" not in reason and ":***@" in reason
