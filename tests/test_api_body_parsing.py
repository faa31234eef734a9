"""A JSON body Python's parser chokes on is answered 422 ``invalid_request`` in plain words.

Invalid UTF-8, arrays nested thousands of levels deep and integers over Python's
digit limit made FastAPI's body read fail outside JSON decoding: a 400
``bad_request`` "There was an error parsing the body", unlike every other
unreadable body. The other oddities JSON allows (NaN, duplicate keys, a BOM,
lone surrogate escapes) are accepted or refused with a reason, never a 500.
Over a real ``bertstream serve``.
"""

from __future__ import annotations

import sys
from typing import Any

import httpx
import pytest

from api.security import MAX_BODY_DEPTH
from contract.settings import Settings

JSON = {"content-type": "application/json"}
DIGITS = sys.get_int_max_str_digits()
DEEP = f"the body is nested too deeply (at most {MAX_BODY_DEPTH} levels)"
LONG = f"the body holds a number of more than {DIGITS} digits"


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


#: (body, status, code, the whole message)
REFUSED: list[tuple[bytes, int, str, str]] = [
    (b'{"text":"a\xff b"}', 422, "invalid_request",
     "the body is not valid UTF-8 (byte 11: invalid start byte)"),
    # a surrogate encoded as UTF-8 bytes (CESU-8) is no UTF-8 either
    (b'{"text":"a\xed\xa0\x80"}', 422, "invalid_request",
     "the body is not valid UTF-8 (byte 11: invalid continuation byte)"),
    (b'{"text":"\xe4\xbd', 422, "invalid_request",
     "the body is not valid UTF-8 (byte 10: unexpected end of data)"),
    (b'\xef\xbb\xbf{"text":"\xc0"}', 422, "invalid_request",
     "the body is not valid UTF-8 (byte 13: invalid start byte)"),
    (nested(5000), 422, "invalid_request", DEEP),
    (b"[" * 5000, 422, "invalid_request", DEEP),
    (b'{"text":"a","meta":{"x":' + nested(2000) + b"}}", 422, "invalid_request", DEEP),
    (nested(MAX_BODY_DEPTH + 1), 422, "invalid_request", DEEP),
    (b'{"items":[' + nested(MAX_BODY_DEPTH - 1) + b"]}", 422, "invalid_request", DEEP),
    (nested(MAX_BODY_DEPTH), 422, "invalid_request",
     "the body must be a JSON object, not an array"),
    (b'{"text":"a","meta":{"n":' + b"9" * (DIGITS + 1) + b"}}", 422, "invalid_request", LONG),
    (b'{"items":[-' + b"1" * 10_000 + b"]}", 422, "invalid_request", LONG),
    (b'{"text":' + b"9" * 5000 + b"}", 422, "invalid_request", LONG),
    # JSON's oddities that decode, refused by the validation of what they became
    (b'{"text":"a","meta":{"n":NaN}}', 422, "invalid_input",
     "meta is not JSON-serialisable: it holds a number that is not finite"),
    (b'{"text":"a","meta":{"n":-Infinity}}', 422, "invalid_input",
     "meta is not JSON-serialisable: it holds a number that is not finite"),
    (b'{"text":"a","meta":{"n":1e400}}', 422, "invalid_input",
     "meta is not JSON-serialisable: it holds a number that is not finite"),
    (b'{"text":NaN}', 422, "invalid_request", "text: must be a string"),
    (b'{"items":[Infinity]}', 422, "invalid_input",
     "no item was accepted; item 0: item must be a string or an object with 'text', got float"),
    (b'{"text":"a\\ud800"}', 422, "invalid_input",
     "text is not valid Unicode (surrogates not allowed at index 1)"),
    (b'{"text":"a","id":"x\\udfff"}', 422, "invalid_input",
     "id is not valid Unicode (lone surrogate)"),
    (b'{"text":"a","meta":{"\\ud800":1}}', 422, "invalid_input",
     "meta is not JSON-serialisable: it holds a string with NUL or a lone surrogate"),
    # pydantic's own "unable to parse raw data as a unicode string", in plain words
    (b'{"text":"a","model":"\\ud800"}', 422, "invalid_request",
     "model: must be valid Unicode (no lone surrogate)"),
    (b'{"text":"a","\\ud800":1}', 422, "invalid_request",
     "a field name is not valid Unicode (lone surrogate)"),
    (b'{"items":["a"],"\\udc00x":1}', 422, "invalid_request",
     "a field name is not valid Unicode (lone surrogate)"),
    (b'{"items":["a"],"source":"\\ud800"}', 422, "invalid_input",
     "no item was accepted; item 0: source is not valid Unicode (lone surrogate)"),
]


@pytest.fixture
def api(redis_url: str, sqlite_url: str, api_factory: Any) -> Any:
    return api_factory(Settings(broker_url=redis_url, database_url=sqlite_url))


def test_unparseable_bodies_get_422_with_a_reason(api: Any) -> None:
    wrong = []
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for body, status, code, message in REFUSED:
            r = http.post("/v1/tasks", content=body, headers=JSON)
            got = (r.status_code, r.json())
            if got != (status, {"error": {"code": code, "message": message}}):
                wrong.append((body[:60], got, (status, code, message)))
    assert not wrong, "\n".join(f"{b!r}: got {g}, expected {e}" for b, g, e in wrong)
    log = api.log()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_json_oddities_that_mean_something_are_accepted(api: Any) -> None:
    with httpx.Client(base_url=api.url, timeout=30) as http:
        def post(body: bytes) -> httpx.Response:
            return http.post("/v1/tasks", content=body, headers=JSON)

        # a UTF-8 byte order mark is skipped; UTF-16 and UTF-32 (RFC 4627) are read
        assert post(b'\xef\xbb\xbf{"text":"bom","id":"bom-1"}').status_code == 202
        assert post('{"text":"utf16"}'.encode("utf-16")).status_code == 202
        assert post('{"text":"utf32"}'.encode("utf-32-le")).status_code == 202
        # a duplicate key: the last one counts, as in JavaScript's JSON.parse
        r = post(b'{"text":"first","text":"second","id":"dup-1"}')
        assert r.json() == {"id": "dup-1", "status": "queued", "duplicate": False}, r.text
        assert post(b'{"text":"second","id":"dup-1"}').json()["duplicate"] is True
        assert post(b'{"text":"first","id":"dup-1"}').status_code == 409
        # a float of many digits is a float; an integer at the digit limit is an integer
        assert post(b'{"text":"a","meta":{"f":1.' + b"9" * 5000 + b"}}").status_code == 202
        r = post(b'{"text":"b","meta":{"n":' + b"9" * DIGITS + b"}}")
        assert r.status_code == 202, r.text
        # nested as deep as meta may be: meta's own limit, not the body's, answers
        deep_meta = b'{"text":"c","meta":{"x":' + nested(40) + b"}}"
        assert "nested deeper than 32" in post(deep_meta).json()["error"]["message"]
        ok_meta = b'{"items":[{"text":"d","meta":{"x":' + nested(30) + b"}}]}"
        assert post(ok_meta).json()["accepted"] == 1
    log = api.log()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_a_refused_bulk_id_with_a_lone_surrogate_is_echoed(api: Any) -> None:
    """The answer names a refused item by the id its caller gave; one holding a lone
    surrogate (``"\\udfff"``, which UTF-8 cannot hold) made rendering the 202 fail: a 500."""
    body = b'{"items":["fine",{"text":"a","id":"x\\udfff"}]}'
    r = httpx.post(api.url + "/v1/tasks", content=body, headers=JSON, timeout=30)
    assert r.status_code == 202, r.text
    assert b'"id":"x\\udfff"' in r.content  # escaped as the request had it
    assert r.json()["errors"] == [{"index": 1, "id": "x\udfff",
                                   "reason": "id is not valid Unicode (lone surrogate)"}]
    assert r.json()["accepted"] == 1
    log = api.log()
    assert "Traceback" not in log and "ERROR" not in log, log
