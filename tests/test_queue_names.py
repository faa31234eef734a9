"""``BERTSTREAM_QUEUE`` is checked at start: a queue name goes into Redis keys (the
lanes, the heartbeats ``bertstream:workers:<family>:<host>``, the retry markers) and
kombu's names, so one that makes those keys ambiguous is refused in one line, exit 2.

A ``:`` made two deployments' heartbeats one key (queue ``q:x`` on host ``h`` and queue
``q`` on host ``x:h``, a node name may hold a colon); glob characters, whitespace and
control characters, an empty or an endless name had no use and broke readers that
match keys.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from contract.errors import ConfigError
from contract.liveness import worker_key
from contract.settings import MAX_QUEUE_CHARS, Settings
from producer.cli import main
from worker.process import settings_env

ROOT = Path(__file__).resolve().parent.parent
SAYS = ("BERTSTREAM_QUEUE={!r}: a queue name is letters, digits, '.', '_' and '-' (at most "
        f"{MAX_QUEUE_CHARS}, starting with a letter or digit)")

REFUSED = ["q:x", "bertstream:prod", "q*", "q?", "q[ab]", "q]", "q\\x", "q x", " q", "q ",
           "q\n", "q\tx", "q\x00", "q\x06\x16x", "", "-q", ".q", "q/x", "q,x", "fü",
           "a" * (MAX_QUEUE_CHARS + 1)]


def test_a_colon_made_two_heartbeat_keys_one() -> None:
    """Why ':' is refused: the host follows the family and its ':', colons included."""
    assert worker_key("q:x", "h") == worker_key("q", "x:h")


@pytest.mark.parametrize("queue", REFUSED)
def test_a_queue_name_that_makes_keys_ambiguous_is_refused(queue: str) -> None:
    for build in (lambda: Settings.from_env({}, queue=queue),
                  lambda: Settings().replace(queue=queue)):
        with pytest.raises(ConfigError) as info:
            build()
        message = str(info.value)
        assert message.startswith("BERTSTREAM_QUEUE=") and "\n" not in message
        assert "a queue name is letters, digits" in message
        assert len(message) < 200  # a long value is cut in the message


def test_the_environment_variable_is_refused_with_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"BERTSTREAM_QUEUE": "q:x"})
    assert str(info.value) == SAYS.format("q:x")


@pytest.mark.parametrize("queue", [
    "bertstream", "bertstream-fast", "bst-hist-0a1b2c3d", "team.bertstream",
    "bertstream_prod", "Q1", "9lives", "a" * MAX_QUEUE_CHARS,
])
def test_plausible_queue_names_are_accepted(queue: str) -> None:
    assert Settings.from_env({"BERTSTREAM_QUEUE": queue}).queue == queue
    assert Settings().replace(queue=queue).queue == queue


def test_a_queue_named_like_a_model_family_is_that_family() -> None:
    """By design of the family rule, not refused: queue ``bertstream-fast`` (a plausible
    name) is the family of model ``fast`` of queue ``bertstream``; deployments sharing a
    Redis database keep apart by names where neither is the other's followed by '-'."""
    assert (Settings(queue="bertstream-fast").family
            == Settings(queue="bertstream", model_name="fast").family)


@pytest.mark.parametrize("args", [["worker", "--device", "cpu"], ["submit", "hi"],
                                  ["results"], ["serve"]])
def test_commands_refuse_the_queue_in_one_line_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(main, args, env={"BERTSTREAM_QUEUE": "q:x",
                                                 "BERTSTREAM_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: " + SAYS.format("q:x")


def test_python_m_worker_refuses_the_queue_in_one_line_exit_2(sqlite_url: str) -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0", database_url=sqlite_url)
    out = subprocess.run([sys.executable, "-m", "worker", "--device", "cpu"],
                         env={**settings_env(settings), "BERTSTREAM_QUEUE": "bst*"},
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-3000:]
    [line] = [line for line in out.stderr.splitlines() if line.strip()]
    assert line == "error: " + SAYS.format("bst*")
