"""Request bodies ``POST /v1/tasks`` refuses, as tables: one test case a row.

A row is a body, the headers it goes with, and the 422's error code and whole
message; :func:`cases` names each by the start of its body, so a failure says
which body was answered wrongly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import httpx
import pytest

from worker.process import ServeProc

JSON = {"content-type": "application/json"}


class Refused(NamedTuple):
    """A body the API answers 422, with this code and this whole message."""

    body: bytes
    message: str
    code: str = "invalid_request"
    headers: dict[str, str] = JSON


def _name(case: Refused) -> str:
    shown = "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in case.body[:40])
    shown = shown or "(empty)"
    if len(case.body) > 40:
        shown += f"...({len(case.body)} bytes)"
    if case.headers != JSON:
        shown += f" as {case.headers.get('content-type', 'no content-type')}"
    return shown


def cases(rows: list[Refused]) -> Any:
    """The rows as pytest parameters, each named by its body."""
    return [pytest.param(row, id=_name(row)) for row in rows]


def check_refused(api: ServeProc, case: Refused) -> None:
    """Post ``case``'s body: the answer is its 422 error, whole, and the server logs no
    traceback or error for it."""
    logged = len(api.log_path.read_bytes())
    r = httpx.post(api.url + "/v1/tasks", content=case.body, headers=case.headers, timeout=30)
    assert (r.status_code, r.json()) == (
        422, {"error": {"code": case.code, "message": case.message}}), (
        f"got {r.status_code} {r.text}; expected 422 {case.code}: {case.message!r}")
    log = api.log_path.read_bytes()[logged:].decode(errors="replace")
    assert "Traceback" not in log and "ERROR" not in log, log
