"""An error about a URL names it as the user gave it: the option, or the variable.

``bertstream submit hi --broker-url http://x`` said ``BERTSTREAM_BROKER_URL='http://x' is
not a Redis URL``, and so did every refusal of a ``--broker-url`` (one that does not
parse, a database index Redis refuses) and of a ``--database-url``: a user who typed the
option, with no such variable set, was sent looking for one. The same value from the
environment still names the variable.
"""

from __future__ import annotations

import pytest
from click.testing import Result

from tests.producer_helpers import invoke
from tests.redis_urls import past_the_last_database

#: Broker URLs every command refuses before it starts: (the URL, what the error says of it).
UNPARSED = [
    ("http://x", "'http://x' is not a Redis URL (redis://, rediss://, unix://) nor memory://"),
    ("redis://127.0.0.1:6379/abc", "'redis://127.0.0.1:6379/abc' cannot be parsed: the "
                                   "database index in the path must be a whole number"),
]

#: The commands of the checks, each with a `--wait` where it needs one to open the database.
COMMANDS = {
    "submit": ["submit", "hi", "--wait", "--timeout", "1"],
    "results": ["results", "--id", "x"],
    "stream": ["stream", "-", "--no-progress", "--wait", "--timeout", "1"],
}

#: The refusal of a database URL naming a dialect bertstream does not install.
MYSQL = "mysql://u@h/db"


def _error_line(out: Result) -> str:
    """The one ``error:`` line of a command that exited 2 without a traceback."""
    assert out.exit_code == 2, (out.output, out.exception)
    assert "Traceback" not in out.output
    [line] = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    return line


def _run(command: str, options: list[str], env: dict[str, str]) -> str:
    return _error_line(invoke([*COMMANDS[command], *options], input="hi\n", env=env))


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("url", "says"), UNPARSED, ids=["not-redis", "db-not-a-number"])
def test_a_bad_broker_url_option_is_named_as_the_option(command: str, url: str, says: str,
                                                        redis_url: str, sqlite_url: str) -> None:
    env = {"BERTSTREAM_BROKER_URL": redis_url, "BERTSTREAM_DATABASE_URL": sqlite_url}
    line = _run(command, ["--broker-url", url], env)
    assert line.startswith(f"error: --broker-url={says}"), line
    assert "BERTSTREAM_BROKER_URL=" not in line


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("url", "says"), UNPARSED, ids=["not-redis", "db-not-a-number"])
def test_the_same_broker_url_from_the_environment_names_the_variable(
        command: str, url: str, says: str, sqlite_url: str) -> None:
    env = {"BERTSTREAM_BROKER_URL": url, "BERTSTREAM_DATABASE_URL": sqlite_url}
    line = _run(command, [], env)
    assert line.startswith(f"error: BERTSTREAM_BROKER_URL={says}"), line


@pytest.mark.parametrize("command", ["submit", "stream"])  # `results` reads no Redis
def test_a_database_index_redis_refuses_is_named_as_the_option(command: str, redis_url: str,
                                                                sqlite_url: str) -> None:
    url = past_the_last_database(redis_url)
    env = {"BERTSTREAM_BROKER_URL": redis_url, "BERTSTREAM_DATABASE_URL": sqlite_url,
           "BERTSTREAM_PUBLISH_RETRIES": "0"}
    line = _run(command, ["--broker-url", url], env)
    assert line == (f"error: --broker-url={url!r}: database index {url.rsplit('/', 1)[1]} is "
                    "out of range for the Redis server there (it has fewer databases: its "
                    "`databases` setting)")


@pytest.mark.parametrize("command", ["submit", "stream"])
def test_a_database_index_redis_refuses_from_the_environment_names_the_variable(
        command: str, redis_url: str, sqlite_url: str) -> None:
    url = past_the_last_database(redis_url)
    env = {"BERTSTREAM_BROKER_URL": url, "BERTSTREAM_DATABASE_URL": sqlite_url,
           "BERTSTREAM_PUBLISH_RETRIES": "0"}
    line = _run(command, [], env)
    assert line.startswith(f"error: BERTSTREAM_BROKER_URL={url!r}: database index "), line


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unsupported_database_url_option_is_named_as_the_option(
        command: str, redis_url: str, sqlite_url: str) -> None:
    env = {"BERTSTREAM_BROKER_URL": redis_url, "BERTSTREAM_DATABASE_URL": sqlite_url}
    line = _run(command, ["--database-url", MYSQL], env)
    assert line.startswith(f"error: --database-url={MYSQL}: "), line
    assert "bertstream stores results in PostgreSQL" in line
    assert "BERTSTREAM_DATABASE_URL=" not in line


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_same_database_url_from_the_environment_names_the_variable(
        command: str, redis_url: str) -> None:
    env = {"BERTSTREAM_BROKER_URL": redis_url, "BERTSTREAM_DATABASE_URL": MYSQL}
    line = _run(command, [], env)
    assert line.startswith(f"error: BERTSTREAM_DATABASE_URL={MYSQL}: "), line


def test_only_the_setting_given_as_an_option_is_renamed(redis_url: str) -> None:
    """A good --broker-url does not turn the variable's bad database URL into an option."""
    env = {"BERTSTREAM_BROKER_URL": "redis://127.0.0.1:6379/abc",
           "BERTSTREAM_DATABASE_URL": MYSQL}
    line = _run("results", ["--broker-url", redis_url], env)
    assert line.startswith(f"error: BERTSTREAM_DATABASE_URL={MYSQL}: "), line


def test_the_option_before_the_command_is_named_too(redis_url: str, sqlite_url: str) -> None:
    env = {"BERTSTREAM_BROKER_URL": redis_url, "BERTSTREAM_DATABASE_URL": sqlite_url}
    out = invoke(["--broker-url=http://x", "submit", "hi"], env=env)
    assert _error_line(out).startswith("error: --broker-url='http://x' is not a Redis URL")
