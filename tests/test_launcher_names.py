"""Two launchers on one host name their children apart.

Without ``--hostname`` a launcher's children carry its pid, as a single
worker's default name does, so two launchers serving the same models on one
host keep their own node names and heartbeat keys (each counts as live).
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest
import redis

from contract.liveness import family_workers
from contract.settings import Settings
from tests.polling import until
from tests.test_launcher import Launcher
from worker.launcher import child_commands


def test_child_names_carry_the_launchers_pid_by_default() -> None:
    import os

    children = child_commands([], Settings(), host="h", models=[("", "null"), ("b", "null")])
    names = [cmd[cmd.index("--hostname") + 1] for cmd, _ in children]
    assert names == [f"bertstream-{os.getpid()}@h", f"bertstream-{os.getpid()}-b@h"]


@pytest.mark.slow
def test_two_launchers_on_one_host_keep_their_own_heartbeats(redis_url: str,
                                                             tmp_path: Path) -> None:
    queue = f"bst-names-{uuid.uuid4().hex[:8]}"
    launchers: list[Launcher] = []
    try:
        for i in range(2):
            settings = Settings(broker_url=redis_url, device="cpu", torch_threads=1, queue=queue,
                                database_url=f"sqlite:///{tmp_path / f'r{i}.db'}",
                                cache_dir=str(tmp_path / "cache"))
            launchers.append(Launcher(settings, tmp_path / f"launcher-{i}.log",
                                      "--model", "null", "--model", "b=null",
                                      "--ready-file", str(tmp_path / f"ready-{i}")))
        for i, launcher in enumerate(launchers):
            launcher.wait_children(2)
            until(lambda i=i, launcher=launcher: (tmp_path / f"ready-{i}").is_file()
                  or launcher.proc.poll() is not None, 120, "ready file")
            assert launcher.proc.poll() is None, launcher.log()
        client = redis.Redis.from_url(redis_url)
        try:
            names = {w["hostname"] for w in family_workers(client, queue)}
        finally:
            client.close()
        host = socket.gethostname()
        assert names == {name for launcher in launchers for name in (
            f"bertstream-{launcher.proc.pid}@{host}", f"bertstream-{launcher.proc.pid}-b@{host}")}
    finally:
        for launcher in launchers:
            launcher.stop()
