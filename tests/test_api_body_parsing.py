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

import httpx
import pytest

from api.security import MAX_BODY_DEPTH
from tests.api_bodies import JSON, Refused, cases, check_refused
from worker.process import ServeProc

DIGITS = sys.get_int_max_str_digits()
DEEP = f"the body is nested too deeply (at most {MAX_BODY_DEPTH} levels)"
LONG = f"the body holds a number of more than {DIGITS} digits"
NOT_FINITE = "meta is not JSON-serialisable: it holds a number that is not finite"
INPUT = "invalid_input"


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


REFUSED = [
    Refused(b'{"text":"a\xff b"}', "the body is not valid UTF-8 (byte 11: invalid start byte)"),
    # a surrogate encoded as UTF-8 bytes (CESU-8) is no UTF-8 either
    Refused(b'{"text":"a\xed\xa0\x80"}',
            "the body is not valid UTF-8 (byte 11: invalid continuation byte)"),
    Refused(b'{"text":"\xe4\xbd', "the body is not valid UTF-8 (byte 10: unexpected end of data)"),
    Refused(b'\xef\xbb\xbf{"text":"\xc0"}',
            "the body is not valid UTF-8 (byte 13: invalid start byte)"),
    Refused(nested(5000), DEEP),
    Refused(b"[" * 5000, DEEP),
    Refused(b'{"text":"a","meta":{"x":' + nested(2000) + b"}}", DEEP),
    Refused(nested(MAX_BODY_DEPTH + 1), DEEP),
    Refused(b'{"items":[' + nested(MAX_BODY_DEPTH - 1) + b"]}", DEEP),
    Refused(nested(MAX_BODY_DEPTH), "the body must be a JSON object, not an array"),
    Refused(b'{"text":"a","meta":{"n":' + b"9" * (DIGITS + 1) + b"}}", LONG),
    Refused(b'{"items":[-' + b"1" * 10_000 + b"]}", LONG),
    Refused(b'{"text":' + b"9" * 5000 + b"}", LONG),
    # JSON's oddities that decode, refused by the validation of what they became
    Refused(b'{"text":"a","meta":{"n":NaN}}', NOT_FINITE, INPUT),
    Refused(b'{"text":"a","meta":{"n":-Infinity}}', NOT_FINITE, INPUT),
    Refused(b'{"text":"a","meta":{"n":1e400}}', NOT_FINITE, INPUT),
    Refused(b'{"text":NaN}', "text: must be a string"),
    Refused(b'{"items":[Infinity]}', "no item was accepted; item 0: item must be a string or "
                                     "an object with 'text', got float", INPUT),
    Refused(b'{"text":"a\\ud800"}',
            "text is not valid Unicode (surrogates not allowed at index 1)", INPUT),
    Refused(b'{"text":"a","id":"x\\udfff"}', "id is not valid Unicode (lone surrogate)", INPUT),
    Refused(b'{"text":"a","meta":{"\\ud800":1}}', "meta is not JSON-serialisable: it holds a "
                                                  "string with NUL or a lone surrogate", INPUT),
    # pydantic's own "unable to parse raw data as a unicode string", in plain words
    Refused(b'{"text":"a","model":"\\ud800"}', "model: must be valid Unicode (no lone surrogate)"),
    Refused(b'{"text":"a","\\ud800":1}', "a field name is not valid Unicode (lone surrogate)"),
    Refused(b'{"items":["a"],"\\udc00x":1}', "a field name is not valid Unicode (lone surrogate)"),
    Refused(b'{"items":["a"],"source":"\\ud800"}',
            "no item was accepted; item 0: source is not valid Unicode (lone surrogate)", INPUT),
]


@pytest.mark.parametrize("case", cases(REFUSED))
def test_unparseable_bodies_get_422_with_a_reason(case: Refused, module_api: ServeProc) -> None:
    check_refused(module_api, case)


def test_json_oddities_that_mean_something_are_accepted(module_api: ServeProc) -> None:
    with httpx.Client(base_url=module_api.url, timeout=30) as http:
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
    log = module_api.log()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_a_refused_bulk_id_with_a_lone_surrogate_is_echoed(module_api: ServeProc) -> None:
    """The answer names a refused item by the id its caller gave; one holding a lone
    surrogate (``"\\udfff"``, which UTF-8 cannot hold) made rendering the 202 fail: a 500."""
    body = b'{"items":["fine",{"text":"a","id":"x\\udfff"}]}'
    r = httpx.post(module_api.url + "/v1/tasks", content=body, headers=JSON, timeout=30)
    assert r.status_code == 202, r.text
    assert b'"id":"x\\udfff"' in r.content  # escaped as the request had it
    assert r.json()["errors"] == [{"index": 1, "id": "x\udfff",
                                   "reason": "id is not valid Unicode (lone surrogate)"}]
    assert r.json()["accepted"] == 1
    log = module_api.log()
    assert "Traceback" not in log and "ERROR" not in log, log
