"""Bearer tokens compared in constant time, request body limits, security headers, and
who may bind where.

Tokens come from ``BERTSTREAM_API_TOKENS`` only (secrets live in the
environment), and are checked before a body is read. Without tokens the server is
open, so ``serve`` binds to loopback only unless the operator says ``--no-auth``. A
body is bounded in bytes and in the time it takes to arrive, and never decompressed
(:class:`BodyLimit`), and, as JSON, in nesting and digits (:class:`JsonBodyRoute`); a
request head in time (:class:`HeadDeadlineH11`). Every answer carries the headers of
:class:`SecurityHeaders`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping, Sequence
from typing import Any

import h11
from fastapi import Request, Response
from fastapi.routing import APIRoute
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.errors import ApiError, UnreadableBody, error_body
from api.waiter import release_all

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


#: Seconds a request body may take to arrive beyond the time its bytes earn at
#: :data:`BODY_MIN_RATE`: a body that stalls is answered 408, so that a client sending a
#: byte now and then (a slowloris) cannot hold a connection and a request forever.
BODY_TIMEOUT_S = 30.0
#: Bytes per second a slow body must keep up: each byte received extends the deadline by
#: ``1 / BODY_MIN_RATE`` seconds.
BODY_MIN_RATE = 10_000


class _BodyRefused(Exception):
    """The request body passed the limit or its deadline while the app was reading it."""


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, bodies that do
    not arrive in time with 408, and compressed bodies with 415.

    Checks ``Content-Length`` up front and counts the bytes of a chunked body
    as they arrive, so a client cannot stream past the limit either. The body must
    arrive within ``timeout_s`` (default :data:`BODY_TIMEOUT_S`) plus a second per
    ``min_rate`` bytes received (default :data:`BODY_MIN_RATE`). A body is never
    decompressed: one sent with a ``Content-Encoding`` (gzip, deflate, br) would be read
    as its compressed bytes, so it is refused, naming the encoding.
    """

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float | None = None,
                 min_rate: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = BODY_TIMEOUT_S if timeout_s is None else timeout_s
        self.min_rate = BODY_MIN_RATE if min_rate is None else min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip()
        if encoding and encoding.lower() != "identity":
            await _answer(send, 415, "unsupported_media_type",
                          f"the body is sent with Content-Encoding {encoding[:40]!r}: send it "
                          "uncompressed (this server decompresses no request body)")
            return
        if self._declared(headers) > self.limit:
            await _answer(send, 413, "too_large",
                          f"request body over the limit of {self.limit} bytes")
            return
        body = _BodyWatch(self, receive, send)
        try:
            await self.app(scope, body.receive, body.send)
        except _BodyRefused:
            if not body.answered and body.refused:
                await _answer(send, *body.refused)

    def _declared(self, headers: dict[bytes, bytes]) -> int:
        """The Content-Length header (0 when absent; over the limit when unreadable)."""
        length = headers.get(b"content-length")
        if length is None:
            return 0
        try:
            return int(length)
        except ValueError:
            return self.limit + 1


class _BodyWatch:
    """One request's body as :class:`BodyLimit` lets the app read it: counted against the
    limit and the deadline (:attr:`refused` says which it passed); the app's answer is
    replaced by that refusal."""

    def __init__(self, owner: BodyLimit, receive: Receive, send: Send) -> None:
        self.owner, self._receive, self._send = owner, receive, send
        self.seen = 0
        self.refused: tuple[int, str, str] | None = None
        self.complete = self.answered = False
        self.started = asyncio.get_running_loop().time()

    async def receive(self) -> Message:
        if self.complete:  # the body is read: what is left is waiting for a disconnect
            return await self._receive()
        limit = self.owner
        left = (self.started + limit.timeout_s + self.seen / limit.min_rate
                - asyncio.get_running_loop().time())
        try:
            message = await asyncio.wait_for(self._receive(), max(left, 0.0))
        except TimeoutError:
            self.refused = (408, "request_timeout", "the request body did not arrive in "
                            f"time ({self.seen} bytes received)")
            raise _BodyRefused from None
        if message["type"] != "http.request":
            self.complete = True
        elif not self.refused:
            self.seen += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.seen > limit.limit:
                # The body read fails: a body cut short here could still be a valid
                # request, which the route would carry out before its answer was
                # replaced. The app's answer (its error) is replaced by the 413.
                self.refused = (413, "too_large",
                                f"request body over the limit of {limit.limit} bytes")
                raise _BodyRefused
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            if not self.answered and message["type"] == "http.response.start":
                self.answered = True
                await _answer(self._send, *self.refused)
            return
        if message["type"] == "http.response.start":
            self.answered = True
        await self._send(message)


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    """Send a JSON error from outside the app. A refused body may be partly unread: the
    connection is closed after the answer, never read on as a next request."""
    body = json.dumps(error_body(code, message), separators=(",", ":")).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode("ascii")),
                            (b"connection", b"close")]})
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
    400 "There was an error parsing the body".

    Its :class:`TokenCheck` dependencies run before the body is read: FastAPI reads and
    parses a body before it solves dependencies, so a caller without a token could make
    the server read and parse bodies up to the size limit, and was told what was wrong
    with its JSON instead of 401.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks = [d.dependency for d in self.dependencies if isinstance(d.dependency, TokenCheck)]

        async def strict(request: Request) -> Response:
            for check in checks:
                check(request)
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return strict


#: The Content-Security-Policy of every answer but the docs pages (:func:`docs_policy`): the
#: dashboard's page runs only its own script and style, reads only this server, and is never
#: framed (it shows submitted texts); an API answer, opened as a page, runs nothing.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def docs_policy(html: str, *, inline_styles: bool = False, blob_workers: bool = False) -> str:
    """The Content-Security-Policy of an interactive docs page (``api.docs``): scripts of
    this server and the page's own inline scripts (by their SHA-256, as the browser hashes
    them: the text between the tags), never another origin.

    ``inline_styles`` and ``blob_workers`` are for ReDoc, which writes its style sheet into
    the page and builds its search index in a worker made from a blob of its own script.
    """
    hashes = "".join(
        " 'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest())
        .decode("ascii") + "'" for script in _INLINE_SCRIPT.findall(html))
    styles = " 'unsafe-inline'" if inline_styles else ""
    workers = " worker-src blob:;" if blob_workers else ""
    return (f"default-src 'none'; script-src 'self'{hashes};{workers} "
            f"style-src 'self'{styles}; img-src 'self' data:; font-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class SecurityHeaders:
    """ASGI middleware: the headers a server showing user-submitted texts owes every answer.

    ``X-Content-Type-Options: nosniff`` (a JSON answer echoing a text is never sniffed as
    HTML), no framing (``X-Frame-Options`` and ``frame-ancestors``), ``Referrer-Policy:
    no-referrer`` (the dashboard's URL holds its search), :data:`CONTENT_SECURITY_POLICY`,
    and ``Cache-Control: no-store`` on the answers under ``private`` (path prefixes:
    texts, results, metrics). A header the route set itself is kept: the docs pages set
    their own CSP (:func:`docs_policy`).
    """

    def __init__(self, app: ASGIApp, private: Sequence[str]) -> None:
        self.app = app
        self.private = tuple(private)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        root = str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root):]
        added = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                 (b"referrer-policy", b"no-referrer"),
                 (b"content-security-policy", CONTENT_SECURITY_POLICY.encode("ascii"))]
        if path.startswith(self.private):
            added.append((b"cache-control", b"no-store"))

        async def adding(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in added if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, adding)


#: Seconds a client has to send a whole request head (line and headers), from its first
#: byte or from the connection's start.
HEAD_TIMEOUT_S = 10.0


class HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head.

    uvicorn times out only a keep-alive connection idle after an answer: one that sends
    part of a head (or nothing) and stops was held for ever, and enough of them exhaust
    the server's connections. Here the connection is closed when a head is not complete
    within :attr:`head_timeout_s` of the connection's start or of its first byte.
    """

    head_timeout_s = HEAD_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            if self._head_timer is None:  # a later request's head began
                self._arm_head_timer()
        else:
            self._stop_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        # The server is stopping: its long polls answer now rather than hold the exit.
        release_all()
        super().shutdown()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.debug("closing a connection whose request head did not arrive in "
                              "%.0f s", self.head_timeout_s)
            self.transport.close()
