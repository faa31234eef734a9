"""An export before anything is stored, and the parameters an export takes.

``/v1/results?format=csv&bom=true`` on a database without the results table yet (a fresh
one, no migration) answered the byte-order mark alone, no header row and no attachment
name, where an empty table answers the header: a spreadsheet user got a blank sheet. The
three checks of a parameter against the format (``limit``, ``cursor``, ``bom``) are one,
made before the table is looked for: a cursor given with an export, or a malformed one,
was refused with the table and let through without it, and of two wrong parameters only
the first was named."""

from __future__ import annotations

from typing import Any

import httpx

from contract.results import ResultStore
from contract.settings import Settings
from tests.producer_helpers import invoke

BOM = "\ufeff".encode()
#: Each a request to /v1/results: the answers must not depend on whether the table exists.
QUERIES: list[dict[str, str]] = [
    {"format": "csv", "bom": "true"}, {"format": "csv"}, {"format": "jsonl"}, {},
    {"format": "json", "cursor": "not-a-cursor"}, {"format": "csv", "cursor": "x"},
    {"format": "jsonl", "limit": "5", "cursor": "x", "bom": "false"},
    {"format": "json", "bom": "true", "limit": "5"},
]
#: `bertstream results` runs whose output must not depend on it either.
COMMANDS = [["--format", "csv", "--all", "--bom"], ["--format", "csv"],
            ["--format", "jsonl", "--all"], ["--format", "json"],
            ["--aggregate", "label", "--format", "csv"]]


def _answers(http: httpx.Client) -> list[tuple[int, str | None, str | None, bytes]]:
    answers = []
    for params in QUERIES:
        r = http.get("/v1/results", params=params)
        answers.append((r.status_code, r.headers.get("content-type"),
                        r.headers.get("content-disposition"), r.content))
    return answers


def _printed(settings: Settings) -> list[tuple[int, bytes]]:
    outs = [invoke(["results", *args], settings) for args in COMMANDS]
    return [(out.exit_code, out.stdout_bytes) for out in outs]


def test_an_export_without_the_table_is_that_of_an_empty_table(settings: Settings,
                                                                api_factory: Any) -> None:
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=60) as http:
        before, printed_before = _answers(http), _printed(settings)
        store = ResultStore.from_url(settings.database_url)
        store.create_schema()
        store.close()
        after, printed_after = _answers(http), _printed(settings)
    assert before == after
    assert printed_before == printed_after
    status, media, attachment, body = before[0]
    assert (status, media) == (200, "text/csv; charset=utf-8"), body
    assert attachment == 'attachment; filename="bertstream-results.csv"'
    assert body.startswith(BOM + b"id,text_sha256,") and body.count(b"\n") == 1, body
    assert before[1][3] == body[len(BOM):]
    assert before[2][:3] == (200, "application/x-ndjson",
                             'attachment; filename="bertstream-results.jsonl"')
    assert before[2][3] == b""
    code, printed = printed_before[0]
    assert code == 0 and printed.startswith(BOM + b"id,text_sha256,"), printed


def test_every_parameter_the_format_does_not_take_is_named_at_once(
        settings: Settings, api_factory: Any) -> None:
    api = api_factory(settings)
    with httpx.Client(base_url=api.url, timeout=60) as http:
        got = {}
        for i in (4, 5, 6, 7):
            r = http.get("/v1/results", params=QUERIES[i])
            assert r.status_code == 422, (QUERIES[i], r.text)
            got[i] = (r.json()["error"]["code"], r.json()["error"]["message"])
    assert got[4] == ("invalid_input", "malformed cursor")
    assert got[5] == ("invalid_input", "cursor applies to format=json only, not format=csv; "
                      "exports stream every matching row (narrow them with the filters, "
                      "since and until)")
    assert got[6] == ("invalid_input", "limit applies to format=json only; cursor applies to "
                      "format=json only; bom applies to format=csv only, not format=jsonl; "
                      "exports stream every matching row (narrow them with the filters, "
                      "since and until)")
    assert got[7] == ("invalid_input", "bom applies to format=csv only, not format=json")
