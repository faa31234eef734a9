"""Bearer tokens compared in constant time, a request body limit, and who may bind where.

Tokens come from ``BERTSTREAM_API_TOKENS`` only (secrets live in the
environment). Without tokens the server is open, so ``serve`` binds to
loopback only unless the operator says ``--no-auth``.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request

from api.errors import ApiError, error_body

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
        import json

        body = json.dumps(error_body(
            "too_large", f"request body over the limit of {self.limit} bytes")).encode("utf-8")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode("ascii"))]})
        await send({"type": "http.response.body", "body": body})
