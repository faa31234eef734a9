"""inf and nan in a setting that must be positive name the range, not just "> 0".

``BERTSTREAM_REDIS_SOCKET_TIMEOUT_S=inf`` said "must be > 0": inf is past the upper
bound (a day), and nan is no number at all.
"""

from __future__ import annotations

import pytest

from contract.errors import ConfigError
from contract.settings import Settings

#: The float settings of the "positive" list, with the range their message must name.
FLOAT_RANGES = {
    "BERTSTREAM_REDIS_SOCKET_TIMEOUT_S": "> 0 and at most 86400 seconds",
    "BERTSTREAM_REDIS_CONNECT_TIMEOUT_S": "> 0 and at most 86400 seconds",
    "BERTSTREAM_DB_CONNECT_TIMEOUT_S": "> 0 and at most 2147483647 seconds",
    "BERTSTREAM_DB_STATEMENT_TIMEOUT_S": "between 0.001 and 1952257 seconds",
}


@pytest.mark.parametrize("key", sorted(FLOAT_RANGES))
@pytest.mark.parametrize(("raw", "got"), [("inf", "inf"), ("nan", "nan: not a number"),
                                          ("-inf", "-inf"), ("0", "0.0")])
def test_inf_and_nan_name_the_range(key: str, raw: str, got: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({key: raw})
    assert str(info.value) == f"{key} must be {FLOAT_RANGES[key]} (got {got})"


@pytest.mark.parametrize(("field", "says"), [
    ("api_max_wait_s", "BERTSTREAM_API_MAX_WAIT_S must be > 0 and at most 86400 seconds "
                       "(got inf)"),
    ("api_id_ttl_s", "BERTSTREAM_API_ID_TTL_S must be > 0 and at most 315360000 seconds "
                     "(got inf)"),
    ("visibility_timeout_s", "BERTSTREAM_VISIBILITY_TIMEOUT_S must be finite and > 0 "
                             "(got inf)"),
])
def test_int_settings_given_inf_in_code_name_the_range(field: str, says: str) -> None:
    """Integers from the environment cannot be inf; a caller's Settings(...) can."""
    with pytest.raises(ConfigError) as info:
        Settings(**{field: float("inf")}).validate()
    assert str(info.value) == says


@pytest.mark.parametrize(("env", "says"), [
    ({"BERTSTREAM_PUBLISH_RETRY_MAX_S": "nan"},
     "BERTSTREAM_PUBLISH_RETRY_MAX_S must be >= 0 and at most 86400 seconds "
     "(got nan: not a number)"),
    ({"BERTSTREAM_PUBLISH_RETRY_MAX_S": "-1"},
     "BERTSTREAM_PUBLISH_RETRY_MAX_S must be >= 0 and at most 86400 seconds (got -1.0)"),
    ({"BERTSTREAM_MAX_PADDING": "nan"}, "BERTSTREAM_MAX_PADDING must be >= 0 "
                                        "(got nan: not a number)"),
    ({"BERTSTREAM_NEUTRAL_BELOW": "nan"}, "BERTSTREAM_NEUTRAL_BELOW must be between 0 and 1 "
                                          "(got nan: not a number)"),
])
def test_other_numbers_say_nan_is_not_a_number(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert str(info.value) == says


def test_the_documented_example_exits_2_naming_the_bound() -> None:
    from click.testing import CliRunner

    from producer.cli import main

    result = CliRunner().invoke(main, ["results"],
                                env={"BERTSTREAM_REDIS_SOCKET_TIMEOUT_S": "inf"})
    assert result.exit_code == 2, result.output
    assert ("BERTSTREAM_REDIS_SOCKET_TIMEOUT_S must be > 0 and at most 86400 seconds (got inf)"
            in result.output)
