"""The launcher (``worker --gpus`` / several ``--model``) as one set of real processes.

A child that leaves stops the set (so a restart policy restarts it), a
Ctrl-C stops every child warmly once, and readiness, node names and metrics
ports are those of the whole set.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from contract.errors import ConfigError
from contract.liveness import family_workers
from contract.settings import Settings
from producer.cli import main
from tests.polling import until
from worker.healthcheck import main as healthcheck
from worker.heartbeat import node_name
from worker.launcher import child_commands, launch, parse_gpus
from worker.metrics import WorkerMetrics
from worker.process import die_with_parent, settings_env

COLD_SHUTDOWN = "Hitting Ctrl+C again will terminate all running tasks"


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


class Launcher:
    """``bertstream worker ARGS`` in a session of its own (as in a terminal), output to a log."""

    def __init__(self, settings: Settings, log_path: Path, *args: str) -> None:
        env = settings_env(settings)
        env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from producer.cli import main; main()", "worker", *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent())
        self.children: list[int] = []

    def wait_children(self, count: int) -> list[int]:
        self.children = until(lambda: len(children_of(self.proc.pid)) == count
                              and children_of(self.proc.pid), 60, f"{count} children")
        return self.children

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Whatever the test left running: the launcher, then any child by its pid."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in self.children:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def launcher_factory(tmp_path: Path) -> Iterator[Callable[..., Launcher]]:
    started: list[Launcher] = []

    def start(settings: Settings, *args: str) -> Launcher:
        launcher = Launcher(settings, tmp_path / f"launcher-{len(started)}.log", *args)
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.stop()


@pytest.fixture
def lsettings(redis_url: str, sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=sqlite_url, device="cpu",
                    torch_threads=1, queue=f"bst-launch-{uuid.uuid4().hex[:8]}",
                    cache_dir=str(tmp_path / "cache"))


@pytest.mark.slow
def test_a_child_that_cannot_start_stops_the_others(
        lsettings: Settings, tiny_model_dir: Path, tmp_path: Path,
        launcher_factory: Callable[..., Launcher]) -> None:
    launcher = launcher_factory(lsettings, "--model", f"a={tiny_model_dir}",
                                "--model", f"b={tmp_path / 'no-such-model'}")
    pids = launcher.wait_children(2)
    code = launcher.proc.wait(timeout=90)
    assert code == 2, launcher.log()  # the failed child's own code (bad model)
    assert all(gone(pid) for pid in pids)


@pytest.mark.slow
def test_a_killed_child_stops_the_set_with_its_signal(
        lsettings: Settings, tiny_model_dir: Path, tmp_path: Path,
        launcher_factory: Callable[..., Launcher], monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of one child (the OOM killer): the launcher stops the others and exits
    137, which a restart policy acts on. Before that, the set is ready and healthy
    under the node names ``--hostname w1@%h`` gives."""
    ready = tmp_path / "ready"
    launcher = launcher_factory(lsettings, "--model", f"a={tiny_model_dir}",
                                "--model", f"b={tiny_model_dir}", "--hostname", "w1@%h",
                                "--ready-file", str(ready))
    pids = launcher.wait_children(2)
    until(lambda: ready.is_file() or launcher.proc.poll() is not None, 120, "ready file")
    assert launcher.proc.poll() is None, launcher.log()
    host = socket.gethostname()
    client = redis.Redis.from_url(lsettings.broker_url)
    try:
        names = {w["hostname"] for w in family_workers(client, lsettings.queue)}
    finally:
        client.close()
    assert names == {f"w1-a@{host}", f"w1-b@{host}"}
    monkeypatch.setenv("BERTSTREAM_BROKER_URL", lsettings.broker_url)
    monkeypatch.setenv("BERTSTREAM_QUEUE", lsettings.queue)
    assert healthcheck(["--ready-file", str(ready)]) == 0

    os.kill(pids[0], signal.SIGKILL)
    assert launcher.proc.wait(timeout=60) == 128 + signal.SIGKILL, launcher.log()
    assert gone(pids[1])
    # The launcher's log (journald, `docker logs`) says which child went and how, not
    # only the others' "Warm shutdown".
    line = next((ln for ln in launcher.log().splitlines() if "SIGKILL" in ln), "")
    assert f"w1-a@{host} (pid {pids[0]})" in line, launcher.log()
    assert "stopping the other 1" in line, launcher.log()


@pytest.mark.slow
def test_one_ctrl_c_is_one_warm_shutdown_per_child(
        lsettings: Settings, tiny_model_dir: Path, tmp_path: Path,
        launcher_factory: Callable[..., Launcher]) -> None:
    """A terminal's Ctrl-C signals the launcher's whole process group once."""
    ready = tmp_path / "ready"
    launcher = launcher_factory(lsettings, "--model", f"a={tiny_model_dir}",
                                "--model", f"b={tiny_model_dir}", "--ready-file", str(ready))
    pids = launcher.wait_children(2)
    until(lambda: ready.is_file() or launcher.proc.poll() is not None, 120, "ready file")
    os.killpg(launcher.proc.pid, signal.SIGINT)
    assert launcher.proc.wait(timeout=60) == 0, launcher.log()
    assert COLD_SHUTDOWN not in launcher.log()
    assert launcher.log().count("Warm shutdown") == 2
    assert all(gone(pid) for pid in pids)


def test_repeated_gpus_are_refused() -> None:
    with pytest.raises(ValueError, match="--procs-per-gpu"):
        parse_gpus("0,1,0")
    result = CliRunner().invoke(main, ["worker", "--gpus", "0,0"])
    assert result.exit_code == 2 and "given more than once" in result.output


def test_metrics_ports_past_65535_are_refused(tmp_path: Path) -> None:
    two = [("a", "x"), ("b", "y")]
    with pytest.raises(ConfigError, match="65535"):
        child_commands([], Settings(metrics_port=65535), models=two)
    assert len(child_commands([], Settings(metrics_port=65534), models=two)) == 2
    with pytest.raises(ConfigError):  # refused before any child starts
        launch([], Settings(metrics_port=65535), models=two)
    result = CliRunner().invoke(main, ["worker", "--metrics-port", "65535", "--model", "a=x",
                                       "--model", "b=y"])
    assert result.exit_code == 2 and "65535" in result.output


def test_a_metrics_port_in_use_is_a_config_error(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104 - the metrics server binds all interfaces
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve metrics on port {port}"):
            WorkerMetrics("m").serve(port, Settings(broker_url=redis_url))


@pytest.mark.parametrize("option", [["worker", "--loglevel", "bogus"],
                                    ["serve", "--log-level", "bogus"]])
def test_an_unknown_log_level_is_a_usage_error(option: list[str], sqlite_url: str) -> None:
    # Were the option taken, nothing here could be served: no model, no Redis.
    env = {"BERTSTREAM_MODEL": "null", "BERTSTREAM_DATABASE_URL": sqlite_url,
           "BERTSTREAM_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = CliRunner().invoke(main, option, env=env)
    assert result.exit_code == 2 and "bogus" in result.output, result.output


def test_log_levels_are_case_insensitive() -> None:
    # The level is accepted (in any case) before the duplicate GPU is refused.
    result = CliRunner().invoke(main, ["worker", "--loglevel", "debug", "--gpus", "0,0"])
    assert result.exit_code == 2 and "given more than once" in result.output


def test_node_names_expand_like_celery() -> None:
    host = socket.gethostname()
    assert node_name("w1@%h") == f"w1@{host}"
    assert node_name("w1@%n") == f"w1@{host.partition('.')[0]}"
    assert node_name("box") == "celery@box"


def test_the_launcher_names_children_after_hostname() -> None:
    children = child_commands(["0", "1"], Settings(), node="w1@box", ready_file="/r/ready")
    names = [cmd[cmd.index("--hostname") + 1] for cmd, _ in children]
    assert names == ["w1-gpu0@box", "w1-gpu1@box"]
    assert [cmd[cmd.index("--ready-file") + 1] for cmd, _ in children] == [
        "/r/ready.w1-gpu0@box", "/r/ready.w1-gpu1@box"]


def test_a_cache_dir_that_cannot_be_created_exits_2(tmp_path: Path, sqlite_url: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"BERTSTREAM_CACHE_DIR": str(blocker / "cache"), "BERTSTREAM_DATABASE_URL": sqlite_url}
    for args in (["worker", "--device", "cpu"], ["model", "path"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 2, result.output
        assert "BERTSTREAM_CACHE_DIR" in result.output and "Traceback" not in result.output
