"""Every error as JSON ``{"error": {"code", "message"}}`` with its status, never a traceback."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.logthrottle import RefusalLog, bug_key, cause_key
from contract.broker import BrokerMisconfigured, broker_error
from contract.constants import ENV_PREFIX
from contract.errors import (
    BertstreamError,
    BrokerUnavailable,
    InvalidInput,
    SchemaMismatch,
    StoreRefused,
    StoreUnavailable,
    causes,
)
from contract.settings import Settings
from producer.client import missing_schema

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API answers with ``status`` and a stable ``code``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def refusals(request: Request) -> RefusalLog:
    """The app's :class:`~api.logthrottle.RefusalLog` (:func:`install`): its refusals'
    lines, the repeats of each kind and cause summed."""
    found: RefusalLog = request.app.state.refusals
    return found


class UnreadableBody(StarletteHTTPException):
    """A request body that is no JSON document (``api.security.read_json`` says why):
    answered 422 ``invalid_request``, as other unreadable bodies are.

    An HTTP exception because FastAPI passes only those on from its body read; it
    makes any other error there a 400 "There was an error parsing the body".
    """

    def __init__(self, message: str) -> None:
        super().__init__(422, message)


class JsonAnswer(JSONResponse):
    """JSON as Starlette renders it, except that a string holding a lone surrogate, which
    UTF-8 cannot hold but JSON can escape (``"\\ud800"``), is escaped instead of failing
    the answer with a 500: a refused bulk item is named by the id its caller sent."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False,
                              separators=(",", ":")).encode("ascii")


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON body of an error."""
    return {"error": {"code": code, "message": message}}


def misconfigured_broker(exc: BrokerMisconfigured) -> str:
    """What Redis refuses of the broker URL, named by its setting: no host, no user, no
    password (a client, or anyone reading ``/readyz``, sees it; the server's log has the
    URL, its password masked)."""
    return f"{ENV_PREFIX}BROKER_URL: {exc.problem}"


def redis_check(settings: Settings, exc: BaseException) -> str:
    """How a health answer (``/readyz``) names a failed Redis read: ``misconfigured:``
    and what Redis refuses of the broker URL (:func:`contract.broker.broker_error`), which
    no wait mends, else ``unreachable:`` and the type of the driver's error (an outage):
    the one under a :class:`BrokerUnavailable` the client raised from it, so ``/readyz``
    (which pings Redis itself) and ``/v1/live`` (which reads through the client) name the
    same cause."""
    error = exc if isinstance(exc, BrokerMisconfigured) else broker_error(settings, exc)
    if isinstance(error, BrokerMisconfigured):
        return f"misconfigured: {misconfigured_broker(error)}"
    driver = next((c for c in causes(exc) if not isinstance(c, BertstreamError)), exc)
    return f"unreachable: {type(driver).__name__}"


async def _broker_misconfigured(request: Request, exc: BrokerMisconfigured) -> JSONResponse:
    """Redis answers but refuses the broker URL (a database index it lacks, credentials it
    does not take): a 503 as for a schema behind the code, the service being down until
    its operator acts, but without Retry-After or "retry later": waiting mends nothing.
    An error in the log (a setting to fix), its repeats summed."""
    refusals(request).note("answering 503 broker_misconfigured", cause_key(exc), logging.ERROR,
                           "answering 503 broker_misconfigured: Redis refuses the broker URL: "
                           "%s", exc)
    return _json(503, "broker_misconfigured", f"the server's broker setting is wrong "
                 f"({misconfigured_broker(exc)}); retrying will not help until its operator "
                 f"fixes it")


def _json(status: int, code: str, message: str,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JsonAnswer(error_body(code, message), status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "too_large",
               415: "unsupported_media_type", 429: "busy"}


class InternalErrors:
    """ASGI middleware, the innermost: an unexpected exception is answered here with the
    JSON 500, so the middlewares outside it (CORS, security headers) add their headers.

    Starlette answers one from its outermost middleware, past all of them: a 500 had no
    security headers and, for a browser page, no CORS header (it saw a network error).
    The error is logged here on the app's :class:`~api.logthrottle.RefusalLog` (its
    traceback the first time, its repeats summed) and goes no further: raised on, it
    reached uvicorn, which logged its traceback again for every request (a bug hit under
    load, one traceback per request). An answer already started is left to break, as a
    failed stream must (the exception goes on to the server).
    """

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusals: RefusalLog = scope["app"].state.refusals  # read before a mount changes it
        started = False

        async def sending(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            _log_unexpected(refusals, exc)
            answer = _json(500, "internal_error", f"internal error ({type(exc).__name__})")
            await answer(scope, receive, send)


def _log_unexpected(refusals: RefusalLog, exc: Exception) -> None:
    """An unexpected error's line: its traceback the first time, its repeats summed."""
    refusals.note("answering 500 internal_error (unhandled)", bug_key(exc), logging.ERROR,
                  "unhandled error in the API", exc_info=exc)


async def _store_refused(request: Request, exc: StoreRefused) -> JSONResponse:
    """The database refuses this server what a setting decides (a privilege, USAGE on the
    results' schema, a login): 503 as /readyz's ``misconfigured``, naming what to grant or
    fix, without Retry-After, as :func:`_broker_misconfigured` for Redis: waiting mends
    nothing. "Cannot be reached, retry later" sent a caller waiting for an operator's
    GRANT. An error in the log, its repeats summed."""
    refusals(request).note("answering 503 database_misconfigured", cause_key(exc),
                           logging.ERROR, "answering 503 database_misconfigured: the database "
                           "refuses this server: %s", exc)
    return _json(503, "database_misconfigured", f"the server's database setting is wrong "
                 f"({exc.problem}); retrying will not help until its operator fixes it")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the JSON error form, and
    :class:`InternalErrors` (call this before adding any other middleware). Their log
    lines go through the app's :class:`~api.logthrottle.RefusalLog` (``app.state``)."""
    app.state.refusals = RefusalLog(log)
    app.add_middleware(InternalErrors)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _json(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(InvalidInput)
    async def invalid(_request: Request, exc: InvalidInput) -> JSONResponse:
        return _json(422, "invalid_input", str(exc))

    # An outage's details (hosts, ports, database and user names) are for the server's
    # log; a client is told what is down and when to retry.
    @app.exception_handler(BrokerUnavailable)
    async def broker_down(request: Request, exc: BrokerUnavailable) -> JSONResponse:
        refusals(request).note("answering 503 broker_unavailable", cause_key(exc),
                               logging.WARNING, "answering 503 broker_unavailable: %s", exc)
        return _json(503, "broker_unavailable", "the queue (Redis) cannot be reached; retry "
                     "later", {"Retry-After": "5"})

    app.exception_handler(BrokerMisconfigured)(_broker_misconfigured)
    app.exception_handler(StoreRefused)(_store_refused)

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # a table or column gone under a running API (`bertstream db downgrade`) is no
        # outage: the schema is read again, and one behind the code named as such
        services = getattr(request.app.state, "services", None)
        if services is not None and missing_schema(exc):
            try:
                await run_in_threadpool(services.client.recheck_schema, exc)
            except SchemaMismatch as mismatch:
                return _json(503, "schema_mismatch", str(mismatch))
        refusals(request).note("answering 503 database_unavailable", cause_key(exc),
                               logging.WARNING, "answering 503 database_unavailable: %s", exc)
        return _json(503, "database_unavailable", "the results database cannot be reached; "
                     "retry later", {"Retry-After": "5"})

    @app.exception_handler(SchemaMismatch)
    async def schema_mismatch(_request: Request, exc: SchemaMismatch) -> JSONResponse:
        return _json(503, "schema_mismatch", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json(422, "invalid_request",
                     validation_message(exc, request.headers.get("content-type")))

    @app.exception_handler(UnreadableBody)
    async def unreadable(_request: Request, exc: UnreadableBody) -> JSONResponse:
        return _json(422, "invalid_request", str(exc.detail))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _json(exc.status_code, code, str(exc.detail),
                     dict(exc.headers) if exc.headers else None)

    # Logs the error, and answers one raised outside InternalErrors (in a middleware).
    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log_unexpected(refusals(request), exc)
        return _json(500, "internal_error", f"internal error ({type(exc).__name__})")


#: The shapes of ``POST /v1/tasks``'s body (``api.app``'s ``TaskIn | BulkIn``) by the field
#: that marks each. pydantic reports a union's errors for every shape, under its name; the
#: caller meant the one whose field the body has.
BODY_SHAPES = {"text": "TaskIn", "items": "BulkIn"}
_NEEDS = '"text" (or "items" for many)'
EMPTY_BODY = f"the body is empty: send a JSON object with {_NEEDS}"
#: Most errors one message lists.
_SHOWN = 5
_PLAIN = {"missing": "required", "extra_forbidden": "unknown field",
          "string_type": "must be a string", "dict_type": "must be a JSON object",
          "model_type": "must be a JSON object", "model_attributes_type": "must be a JSON object",
          "list_type": "must be a list", "int_type": "must be an integer",
          "int_parsing": "must be an integer", "bool_type": "must be true or false",
          "bool_parsing": "must be true or false",
          "string_unicode": "must be valid Unicode (no lone surrogate)"}


def validation_message(exc: RequestValidationError, content_type: str | None) -> str:
    """One message for a request FastAPI could not validate.

    Errors of the body are said in plain words, those of the shape the caller meant
    only (:data:`BODY_SHAPES`); a body that is no JSON object, or no JSON at all, is
    said as such. Others (query parameters) read ``query.NAME: pydantic's message``.
    """
    errors = list(exc.errors())
    body = [e for e in errors if tuple(e.get("loc", ()))[:1] == ("body",)]
    parts = [_body_message(body, exc.body, content_type)] if body else []
    for err in [e for e in errors if e not in body][:_SHOWN]:
        where = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def _body_message(errors: Sequence[Any], body: Any, content_type: str | None) -> str:
    first = errors[0]
    if first.get("type") == "json_invalid":
        doc = body if isinstance(body, str) else ""
        if not doc.strip():
            return EMPTY_BODY
        return f"the body is not valid JSON ({_position(doc, first)})"
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
        return EMPTY_BODY
    if isinstance(body, bytes | bytearray):  # a Content-Type other than JSON: not parsed
        media = (content_type or "").split(";")[0].strip()
        return ("the body must be a JSON object sent as Content-Type: application/json "
                + (f"(not {media})" if media else "(the request had no Content-Type)"))
    if not isinstance(body, dict):
        return f"the body must be a JSON object, not {_json_kind(body)}"
    marks = [field for field in BODY_SHAPES if field in body]
    if len(marks) > 1:
        return 'send "text" (one task) or "items" (many), not both'
    shape = BODY_SHAPES[marks[0] if marks else "text"]
    parts: list[str] = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ())][1:]
        if loc[:1] and loc[0] in BODY_SHAPES.values():
            if loc[0] != shape:
                continue
            loc = loc[1:]
        if not marks and err.get("type") == "missing" and loc == ["text"]:
            parts.insert(0, f"the body needs {_NEEDS}")
        elif not loc and err.get("type") == "string_unicode":  # pydantic names no key
            parts.append("a field name is not valid Unicode (lone surrogate)")
        else:
            parts.append(f"{'.'.join(loc)}: {_plain(err)}" if loc else _plain(err))
    return "; ".join(parts[:_SHOWN]) or "invalid request body"


def _position(doc: str, err: Any) -> str:
    """Where a JSON document broke, as line and column (1-based), and why."""
    loc = tuple(err.get("loc", ()))
    pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
    line = doc.count("\n", 0, pos) + 1
    column = pos - doc.rfind("\n", 0, pos)
    reason = str((err.get("ctx") or {}).get("error") or "").strip()
    reason = reason[:1].lower() + reason[1:]
    return f"line {line}, column {column}" + (f": {reason}" if reason else "")


def _plain(err: Any) -> str:
    """One validation error's message in plain words (pydantic's ``Input should be X``
    as ``must be X``)."""
    plain = _PLAIN.get(str(err.get("type")))
    return plain or re.sub(r"^\w+ should ", "must ", str(err.get("msg")))


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    return "an array" if isinstance(value, list) else "a string"
