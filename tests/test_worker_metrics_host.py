"""The address a worker serves its metrics on (``BERTSTREAM_METRICS_HOST``,
``worker --metrics-host``).

The metrics endpoint bound every interface, without a token, and nothing could change
that: an operator on a host with a public interface could only firewall the port
(``BERTSTREAM_METRICS_HOST`` was ignored as no setting, ``--metrics-host`` was no option).
The address is a setting now, every interface (``0.0.0.0``) by default as before: an IPv4
or IPv6 address or a host name, a bad one refused at start in one line; the startup line
names the address bound; and an address not of this host is refused in one line, as a
port in use is. Real ``serve`` calls and real worker processes, reached over HTTP.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from contract import settings as settings_module
from contract.errors import ConfigError
from contract.settings import Settings
from producer.cli import main
from worker.launcher import child_commands
from worker.metrics import WorkerMetrics
from worker.process import WorkerProc, free_port, settings_env

ROOT = Path(__file__).resolve().parents[1]
#: An address of no host here (TEST-NET-2, RFC 5737).
NOT_HERE = "198.51.100.7"


def _other_ipv4() -> str | None:
    """An IPv4 address of this machine besides loopback (``hostname -I``), or None."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for word in out.split():
        try:
            address = ipaddress.ip_address(word)
        except ValueError:
            continue
        if address.version == 4 and not address.is_loopback:
            return word
    return None


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def _get(host: str, port: int) -> int:
    """The HTTP status of ``/metrics`` on ``host`` (an IPv6 literal bracketed here)."""
    shown = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{shown}:{port}/metrics",  # noqa: S310 - local
                                timeout=5) as response:
        return int(response.status)


def _refused(host: str, port: int) -> bool:
    """Nothing accepts a connection on ``port`` of ``host``."""
    try:
        with socket.create_connection((host, port), timeout=3):
            return False
    except OSError:
        return True


def _serve(host: str) -> tuple[int, str]:
    port = free_port()
    url = WorkerMetrics("m").serve(port, Settings(broker_url="memory://", metrics_host=host))
    return port, url


def test_the_default_is_every_interface_as_before() -> None:
    assert Settings().metrics_host == "0.0.0.0"  # noqa: S104 - the default under test
    port, url = _serve(Settings().metrics_host)
    assert url == f"http://0.0.0.0:{port}/metrics"
    assert _get("127.0.0.1", port) == 200
    other = _other_ipv4()
    if other is not None:
        assert _get(other, port) == 200


def test_a_loopback_host_is_not_reached_on_another_address_of_this_machine() -> None:
    port, url = _serve("127.0.0.1")
    assert url == f"http://127.0.0.1:{port}/metrics"
    assert _get("127.0.0.1", port) == 200
    other = _other_ipv4()
    if other is None:
        pytest.skip("this machine has no IPv4 address besides loopback (hostname -I)")
    assert _refused(other, port)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_literal_is_served_on_ipv6_only() -> None:
    port, url = _serve("::1")
    assert url == f"http://[::1]:{port}/metrics"
    assert _get("::1", port) == 200
    assert _refused("127.0.0.1", port)


def test_a_host_name_binds_its_address_and_the_url_names_it() -> None:
    port, url = _serve("localhost")
    address = url.removeprefix("http://").rpartition(":")[0].strip("[]")
    assert ipaddress.ip_address(address).is_loopback, url
    assert _get(address, port) == 200


@pytest.mark.parametrize("host", ["", "[::1]", "[::1]:9100", "127.0.0.1:9100",
                                  "localhost:9100", "999.1.1.1", "1.2.3", "-bad", "a..b",
                                  "two words", ":::1", "x" * 64, "host\n"])
def test_a_bad_host_is_refused_by_the_settings(host: str) -> None:
    with pytest.raises(ConfigError, match="BERTSTREAM_METRICS_HOST") as refused:
        Settings.from_env({"BERTSTREAM_METRICS_HOST": host})
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "::", "0.0.0.0", "::ffff:127.0.0.1",
                                  "localhost", "LOCALHOST", "metrics.example.org",
                                  "metrics.example.org.", "10.0.0.5"])
def test_addresses_and_host_names_are_taken(host: str) -> None:
    assert Settings.from_env({"BERTSTREAM_METRICS_HOST": host}).metrics_host == host


def test_the_variable_is_a_setting_now(caplog: pytest.LogCaptureFixture) -> None:
    """It was ignored, with a warning that it is no setting (did you mean ..._PORT?)."""
    settings_module._named_unknown.clear()
    with caplog.at_level(logging.WARNING, logger="contract.settings"):
        Settings.from_env({"BERTSTREAM_METRICS_HOST": "127.0.0.1"})
    assert caplog.records == []


@pytest.mark.parametrize("host", [NOT_HERE, "2001:db8::7"])
def test_an_address_not_of_this_host_is_one_line(host: str) -> None:
    port = free_port()
    with pytest.raises(ConfigError) as refused:
        WorkerMetrics("m").serve(port, Settings(broker_url="memory://", metrics_host=host))
    said = str(refused.value)
    assert said.startswith(f"cannot serve metrics on {host} (BERTSTREAM_METRICS_HOST): "
                           "not an address of this host"), said
    assert "\n" not in said


def test_a_host_name_that_does_not_resolve_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^cannot serve metrics on nowhere\.invalid "
                                          r"\(BERTSTREAM_METRICS_HOST\): the host name does "
                                          r"not resolve"):
        _serve("nowhere.invalid")


def test_a_port_in_use_still_names_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^cannot serve metrics on port {port} "
                                              r"\(BERTSTREAM_METRICS_PORT\) of 127\.0\.0\.1: "):
            WorkerMetrics("m").serve(port, Settings(broker_url="memory://",
                                                    metrics_host="127.0.0.1"))


def test_the_launcher_gives_its_children_the_host() -> None:
    two = [("a", "x"), ("b", "y")]
    children = child_commands([], Settings(metrics_port=9100, metrics_host="::1"), models=two)
    assert [env["BERTSTREAM_METRICS_HOST"] for _, env in children] == ["::1", "::1"]
    assert [env["BERTSTREAM_METRICS_PORT"] for _, env in children] == ["9100", "9101"]


def test_the_option_reaches_the_launcher(monkeypatch: pytest.MonkeyPatch,
                                         redis_url: str) -> None:
    launched: list[Settings] = []

    def launch(gpus: Any, settings: Settings, **kwargs: Any) -> int:
        launched.append(settings)
        return 0

    monkeypatch.setattr("worker.launcher.launch", launch)
    result = CliRunner().invoke(main, ["worker", "--metrics-port", "9100", "--metrics-host",
                                       "::1", "--model", "a=x", "--model", "b=y"],
                                env={"BERTSTREAM_BROKER_URL": redis_url})
    assert result.exit_code == 0, result.output
    [settings] = launched
    assert (settings.metrics_host, settings.metrics_port) == ("::1", 9100)


@pytest.mark.parametrize(("args", "env", "said"), [
    (["--metrics-host", "not a host"], {}, "--metrics-host='not a host' is neither"),
    ([], {"BERTSTREAM_METRICS_HOST": "not a host"},
     "BERTSTREAM_METRICS_HOST='not a host' is neither"),
    (["--metrics-host", ""], {}, "--metrics-host is empty"),
])
def test_the_worker_refuses_a_bad_host_before_the_model_loads(
        args: list[str], env: dict[str, str], said: str, redis_url: str) -> None:
    result = CliRunner().invoke(main, ["worker", "--metrics-port", "9100", *args],
                                env={"BERTSTREAM_BROKER_URL": redis_url, **env})
    assert result.exit_code == 2, result.output
    assert said in result.output, result.output


def _worker_settings(redis_url: str, sqlite_url: str, model: Path, tmp_path: Path,
                     **changes: Any) -> Settings:
    return Settings(broker_url=redis_url, database_url=sqlite_url,
                    queue=f"bst-test-{uuid.uuid4().hex[:8]}", model=str(model),
                    cache_dir=str(tmp_path / "cache"), torch_threads=1, **changes)


def test_a_worker_serves_on_its_host_only_and_says_where(
        redis_url: str, sqlite_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = _worker_settings(redis_url, sqlite_url, tiny_model_dir, tmp_path,
                                metrics_port=free_port(), metrics_host="127.0.0.1")
    with WorkerProc(settings, tmp_path / "worker.log", args=("--device", "cpu"),
                    name="test") as worker:
        worker.wait_ready(120)
        port = settings.metrics_port
        assert "bertstream_worker_up 1.0" in worker.metrics_text()
        assert f"metrics on http://127.0.0.1:{port}/metrics" in worker.tail()
        other = _other_ipv4()
        if other is not None:
            assert _refused(other, port)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_worker_given_metrics_host_ipv6_serves_there(
        redis_url: str, sqlite_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    settings = _worker_settings(redis_url, sqlite_url, tiny_model_dir, tmp_path,
                                metrics_port=port)
    with WorkerProc(settings, tmp_path / "worker.log", name="test",
                    args=("--device", "cpu", "--metrics-host", "::1")) as worker:
        worker.wait_ready(120)
        assert _get("::1", port) == 200
        assert _refused("127.0.0.1", port)
        assert f"metrics on http://[::1]:{port}/metrics" in worker.tail()


def test_a_worker_on_an_address_not_of_this_host_exits_2_in_one_line(
        redis_url: str, sqlite_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = _worker_settings(redis_url, sqlite_url, tiny_model_dir, tmp_path,
                                metrics_port=free_port(), metrics_host=NOT_HERE)
    env = {**settings_env(settings), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "worker", "--device", "cpu"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot serve metrics on {NOT_HERE} (BERTSTREAM_METRICS_HOST): "
                      "not an address of this host (Cannot assign requested address)"], \
        done.stderr
    assert "Traceback" not in done.stderr


def _link_local() -> tuple[str, str] | None:
    """A link-local IPv6 address of this machine and its interface's name, or None."""
    try:
        out = subprocess.run(["ip", "-o", "-6", "addr", "show", "scope", "link"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        words = line.split()
        if len(words) > 3 and words[2] == "inet6":
            return words[3].partition("/")[0], words[1]
    return None


@pytest.mark.parametrize("host", ["fe80::1%eth0", "fe80::1", "::1%lo", "2001:db8::1%1",
                                  "fe80::1%eth0\nX", "1::%x y"])
def test_a_zoned_or_link_local_ipv6_address_is_refused_by_the_settings(host: str) -> None:
    """prometheus_client binds ``(address, port)`` without the scope id
    (``_get_best_family`` keeps ``sockaddr[0]`` alone), so a link-local address fails
    to bind (EINVAL, which was blamed on the port) and a zone was lost or, with
    a control character in it, printed raw into a two-line refusal at bind."""
    with pytest.raises(ConfigError, match="BERTSTREAM_METRICS_HOST") as refused:
        Settings.from_env({"BERTSTREAM_METRICS_HOST": host})
    said = str(refused.value)
    assert "\n" not in said
    assert "link-local" in said or "zone" in said, said


def test_this_hosts_link_local_address_is_refused_before_binding() -> None:
    """For real: this machine's own link-local address, with its zone, was taken by the
    settings, then could not be bound, refused as if the port were at fault."""
    found = _link_local()
    if found is None:
        pytest.skip("this machine has no link-local IPv6 address (ip -6 addr)")
    address, interface = found
    with pytest.raises(ConfigError, match="BERTSTREAM_METRICS_HOST") as refused:
        settings = Settings(broker_url="memory://").replace(
            metrics_host=f"{address}%{interface}")
        WorkerMetrics("m").serve(free_port(), settings)
    assert "METRICS_PORT" not in str(refused.value)


def test_metrics_host_without_a_metrics_port_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                         redis_url: str) -> None:
    """``--metrics-host`` with no port (option or variable) served nothing, silently."""
    launched: list[Settings] = []
    monkeypatch.setattr("worker.launcher.launch",
                        lambda gpus, settings, **kwargs: launched.append(settings) or 0)
    monkeypatch.delenv("BERTSTREAM_METRICS_PORT", raising=False)
    models = ["--model", "a=x", "--model", "b=y"]
    result = CliRunner().invoke(main, ["worker", "--metrics-host", "127.0.0.1", *models],
                                env={"BERTSTREAM_BROKER_URL": redis_url})
    assert result.exit_code == 2, result.output
    assert "--metrics-host needs --metrics-port" in result.output, result.output
    assert launched == []
    # The port from the environment will do, and the variable alone (shared by every
    # service in docker-compose.yml) is no refusal.
    for args, env in ((["--metrics-host", "127.0.0.1"], {"BERTSTREAM_METRICS_PORT": "9100"}),
                      ([], {"BERTSTREAM_METRICS_HOST": "127.0.0.1"})):
        result = CliRunner().invoke(main, ["worker", *args, *models],
                                    env={"BERTSTREAM_BROKER_URL": redis_url, **env})
        assert result.exit_code == 0, result.output
    assert [s.metrics_host for s in launched] == ["127.0.0.1", "127.0.0.1"]
