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

from contract.results import ResultStore
from tests.producer_helpers import invoke
from tests.redis_urls import past_the_last_database
from worker.process import free_port

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


#: Commands that reach the broker's Redis, and where: a publish, a stream's, the default
#: model's name read from its workers' heartbeats (`results`, `db delete`).
REACHING = {
    "submit": ["submit", "hi"],
    "stream": ["stream", "-", "--no-progress"],
    "results": ["results", "--model", "default"],
    "db delete": ["db", "delete", "--model", "default"],
}


def _unreachable_line(args: list[str], env: dict[str, str]) -> str:
    """The one ``error:`` line of a command that exited 3 (Redis unreachable)."""
    out = invoke(args, input="hi\n", env={**env, "BERTSTREAM_PUBLISH_RETRIES": "0"})
    assert out.exit_code == 3, (out.output, out.exception)
    assert "Traceback" not in out.output
    [line] = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.parametrize("command", list(REACHING))
def test_an_unreachable_broker_url_option_is_the_option_to_change(
        command: str, redis_url: str, sqlite_url: str, sqlite_store: ResultStore) -> None:
    """The hint said "start it with `redis-server` or set BERTSTREAM_BROKER_URL" to a user
    who gave --broker-url: a variable the option overrides, so setting it changes nothing."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {"BERTSTREAM_BROKER_URL": redis_url, "BERTSTREAM_DATABASE_URL": sqlite_url}
    line = _unreachable_line([*REACHING[command], "--broker-url", url], env)
    assert line.startswith(f"error: cannot reach Redis at {url}: start it with "
                           f"`redis-server` or give another --broker-url ("), line
    assert "BERTSTREAM_BROKER_URL" not in line


@pytest.mark.parametrize("command", list(REACHING))
def test_an_unreachable_broker_url_from_the_environment_is_the_variable_to_set(
        command: str, sqlite_url: str, sqlite_store: ResultStore) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {"BERTSTREAM_BROKER_URL": url, "BERTSTREAM_DATABASE_URL": sqlite_url}
    line = _unreachable_line(REACHING[command], env)
    assert line.startswith(f"error: cannot reach Redis at {url}: start it with "
                           f"`redis-server` or set BERTSTREAM_BROKER_URL ("), line


@pytest.mark.parametrize("command", ["submit", "stream"])
def test_a_broker_url_option_a_command_cannot_publish_to_is_the_option_to_change(
        command: str, redis_url: str, sqlite_url: str) -> None:
    """memory:// is a broker URL, but not one a command can publish to: "set
    BERTSTREAM_BROKER_URL or --broker-url" offered the variable the option overrides."""
    env = {"BERTSTREAM_BROKER_URL": redis_url, "BERTSTREAM_DATABASE_URL": sqlite_url}
    line = _run(command, ["--broker-url", "memory://"], env)
    assert line.endswith(": give another --broker-url"), line
    assert "BERTSTREAM_BROKER_URL" not in line
    from_env = _run(command, [], {**env, "BERTSTREAM_BROKER_URL": "memory://"})
    assert from_env.endswith(": set BERTSTREAM_BROKER_URL or --broker-url"), from_env


#: The `db` commands that open the database, each with what it needs to get that far.
DB_COMMANDS = {
    "current": ["db", "current"],
    "upgrade": ["db", "upgrade"],
    "downgrade": ["db", "downgrade", "base"],
    "delete": ["db", "delete", "--id", "x"],
    "settle": ["db", "settle"],
}


@pytest.mark.parametrize("command", list(DB_COMMANDS))
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_db_command_names_its_database_url_option(command: str, where: str,
                                                    redis_url: str, sqlite_url: str) -> None:
    """The `db` group's commands refuse a --database-url as the other commands do, the
    option given before the group or after the command; the variable keeps its name."""
    env = {"BERTSTREAM_BROKER_URL": redis_url, "BERTSTREAM_DATABASE_URL": sqlite_url}
    option = ["--database-url", MYSQL]
    args = [*option, *DB_COMMANDS[command]] if where == "before" else [*DB_COMMANDS[command],
                                                                        *option]
    line = _error_line(invoke(args, env=env))
    assert line.startswith(f"error: --database-url={MYSQL}: "), line
    assert "BERTSTREAM_DATABASE_URL" not in line
    from_env = _error_line(invoke(DB_COMMANDS[command],
                                  env={**env, "BERTSTREAM_DATABASE_URL": MYSQL}))
    assert from_env.startswith(f"error: BERTSTREAM_DATABASE_URL={MYSQL}: "), from_env


@pytest.mark.parametrize(("url", "says"), UNPARSED, ids=["not-redis", "db-not-a-number"])
def test_db_delete_names_the_broker_url_option_it_reads_the_default_model_with(
        url: str, says: str, redis_url: str, sqlite_url: str) -> None:
    env = {"BERTSTREAM_BROKER_URL": redis_url, "BERTSTREAM_DATABASE_URL": sqlite_url}
    line = _error_line(invoke(["db", "delete", "--model", "default", "--broker-url", url],
                              env=env))
    assert line.startswith(f"error: --broker-url={says}"), line
