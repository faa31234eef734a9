"""A request body ``POST /v1/tasks`` cannot read is answered with one plain message.

The body is one task (``text``) or many (``items``); the 422 listed what was wrong
for both shapes (``TaskIn.text: ...; BulkIn.items: Field required; ...``), a
broken JSON by its character offset (``13: JSON decode error``) and an empty body
as ``Field required``. Over a real ``bertstream serve``.
"""

from __future__ import annotations

import httpx
import pytest

from tests.api_bodies import Refused, cases, check_refused
from worker.process import ServeProc

NEEDS = 'the body needs "text" (or "items" for many)'
EMPTY = 'the body is empty: send a JSON object with "text" (or "items" for many)'

CASES = [
    Refused(b"{not json", "the body is not valid JSON (line 1, column 2: expecting property "
                          "name enclosed in double quotes)"),
    Refused(b'{"text":"a"} x', "the body is not valid JSON (line 1, column 14: extra data)"),
    Refused(b'{"text": "a",\n "id": }',
            "the body is not valid JSON (line 2, column 8: expecting value)"),
    Refused(b"", EMPTY),
    Refused(b"", EMPTY, headers={}),
    Refused(b" \n ", EMPTY),
    Refused(b'{"text":5}', "text: must be a string"),
    Refused(b'{"text":null}', "text: must be a string"),
    Refused(b'{"text":"a","id":5,"source":["x"]}', "id: must be a string; source: must be a string"),
    Refused(b'{"text":"a","meta":[1]}', "meta: must be a JSON object"),
    Refused(b'{"text":"a","lane":"x"}', "lane: must be 'interactive' or 'bulk'"),
    Refused(b'{"text":"a","extra":1}', "extra: unknown field"),
    Refused(b'{"items":5}', "items: must be a list"),
    Refused(b'{"items":["a"],"lane":"q","x":1}',
            "lane: must be 'interactive' or 'bulk'; x: unknown field"),
    Refused(b"{}", NEEDS),
    Refused(b'{"txt":"a"}', f"{NEEDS}; txt: unknown field"),
    Refused(b'{"items":[],"text":"a"}', 'send "text" (one task) or "items" (many), not both'),
    Refused(b"[1]", "the body must be a JSON object, not an array"),
    Refused(b"null", "the body must be a JSON object, not null"),
    Refused(b'"hi"', "the body must be a JSON object, not a string"),
    Refused(b"7", "the body must be a JSON object, not a number"),
    Refused(b'{"text":"a"}', "the body must be a JSON object sent as Content-Type: "
                             "application/json (not text/plain)",
            headers={"content-type": "text/plain"}),
    Refused(b'{"text":"a"}', "the body must be a JSON object sent as Content-Type: "
                             "application/json (the request had no Content-Type)", headers={}),
]


@pytest.mark.parametrize("case", cases(CASES))
def test_each_unreadable_body_gets_one_plain_message(case: Refused, module_api: ServeProc) -> None:
    check_refused(module_api, case)


def test_a_valid_body_is_still_accepted(module_api: ServeProc) -> None:
    """After the bodies above, on the same server: one task and many."""
    with httpx.Client(base_url=module_api.url, timeout=10) as http:
        assert http.post("/v1/tasks", json={"text": "fine"}).status_code == 202
        assert http.post("/v1/tasks", json={"items": ["fine", "too"]}).status_code == 202


def test_query_parameter_errors_read_as_before(module_api: ServeProc) -> None:
    r = httpx.get(module_api.url + "/v1/results", params={"limit": "many"}, timeout=10)
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("query.limit: Input should be a valid integer")
