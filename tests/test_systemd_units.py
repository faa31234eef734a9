"""The systemd units in deploy/systemd start commands this bertstream takes, restart
what a restart mends and not what it cannot, and read settings this bertstream knows.

Checked against the code, not against systemd (no systemd runs here): a renamed option,
a changed exit code or a renamed setting makes a unit that copies cleanly and fails at
its first start, or restarts a setting error for ever.
"""

from __future__ import annotations

import configparser
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from contract.constants import ENV_PREFIX
from contract.errors import EXIT_UNREACHABLE, EXIT_USAGE
from contract.settings import Settings

UNITS = Path(__file__).resolve().parents[1] / "deploy" / "systemd"


def unit(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read(UNITS / name, encoding="utf-8")
    return parser["Service"]


@pytest.mark.parametrize("name", ["bertstream-worker.service", "bertstream-api.service"])
def test_a_unit_starts_a_command_this_bertstream_takes(name: str) -> None:
    service = unit(name)
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/bin/bertstream"), argv
    # --help is eager, but click parses every option first: an unknown one exits 2.
    out = subprocess.run([sys.executable, "-c", "from producer.cli import main; main()",
                          *argv[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", ["bertstream-worker.service", "bertstream-api.service"])
def test_a_unit_restarts_outages_not_settings(name: str) -> None:
    service = unit(name)
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"].split() == [str(EXIT_USAGE)]
    assert str(EXIT_UNREACHABLE) not in service["RestartPreventExitStatus"].split()
    assert "143" in service["SuccessExitStatus"].split()  # a stop by SIGTERM
    assert service["EnvironmentFile"] == "/etc/bertstream/bertstream.env"


def test_the_worker_unit_keeps_its_ready_file_on_its_runtime_directory() -> None:
    service = unit("bertstream-worker.service")
    argv = shlex.split(service["ExecStart"])
    ready = argv[argv.index("--ready-file") + 1]
    assert ready.startswith(f"/run/{service['RuntimeDirectory']}/"), ready


def test_the_example_environment_names_known_settings() -> None:
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    names = [line.split("=", 1)[0] for line in
             (UNITS / "bertstream.env.example").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert names and set(names) <= known, set(names) - known
