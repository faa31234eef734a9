"""The one settings object: environment parsing, validation, masking."""

from __future__ import annotations

import pytest

from contract.errors import ConfigError
from contract.settings import Settings, mask_url


def test_defaults_match_the_readme() -> None:
    s = Settings.from_env({})
    assert s.broker_url == "redis://localhost:6379/0"
    assert s.database_url == "sqlite:///bertstream.db"
    assert s.model == "default"


def test_environment_and_overrides() -> None:
    s = Settings.from_env({"BERTSTREAM_MAX_WAIT_MS": "5", "BERTSTREAM_STORE_TEXT": "off",
                           "BERTSTREAM_MODEL": "/m", "UNRELATED": "x"}, model="/other")
    assert s.max_wait_ms == 5 and s.store_text is False and s.model == "/other"
    assert Settings.from_env({"BERTSTREAM_MAX_PADDING": "0.25"}).max_padding == 0.25


@pytest.mark.parametrize("env", [
    {"BERTSTREAM_MAX_WAIT_MS": "soon"},
    {"BERTSTREAM_TOKEN_BUDGET": "0"},
    {"BERTSTREAM_STORE_TEXT": "maybe"},
    {"BERTSTREAM_DTYPE": "int3"},
    {"BERTSTREAM_DEVICE": "tpu"},
    {"BERTSTREAM_MAX_PADDING": "-0.1"},
    {"BERTSTREAM_MAX_PADDING": "lots"},
    {"BERTSTREAM_MAX_PADDING": "nan"},
])
def test_bad_values_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env)


def test_passwords_are_masked() -> None:
    assert mask_url("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert "secret" not in str(Settings(database_url="postgresql://u:secret@h/db").public())


@pytest.mark.parametrize("env", [
    {"BERTSTREAM_MAX_WAIT_MS": "0"},  # a 0 ms flush timer never fires
    {"BERTSTREAM_METRICS_PORT": "70000"},
    {"BERTSTREAM_METRICS_PORT": "-1"},
    {"BERTSTREAM_DB_STATEMENT_TIMEOUT_S": "0.0004"},  # 0 ms: no limit on PostgreSQL
    {"BERTSTREAM_DB_STATEMENT_TIMEOUT_S": "10000000"},  # past int32 milliseconds
    {"BERTSTREAM_DB_CONNECT_TIMEOUT_S": "1e12"},
    {"BERTSTREAM_DB_KEEPALIVE_S": "100000"},
])
def test_out_of_range_values_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env)


def test_range_limits_are_inclusive() -> None:
    s = Settings.from_env({"BERTSTREAM_MAX_WAIT_MS": "1", "BERTSTREAM_METRICS_PORT": "65535",
                           "BERTSTREAM_DB_STATEMENT_TIMEOUT_S": "0.001",
                           "BERTSTREAM_DB_KEEPALIVE_S": "32767"})
    assert (s.max_wait_ms, s.metrics_port, s.db_keepalive_s) == (1, 65535, 32767)
    from contract.results import DbTimeouts, _libpq_args

    longest = Settings.from_env({"BERTSTREAM_DB_STATEMENT_TIMEOUT_S": "1952257"})
    args = _libpq_args(DbTimeouts.from_settings(longest), None)
    assert args["tcp_user_timeout"] <= 2**31 - 1  # libpq's int32 milliseconds


def test_out_of_range_setting_exits_2_without_a_traceback() -> None:
    from click.testing import CliRunner

    from producer.cli import main

    result = CliRunner().invoke(main, ["worker"], env={"BERTSTREAM_MAX_WAIT_MS": "0"})
    assert result.exit_code == 2, result.output
    assert "BERTSTREAM_MAX_WAIT_MS must be >= 1" in result.output


def test_passwords_in_query_strings_are_masked() -> None:
    url = "postgresql://h/db?sslmode=require&password=secret&sslpassword=s2;x=1"
    masked = mask_url(url)
    assert "secret" not in masked and "s2" not in masked
    assert masked == "postgresql://h/db?sslmode=require&password=***&sslpassword=***;x=1"
    assert mask_url("redis://:pw@h:6379/0?Password=pw2") == "redis://:***@h:6379/0?Password=***"
    assert "secret" not in str(Settings(database_url=url).public())


@pytest.mark.parametrize(("env", "says"), [
    # past time_t in the socket layer (Celery: OverflowError at the first connect)
    ({"BERTSTREAM_REDIS_SOCKET_TIMEOUT_S": "1e12"}, "> 0 and at most 86400 seconds"),
    ({"BERTSTREAM_REDIS_CONNECT_TIMEOUT_S": "1e12"}, "> 0 and at most 86400 seconds"),
    ({"BERTSTREAM_REDIS_HEALTH_CHECK_S": "99999999999999"}, ">= 0 and at most 86400 seconds"),
    # torch.set_num_threads: ValueError (Overflow) when the model loads
    ({"BERTSTREAM_TORCH_THREADS": "10000000000"}, ">= 0 and at most 1024"),
    # a lone text would wait for days in the worker's buffer
    ({"BERTSTREAM_MAX_WAIT_MS": "10000000000"}, ">= 1 and at most 86400000 ms"),
    ({"BERTSTREAM_API_MAX_WAIT_S": "99999999999"}, "> 0 and at most 86400 seconds"),
    ({"BERTSTREAM_PUBLISH_RETRY_MAX_S": "inf"}, ">= 0 and at most 86400 seconds"),
    ({"BERTSTREAM_PUBLISH_RETRY_MAX_S": "nan"}, ">= 0 and at most 86400 seconds"),
    # every single submit to the API would wait that long for its window
    ({"BERTSTREAM_API_COALESCE_MS": "99999999999"}, ">= 0 and at most 1000 ms"),
    # Redis refuses the expiry ("invalid expire time"): every POST was a 503
    ({"BERTSTREAM_API_ID_TTL_S": str(10**17)}, "> 0 and at most 315360000 seconds"),
])
def test_values_that_overflow_later_are_refused_naming_the_range(env: dict[str, str],
                                                                 says: str) -> None:
    """Each was accepted at start and failed later: a traceback (exit 1), a 503 on every
    submit, or a wait of years."""
    [key] = env
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(f"{key} must be {says} (got ")


def test_upper_bounds_are_inclusive() -> None:
    s = Settings.from_env({
        "BERTSTREAM_REDIS_SOCKET_TIMEOUT_S": "86400", "BERTSTREAM_REDIS_CONNECT_TIMEOUT_S": "86400",
        "BERTSTREAM_REDIS_HEALTH_CHECK_S": "86400", "BERTSTREAM_TORCH_THREADS": "1024",
        "BERTSTREAM_MAX_WAIT_MS": "86400000", "BERTSTREAM_API_MAX_WAIT_S": "86400",
        "BERTSTREAM_PUBLISH_RETRY_MAX_S": "86400", "BERTSTREAM_API_COALESCE_MS": "1000",
        "BERTSTREAM_API_ID_TTL_S": "315360000"})
    assert (s.torch_threads, s.api_coalesce_ms, s.api_id_ttl_s) == (1024, 1000, 315_360_000)


@pytest.mark.parametrize("url", ["", "  ", "amqp://guest@h//", "localhost:6379",
                                 "sentinel://:pw@h:26379/0"])
def test_a_broker_url_bertstream_cannot_run_on_is_refused(url: str) -> None:
    """An empty URL crashed the worker (redis-py's ValueError, a traceback) and the API."""
    with pytest.raises(ConfigError, match=r"BERTSTREAM_BROKER_URL=.* is not a Redis URL "
                                          r"\(redis://, rediss://, unix://\) nor memory://") as info:
        Settings.from_env({"BERTSTREAM_BROKER_URL": url})
    assert "pw" not in str(info.value)


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h/1", "unix:///tmp/r.sock",
                                 "memory://"])
def test_broker_urls_bertstream_runs_on_are_accepted(url: str) -> None:
    """memory:// stays: the demo falls back to it (one process) and embedding callers use it."""
    assert Settings.from_env({"BERTSTREAM_BROKER_URL": url}).broker_url == url
    assert Settings().replace(broker_url=url).broker_url == url


def test_a_long_refused_name_is_cut_in_its_one_line_message() -> None:
    """A refused model name is quoted escaped and cut, not echoed whole on the one line."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"BERTSTREAM_MODEL_NAME": "x\n" * 5_000})
    message = str(info.value)
    assert message.startswith("BERTSTREAM_MODEL_NAME='x\\nx\\n") and "\n" not in message
    assert "... (10000 characters): a model name is letters" in message
    assert len(message) < 300


def test_refused_values_are_quoted_with_their_escapes_once() -> None:
    """Error lines quote a refused value by its repr, cut short: a control character reads
    as one escape (``'a\\x01b'``), never the doubled escape of a repr of a printable form."""
    from contract.errors import InvalidInput, quoted
    from contract.messages import item_from_wire

    assert quoted("a\x01b") == "'a\\x01b'"
    assert quoted("x" * 300, 10) == "'xxxxxxxxxx'... (300 characters)"
    with pytest.raises(InvalidInput) as info:
        item_from_wire({"id": "t1", "text": "hello", "model": "a\x01b"},
                       Settings(model_name="alpha"))
    assert "is for model 'a\\x01b', but" in str(info.value), str(info.value)
