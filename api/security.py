"""Bearer tokens compared in constant time, request body limits, and who may bind where.

Tokens come from ``BERTSTREAM_API_TOKENS`` only (secrets live in the
environment). Without tokens the server is open, so ``serve`` binds to
loopback only unless the operator says ``--no-auth``. A body is bounded in
bytes (:class:`BodyLimit`) and, as JSON, in nesting and digits
(:class:`JsonBodyRoute`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from api.errors import ApiError, UnreadableBody, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenCheck:
    """A FastAPI dependency: the request must carry ``Authorization: Bearer <a token>``.

    Every configured token is compared (``hmac.compare_digest``) whatever the
    outcome, so the time taken does not tell which one nearly matched.
    With no tokens configured it lets every request through.
    """

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = [t.encode("utf-8") for t in tokens]

    def __call__(self, request: Request) -> None:
        if not self.tokens:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        candidate = given.strip().encode("utf-8")
        ok = False
        for token in self.tokens:
            ok |= hmac.compare_digest(candidate, token)
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(401, "unauthorized", "a valid bearer token is required",
                           {"WWW-Authenticate": "Bearer"})


class _BodyOverLimit(Exception):
    """A chunked request body passed the limit while the app was reading it."""


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413.

    Checks ``Content-Length`` up front and counts the bytes of a chunked body
    as they arrive, so a client cannot stream past the limit either.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._declared(scope) > self.limit:
            await self._refuse(send)
            return
        seen = 0
        refused = False

        async def counting() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # The body read fails: a body cut short here could still be a valid
                    # request, which the route would carry out before its answer was
                    # replaced. The app's answer (its error) is replaced by the 413 below.
                    refused = True
                    raise _BodyOverLimit
            return message

        answered = False

        async def replacing(message: Message) -> None:
            nonlocal answered
            if refused:
                if not answered and message["type"] == "http.response.start":
                    answered = True
                    await self._refuse(send)
                return
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        try:
            await self.app(scope, counting, replacing)
        except _BodyOverLimit:
            if not answered:
                await self._refuse(send)

    def _declared(self, scope: Scope) -> int:
        """The Content-Length header (0 when absent; over the limit when unreadable)."""
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is None:
            return 0
        try:
            return int(length)
        except ValueError:
            return self.limit + 1

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(error_body(
            "too_large", f"request body over the limit of {self.limit} bytes")).encode("utf-8")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode("ascii"))]})
        await send({"type": "http.response.body", "body": body})


#: Deepest nesting of arrays and objects a JSON body may have (``meta``'s own limit,
#: ``contract.messages.MAX_META_DEPTH``, is well inside it).
MAX_BODY_DEPTH = 64
_UTF8_BOM = b"\xef\xbb\xbf"


def read_json(raw: bytes) -> Any:
    """The JSON document in a request body, or :class:`UnreadableBody` saying why not.

    The encoding is found as :func:`json.loads` finds it (UTF-8, a BOM skipped; UTF-16
    or -32) but decoded strictly, where ``json.loads`` let a surrogate's bytes through.
    Nesting deeper than :data:`MAX_BODY_DEPTH` and integers past Python's digit limit
    are refused too: FastAPI answered each of these 400 "There was an error parsing the
    body". Syntax errors stay :class:`json.JSONDecodeError`, which FastAPI reports as a
    validation error (``api.errors.validation_message``).
    """
    encoding, skipped = json.detect_encoding(raw), 0
    if raw.startswith(_UTF8_BOM):
        encoding, skipped = "utf-8", len(_UTF8_BOM)
    try:
        doc = raw[skipped:].decode(encoding)
    except UnicodeDecodeError as exc:
        name = encoding.upper().removesuffix("-LE").removesuffix("-BE")
        raise UnreadableBody(f"the body is not valid {name} "
                             f"(byte {skipped + exc.start + 1}: {exc.reason})") from None
    too_deep = UnreadableBody(f"the body is nested too deeply (at most {MAX_BODY_DEPTH} "
                              "levels)")
    try:
        value = json.loads(doc)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise too_deep from None
    except ValueError:  # the only other: int() of an integer past Python's digit limit
        raise UnreadableBody(f"the body holds a number of more than "
                             f"{sys.get_int_max_str_digits()} digits") from None
    if _deeper_than(value, MAX_BODY_DEPTH):
        raise too_deep
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """True when arrays and objects nest more than ``limit`` levels in ``value``
    (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False


class JsonBodyRequest(Request):
    """A request whose JSON body is read by :func:`read_json`."""

    async def json(self) -> Any:
        if not hasattr(self, "_read_json"):
            self._read_json = read_json(await self.body())
        return self._read_json


class JsonBodyRoute(APIRoute):
    """A route whose JSON body is read by :func:`read_json`: a body it refuses is a 422
    ``invalid_request`` with the reason, as other unreadable bodies are, not FastAPI's
    400 "There was an error parsing the body"."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return strict
