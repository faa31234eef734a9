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
