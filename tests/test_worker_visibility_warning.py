"""A worker warns at start when its visibility timeout is too short for its database
timeouts: a silent database could keep a flush's messages unrenewed past it."""

from __future__ import annotations

import logging

import pytest

from contract.settings import Settings
from worker.app import unrenewed_span_s, warn_silent_database


def _settings(visibility: int, connect: float = 10, statement: float = 30) -> Settings:
    return Settings(visibility_timeout_s=visibility, db_connect_timeout_s=connect,
                    db_statement_timeout_s=statement)


def test_the_defaults_are_safe(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings()
    assert unrenewed_span_s(settings) < settings.visibility_timeout_s
    with caplog.at_level(logging.WARNING, logger="worker.app"):
        assert warn_silent_database(settings) is False
    assert not caplog.records


def test_a_short_timeout_warns_and_says_what_to_raise(caplog: pytest.LogCaptureFixture) -> None:
    # a quarter of 60 s, then up to twice (10 s connect + 33 s guard), then the pause
    settings = _settings(60)
    assert unrenewed_span_s(settings) == pytest.approx(15 + 86 + 2)
    with caplog.at_level(logging.WARNING, logger="worker.app"):
        assert warn_silent_database(settings) is True
    message = caplog.records[-1].getMessage()
    assert "BERTSTREAM_VISIBILITY_TIMEOUT_S=60 is short" in message
    assert "BERTSTREAM_DB_CONNECT_TIMEOUT_S=10" in message
    assert "BERTSTREAM_DB_STATEMENT_TIMEOUT_S=30" in message
    assert "above 117 s" in message
    # what it says to raise it to is enough: that timeout does not warn
    assert warn_silent_database(_settings(118)) is False
    assert warn_silent_database(_settings(117)) is True


def test_shorter_database_timeouts_make_a_short_visibility_timeout_safe() -> None:
    assert warn_silent_database(_settings(20, connect=2, statement=1)) is False
    assert warn_silent_database(_settings(20, connect=10, statement=30)) is True
