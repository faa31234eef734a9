"""A request body ``POST /v1/tasks`` cannot read is answered with one plain message.

The body is one task (``text``) or many (``items``); the 422 listed what was wrong
for both shapes (``TaskIn.text: ...; BulkIn.items: Field required; ...``), a
broken JSON by its character offset (``13: JSON decode error``) and an empty body
as ``Field required``. Over a real ``bertstream serve``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from contract.settings import Settings

JSON = {"content-type": "application/json"}
NEEDS = 'the body needs "text" (or "items" for many)'
EMPTY = 'the body is empty: send a JSON object with "text" (or "items" for many)'

#: (body, headers, the whole message)
CASES: list[tuple[bytes, dict[str, str], str]] = [
    (b"{not json", JSON, "the body is not valid JSON (line 1, column 2: expecting property "
                         "name enclosed in double quotes)"),
    (b'{"text":"a"} x', JSON, "the body is not valid JSON (line 1, column 14: extra data)"),
    (b'{"text": "a",\n "id": }', JSON,
     "the body is not valid JSON (line 2, column 8: expecting value)"),
    (b"", JSON, EMPTY),
    (b"", {}, EMPTY),
    (b" \n ", JSON, EMPTY),
    (b'{"text":5}', JSON, "text: must be a string"),
    (b'{"text":null}', JSON, "text: must be a string"),
    (b'{"text":"a","id":5,"source":["x"]}', JSON, "id: must be a string; source: must be a string"),
    (b'{"text":"a","meta":[1]}', JSON, "meta: must be a JSON object"),
    (b'{"text":"a","lane":"x"}', JSON, "lane: must be 'interactive' or 'bulk'"),
    (b'{"text":"a","extra":1}', JSON, "extra: unknown field"),
    (b'{"items":5}', JSON, "items: must be a list"),
    (b'{"items":["a"],"lane":"q","x":1}', JSON,
     "lane: must be 'interactive' or 'bulk'; x: unknown field"),
    (b"{}", JSON, NEEDS),
    (b'{"txt":"a"}', JSON, f"{NEEDS}; txt: unknown field"),
    (b'{"items":[],"text":"a"}', JSON, 'send "text" (one task) or "items" (many), not both'),
    (b"[1]", JSON, "the body must be a JSON object, not an array"),
    (b"null", JSON, "the body must be a JSON object, not null"),
    (b'"hi"', JSON, "the body must be a JSON object, not a string"),
    (b"7", JSON, "the body must be a JSON object, not a number"),
    (b'{"text":"a"}', {"content-type": "text/plain"},
     "the body must be a JSON object sent as Content-Type: application/json (not text/plain)"),
    (b'{"text":"a"}', {}, "the body must be a JSON object sent as Content-Type: "
                          "application/json (the request had no Content-Type)"),
]


@pytest.fixture
def api(redis_url: str, sqlite_url: str, api_factory: Any) -> Any:
    return api_factory(Settings(broker_url=redis_url, database_url=sqlite_url))


def test_each_unreadable_body_gets_one_plain_message(api: Any) -> None:
    wrong = []
    with httpx.Client(base_url=api.url, timeout=10) as http:
        for body, headers, message in CASES:
            r = http.post("/v1/tasks", content=body, headers=headers)
            assert r.status_code == 422, (body, r.text)
            assert r.json() == {"error": {"code": "invalid_request", "message": r.json()[
                "error"]["message"]}}, r.text  # the error's shape is as it was
            got = r.json()["error"]["message"]
            if got != message:
                wrong.append((body, headers, got, message))
        # a valid body is still accepted, one task and many
        assert http.post("/v1/tasks", json={"text": "fine"}).status_code == 202
        assert http.post("/v1/tasks", json={"items": ["fine", "too"]}).status_code == 202
    assert not wrong, "\n".join(f"{b!r} {h}: got {g!r}, expected {m!r}" for b, h, g, m in wrong)


def test_query_parameter_errors_read_as_before(api: Any) -> None:
    r = httpx.get(api.url + "/v1/results", params={"limit": "many"}, timeout=10)
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("query.limit: Input should be a valid integer")
