"""Every error as JSON ``{"error": {"code", "message"}}`` with its status, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.errors import BrokerUnavailable, InvalidInput, SchemaMismatch, StoreUnavailable
from producer.client import missing_schema

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API answers with ``status`` and a stable ``code``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON body of an error."""
    return {"error": {"code": code, "message": message}}


def _json(status: int, code: str, message: str,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "too_large",
               415: "unsupported_media_type", 429: "busy"}


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the JSON error form."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _json(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(InvalidInput)
    async def invalid(_request: Request, exc: InvalidInput) -> JSONResponse:
        return _json(422, "invalid_input", str(exc))

    # An outage's details (hosts, ports, database and user names) are for the server's
    # log; a client is told what is down and when to retry.
    @app.exception_handler(BrokerUnavailable)
    async def broker_down(_request: Request, exc: BrokerUnavailable) -> JSONResponse:
        log.warning("answering 503: %s", exc)
        return _json(503, "broker_unavailable", "the queue (Redis) cannot be reached; retry "
                     "later", {"Retry-After": "5"})

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
        log.warning("answering 503: %s", exc)
        return _json(503, "database_unavailable", "the results database cannot be reached; "
                     "retry later", {"Retry-After": "5"})

    @app.exception_handler(SchemaMismatch)
    async def schema_mismatch(_request: Request, exc: SchemaMismatch) -> JSONResponse:
        return _json(503, "schema_mismatch", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _json(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _json(exc.status_code, code, str(exc.detail),
                     dict(exc.headers) if exc.headers else None)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the API")
        return _json(500, "internal_error", f"internal error ({type(exc).__name__})")
