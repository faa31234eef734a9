"""Bodies and cursors the OpenAPI schema does not describe, fuzzed: no request gets a 5xx.

``tests/test_api_fuzz.py`` generates requests from the schema: well-formed JSON of
the declared shapes. Here the bytes themselves vary: invalid UTF-8, a BOM, lone
surrogates, NaN and huge numbers, deep nesting, broken JSON, any JSON value in
any field, and cursors that decode to any JSON. Against a real ``bertstream
serve`` on Redis and SQLite; a 5xx, a non-JSON error or a traceback in the
server's log is a bug.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import hypothesis
import pytest
from hypothesis import strategies as st

from contract.results import ResultStore
from contract.settings import Settings

pytestmark = pytest.mark.slow

FUZZ = hypothesis.settings(max_examples=150, deadline=None, database=None,
                           suppress_health_check=list(hypothesis.HealthCheck))
ODD_TEXT = st.sampled_from(["", " ", "a", "\x00", "\ud800", "a\udfff", "\ufeff", "\u200b",
                            "x" * 5000, "默认", "default", "../x", "a/b", "%", "\U0010ffff"])
TEXT = st.one_of(ODD_TEXT, st.text(max_size=20))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10**400, 10**400),
                   st.floats(allow_nan=True, allow_infinity=True), TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(TEXT, inner, max_size=3), max_leaves=12)
FIELD = st.one_of(VALUE, TEXT, st.sampled_from(["interactive", "bulk"]))
TASK = st.fixed_dictionaries({}, optional={
    "text": FIELD, "id": FIELD, "source": FIELD, "meta": VALUE, "lane": FIELD, "model": FIELD,
    "extra": VALUE})
BULK = st.fixed_dictionaries({"items": st.lists(st.one_of(TASK, FIELD), max_size=5)}, optional={
    "source": FIELD, "lane": FIELD, "model": FIELD})
DOCUMENT = st.one_of(TASK, BULK, VALUE)


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


SPLICES = ["9" * 5000, nested(70), "NaN", "-Infinity", "1e999", '"\\ud800"', '"\\u00"', "",
           '{"a":' * 100]
DEEP = [nested(3000), "[" * 2000]


@st.composite
def encoded(draw: Any, document: st.SearchStrategy[Any], splices: list[str]) -> bytes:
    """``document`` as JSON bytes, then perhaps spoilt: unescaped surrogates (invalid
    UTF-8), a BOM, cut short, bytes or one of ``splices`` (numbers too long, nesting
    too deep) spliced in."""
    text = json.dumps(draw(document), allow_nan=True, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        splice = draw(st.sampled_from(splices))
        at = draw(st.integers(0, len(text)))
        text = text[:at] + splice + text[at:]
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    if draw(st.booleans()):
        raw = raw[:draw(st.integers(0, len(raw)))]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    return raw


@pytest.fixture
def api(redis_url: str, sqlite_url: str, api_factory: Any) -> Any:
    store = ResultStore.from_url(sqlite_url)
    store.create_schema()  # the read routes then run real queries
    store.close()
    return api_factory(Settings(broker_url=redis_url, database_url=sqlite_url,
                                max_queue_length=100_000, api_coalesce_ms=1))


def _sound(response: httpx.Response) -> None:
    """Below 500, and an error in the JSON error form."""
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"code", "message"} and error["message"], response.text


def test_no_body_gets_5xx(api: Any) -> None:
    calls = 0
    with httpx.Client(base_url=api.url, timeout=30) as http:
        @hypothesis.given(body=st.one_of(encoded(DOCUMENT, SPLICES + DEEP),
                                         st.binary(max_size=64)),
                          content_type=st.sampled_from(["application/json",
                                                        "application/json; charset=latin-1",
                                                        "application/merge-patch+json"]))
        @FUZZ
        def post(body: bytes, content_type: str) -> None:
            nonlocal calls
            calls += 1
            _sound(http.post("/v1/tasks", content=body, headers={"content-type": content_type}))

        post()
    assert calls >= 100
    log = api.log()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_no_cursor_gets_5xx(api: Any) -> None:
    """A cursor is base64 of JSON the client hands back: any JSON may come back (nesting
    deep enough to exhaust Python's recursion: :func:`test_a_deep_cursor_is_422`)."""
    with httpx.Client(base_url=api.url, timeout=30) as http:
        @hypothesis.given(document=encoded(VALUE | st.tuples(TEXT, TEXT, TEXT).map(list),
                                           SPLICES),
                          order=st.sampled_from(["newest", "oldest"]))
        @FUZZ
        def read(document: bytes, order: str) -> None:
            cursor = base64.urlsafe_b64encode(document).decode("ascii").rstrip("=")
            if len(cursor) <= 2048:
                _sound(http.get("/v1/results", params={"cursor": cursor, "order": order}))

        read()
    log = api.log()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_a_deep_cursor_is_422(api: Any) -> None:
    """A cursor of 1,500 nested arrays (2,000 characters, under the 2,048 allowed) made
    ``json.loads`` raise RecursionError, which the cursor check did not catch: a 500."""
    cursor = base64.urlsafe_b64encode(b"[" * 1500).decode("ascii").rstrip("=")
    r = httpx.get(api.url + "/v1/results", params={"cursor": cursor}, timeout=30)
    assert (r.status_code, r.json()) == (422, {"error": {"code": "invalid_input",
                                                         "message": "malformed cursor"}})
