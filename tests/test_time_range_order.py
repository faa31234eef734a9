"""A time range whose end is not after its start is refused, naming both bounds.

``since`` is inclusive and ``until`` exclusive, so ``--since D --until D`` (a user
asking for one day) and swapped bounds matched nothing: ``results`` printed
"(no results)", ``db delete`` counted 0, ``/v1/results`` answered an empty page, all
as if no row had been stored then.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from contract.settings import Settings
from tests.producer_helpers import broker_settings
from tests.test_cli_option_edges import bertstream, error_line

#: (the arguments, in the order typed) for commands that take --since and --until.
RANGES = [
    ["results", "--since", "2026-12-02", "--until", "2026-12-01"],
    ["results", "--until", "2026-12-01", "--since", "2026-12-02"],
    ["results", "--since", "2026-12-01", "--until", "2026-12-01T00:00:00+00:00"],
    ["results", "--aggregate", "label", "--since", "2026-12-01T08:00+08:00",
     "--until", "2026-12-01T00:00Z"],
    ["db", "delete", "--since", "2026-12-02", "--until", "2026-12-01"],
    ["compare", "--model", "a", "--model", "b", "--since", "2026-12-02",
     "--until", "2026-12-01"],
]


@pytest.mark.parametrize("args", RANGES)
def test_an_empty_range_is_refused_on_the_command_line(redis_url: str, sqlite_url: str,
                                                       args: list[str]) -> None:
    out = bertstream(broker_settings(redis_url, sqlite_url), *args)
    line = error_line(out)
    assert "--until" in line and "--since" in line and "not after" in line, line
    assert "exclusive" in line, line


def test_a_range_that_holds_time_is_read(redis_url: str, sqlite_url: str) -> None:
    out = bertstream(broker_settings(redis_url, sqlite_url), "results",
                     "--until", "2026-12-01T00:00:01", "--since", "2026-12-01")
    assert out.returncode == 0, out.stderr


def test_an_empty_range_is_refused_by_the_api(settings: Settings, api_factory: Any) -> None:
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for route in ("/v1/results", "/v1/stats", "/v1/search"):
            r = http.get(route, params={"since": "2026-12-02T00:00:00Z",
                                        "until": "2026-12-01T00:00:00Z"})
            assert r.status_code == 422, (route, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_request", error
            assert "until" in error["message"] and "not after" in error["message"], error
        r = http.get("/v1/results", params={"since": "2026-12-01T00:00:00Z",
                                            "until": "2026-12-01T00:00:01Z"})
        assert r.status_code == 200, r.text
