"""The routes of ``bertstream serve``: submit, status, results, stats, health and metrics.

Submits go through :class:`api.submit.Submitter` (idempotent ids,
backpressure) and, for single texts, :class:`api.submit.Coalescer` (one
message per lane per few milliseconds). Reads go through the producer
client's results store; long polls through :class:`api.waiter.Waiter`.
Blocking calls (Redis, the database) run in the server's thread pool.
"""


import asyncio
import contextlib
import csv
import dataclasses
import datetime as dt
import functools
import io
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

import redis
import sqlalchemy as sa
from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import Connection
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import dashboard, docs, errors, logthrottle
from api.errors import ApiError, JsonAnswer
from api.metrics import ApiMetrics
from api.security import BodyLimit, JsonBodyRoute, SecurityHeaders, TokenCheck
from api.submit import (
    ACCEPTED,
    CONFLICT,
    DUPLICATE,
    Coalescer,
    Outcome,
    Submitter,
    redis_failure,
)
from api.waiter import Waiter
from contract import migrate
from contract.broker import eviction_policy
from contract.constants import (
    DEFAULT_MODEL,
    ENV_PREFIX,
    LANE_BULK,
    LANE_INTERACTIVE,
    MODEL_NAME_PATTERN,
    served_name,
)
from contract.errors import (
    BertstreamError,
    ConfigError,
    InvalidInput,
    SchemaMismatch,
    StoreRefused,
    StoreUnavailable,
    quoted,
)
from contract.liveness import family_workers
from contract.queries import (
    MAX_STATS_LIMIT,
    STATS_LIMIT,
    Comparison,
    Filters,
    compare,
    decode_cursor,
    empty_range,
    iter_records,
    page,
    top_stats,
)
from contract.results import (
    ResultRecord,
    ResultStore,
    as_utc,
    brief_cause,
    utc_from_timestamp,
    utcnow,
)
from contract.results import results as results_table
from contract.settings import API_MODELS_ANY, Settings
from producer.client import Client
from producer.formatting import BOM, RECORD_FIELDS, csv_cells
from producer.items import ItemError, ItemValidator

log = logging.getLogger(__name__)

Lane = Literal["interactive", "bulk"]
Status = Literal["done", "failed", "expired"]
Lang = Literal["zh", "en", "mixed", "other"]


def _ttl_field(description: str) -> Any:
    """A ``ttl_s`` field: taken as sent and checked by the client's own rules
    (:class:`ItemValidator`), not coerced by pydantic, which would take "30" or true;
    shown in the OpenAPI schema as the number it must be."""
    return Field(None, description=description, json_schema_extra={
        "anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]})


class TaskIn(BaseModel):
    """One text to analyse."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="The text (UTF-8, not empty, at most BERTSTREAM_MAX_TEXT_CHARS)")
    id: str | None = Field(None, description="Your id: the idempotency key (default: a new UUID)")
    source: str | None = Field(None, description="A source tag to filter and group by")
    meta: dict[str, Any] | None = Field(None, description="Any JSON object, stored with the row")
    lane: Lane | None = Field(None, description="interactive (default) or bulk")
    model: str | None = Field(None, pattern=f"^{MODEL_NAME_PATTERN}$",
                              description="A named model (a worker started with --model "
                                          "NAME=PATH); default: the default model")
    ttl_s: Any = _ttl_field("Seconds the task stays worth running (a number > 0); still "
                            "queued after that, it is stored `expired` without reaching "
                            "the model. Default: no deadline")


class BulkIn(BaseModel):
    """Many texts at once; each item is a text or an object like a single task (no lane)."""

    model_config = ConfigDict(extra="forbid")
    items: list[Any] = Field(description="Texts or {text, id?, source?, meta?, ttl_s?} "
                                         "objects")
    source: str | None = Field(None, description="Source tag for items without their own")
    lane: Lane | None = Field(None, description="bulk (default) or interactive")
    model: str | None = Field(None, pattern=f"^{MODEL_NAME_PATTERN}$",
                              description="A named model for every item (default: the default "
                                          "model)")
    ttl_s: Any = _ttl_field("Seconds each item stays worth running (a number > 0) unless it "
                            "gives its own ttl_s; still queued after that, an item is stored "
                            "`expired` without reaching the model. Default: no deadline")


class Accepted(BaseModel):
    """A single submit's answer."""

    id: str
    status: Literal["queued", "done", "failed", "expired"] = Field(
        default="queued", description="queued; for a duplicate, the task's status now, as GET "
                              "/v1/tasks/{id} gives it (done once its row is stored)")
    duplicate: bool = Field(description="True when this id was already accepted with this text")


class ItemRefusal(BaseModel):
    """A refused bulk item."""

    index: int
    id: str | None
    reason: str


class BulkAccepted(BaseModel):
    """A bulk submit's answer: ids in input order (null where refused)."""

    ids: list[str | None]
    accepted: int
    duplicates: int
    errors: list[ItemRefusal]


def _view(record: ResultRecord) -> dict[str, Any]:
    out = record.to_json()
    if record.status != "done":
        out["reason"] = record.error
    return out


class ModelLane:
    """Submitting to one model: its settings, id claims, coalescing and queue bound.

    ``owned``: a client of its own, closed with the lane (a named model's lane
    may be closed while the server runs, see :meth:`Services.lane`).
    """

    def __init__(self, settings: Settings, client: Client, metrics: ApiMetrics, *,
                 owned: bool = False) -> None:
        self.settings = settings
        self.client, self.owned = client, owned
        self.submitter = Submitter(settings, client, on_message=metrics.published)
        self.coalescer = Coalescer(self.submitter, settings.api_coalesce_ms / 1000.0,
                                   settings.bulk_chunk_size)
        #: Requests submitting through the lane now, and when it was last taken.
        self.users = 0
        self.used_at = time.monotonic()

    def idle(self) -> bool:
        """No request is using the lane and its coalescer holds nothing unsent."""
        return self.users == 0 and self.coalescer.idle()

    def close(self) -> None:
        self.submitter.close()
        if self.owned:
            self.client.close()


#: Distinct models one API process holds lanes for at most (each holds a Redis connection).
MAX_MODELS = 32
#: Seconds the live workers read for :class:`ModelGate` are reused: a burst of submits
#: reads Redis once, and a worker that starts (or dies) counts after this long at most.
MODEL_LIVENESS_TTL_S = 1.0
#: Seconds a named model still passes :class:`ModelGate` after this server last saw a live
#: worker of it: a warm stop withdraws a worker's heartbeat at once, and the next one
#: beats only once its model is loaded, so a restart is no reason to refuse its tasks
#: (they wait queued for it, as they did before the gate).
MODEL_SEEN_GRACE_S = 300.0
#: Most model names a refusal lists.
SHOWN_MODELS = 10


def _names_said(names: list[str]) -> str:
    """``names`` as a refusal lists them: at most :data:`SHOWN_MODELS`, then how many more."""
    shown = ", ".join(names[:SHOWN_MODELS])
    more = len(names) - SHOWN_MODELS
    return shown + (f" (and {more} more)" if more > 0 else "")


class ModelGate:
    """Which models a submit may name (``BERTSTREAM_API_MODELS``), asked before a lane is
    opened: a name no worker consumes was accepted and stayed ``queued`` for good, its lane
    list and kombu binding left in Redis for good.

    The default model (this server's, and ``default``) always passes. A list: its names
    pass and no other, without a Redis read. ``*``: any name. Unset: a named model passes
    while a live worker serves it, by the heartbeats of every family of the queue (one read
    answers every name, and names the served models in a refusal), reused for
    :data:`MODEL_LIVENESS_TTL_S`, or while one did within :data:`MODEL_SEEN_GRACE_S` by
    this server's reads (a worker restarting). Thread-safe.
    """

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings, self.redis = settings, client
        names = settings.api_model_list()
        self.any = names == [API_MODELS_ANY]
        #: The names BERTSTREAM_API_MODELS lists (served names), None when it lists none.
        self.listed = (None if self.any or not names
                       else tuple(dict.fromkeys(served_name(n) for n in names)))
        #: Seconds a read of the live workers is reused (:data:`MODEL_LIVENESS_TTL_S`).
        self.ttl_s = MODEL_LIVENESS_TTL_S
        #: Seconds a model last seen served still passes (:data:`MODEL_SEEN_GRACE_S`).
        self.grace_s = MODEL_SEEN_GRACE_S
        self._lock = threading.Lock()
        self._served: tuple[float, frozenset[str]] | None = None
        #: When each model was last seen served (monotonic), for :attr:`grace_s`.
        self._seen: dict[str, float] = {}
        #: The names the default model's live workers store their rows under (last read).
        self._default_names: frozenset[str] = frozenset()

    def passes(self, name: str) -> bool | None:
        """Whether the model served as ``name`` ("": the default) passes, without reading
        Redis; None when that takes a fresh read of the heartbeats (:meth:`check`)."""
        if not name or name == self.settings.model_name or self.any:
            return True
        if self.listed is not None:
            return name in self.listed
        with self._lock:
            cached = self._served
        now = time.monotonic()
        if cached is None or now - cached[0] > self.ttl_s:
            return None
        return name in cached[1] or self._recent(name, now)

    def _recent(self, name: str, now: float) -> bool:
        """Whether a live worker of ``name`` was seen within :attr:`grace_s`."""
        with self._lock:
            seen = self._seen.get(name)
        return seen is not None and now - seen <= self.grace_s

    def check(self, name: str) -> None:
        """Raise the 404 ``unknown_model`` unless the model served as ``name`` passes; reads
        the heartbeats when the last read is stale (blocking). Redis unreachable or refusing
        the broker URL: its 503 (:func:`api.submit.redis_failure`), never an answer."""
        known = self.passes(name)
        served = None
        if known is None:
            served = self._read()
            known = name in served or self._recent(name, time.monotonic())
        if not known:
            raise self._refusal(name, served)

    def _read(self) -> frozenset[str]:
        """The models with a live worker now (served names, "" the default), remembered."""
        queue = self.settings.queue
        at = time.monotonic()
        try:
            alive = family_workers(self.redis, queue)
        except redis.RedisError as exc:
            raise redis_failure(self.settings, exc) from exc
        served = frozenset("" if w["family"] == queue else str(w["family"])[len(queue) + 1:]
                           for w in alive)
        default_names = frozenset(str(w["model"]) for w in alive
                                  if w["family"] == queue and w.get("model"))
        with self._lock:
            self._served = (at, served)
            self._default_names = default_names
            self._seen = {n: t for n, t in self._seen.items() if at - t <= self.grace_s}
            self._seen.update(dict.fromkeys(served, at))
        return served

    def _refusal(self, name: str, served: frozenset[str] | None) -> ApiError:
        key = f"{ENV_PREFIX}API_MODELS"
        if self.listed is not None:
            named = [n for n in self.listed if n]
            return ApiError(404, "unknown_model", f"model {name!r} is not one this server "
                            f"submits to: the default model and those {key} lists ("
                            f"{_names_said(named) or 'none'}); add {name} there to accept it")
        if served is None:
            with self._lock:
                cached = self._served
            served = cached[1] if cached is not None else frozenset()
        now = sorted(DEFAULT_MODEL if not n else n for n in served)
        with self._lock:
            stored_as_default = name in self._default_names
        if stored_as_default:
            # The name a web app reads off the default model's results ("model": ...).
            return ApiError(404, "unknown_model", f"{name!r} is the name the default "
                            f"model's results are stored under, not a model to submit to: "
                            f"leave model out (or send \"model\": \"{DEFAULT_MODEL}\") to "
                            f"submit to the default model")
        return ApiError(404, "unknown_model", f"no live worker serves model {name!r} (models "
                        f"served now: {_names_said(now) or 'none'}); start a worker with --model "
                        f"{name}=PATH, or set {key} on this server to accept it while none "
                        f"is alive ({key}={name}, or * for any name)")


class Services:
    """What the routes share; built in the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = Client(settings)
        self.metrics = ApiMetrics()
        self._lanes = {settings.model_name: ModelLane(settings, self.client, self.metrics)}
        self._lanes_lock = threading.Lock()
        self.submitter = self._lanes[settings.model_name].submitter
        self.coalescer = self._lanes[settings.model_name].coalescer
        # A status without a model reads the task's latest row, whatever this server's own
        # model: a task sent to another model is found too.
        self.waiter = Waiter(functools.partial(self.client.get_many, latest=True))
        self.metrics.watch(self.submitter.redis, settings, lambda: self.client.store)
        self.models = ModelGate(settings, self.submitter.redis)

    def _name(self, model: str | None) -> str:
        """The lane of ``model``: this server's model for None, the default model's ("")
        for ``default`` (as ``worker --model default=PATH`` serves it)."""
        return served_name(model) if model else self.settings.model_name

    def model_passes(self, model: str | None) -> bool | None:
        """Whether a submit may name ``model`` (None: the default), known without reading
        Redis (:meth:`ModelGate.passes`); None: :meth:`check_model` must read it."""
        return self.models.passes(self._name(model))

    def check_model(self, model: str | None) -> None:
        """Refuse (404 ``unknown_model``) a ``model`` no submit may name
        (:class:`ModelGate`); blocking. Before :meth:`lane`: a refused name opens none."""
        self.models.check(self._name(model))

    def settings_for(self, model: str | None) -> Settings:
        """The settings of submitting to ``model`` (None: the default), without opening a
        lane: a request is validated with them before it may use one up."""
        name = self._name(model)
        with self._lanes_lock:
            lane = self._lanes.get(name)
        return lane.settings if lane is not None else self.settings.replace(model_name=name)

    @contextlib.contextmanager
    def lane(self, model: str | None) -> Iterator[ModelLane]:
        """Submitting to the model named ``model`` (None: the default one), for the ``with``
        block. With :data:`MAX_MODELS` lanes open, the least recently used idle one is
        closed to make room (made-up model names must not use the lanes up for good); a
        429 when none is idle."""
        name = self._name(model)
        evicted = None
        with self._lanes_lock:
            lane = self._lanes.get(name)
            if lane is None:
                if len(self._lanes) >= MAX_MODELS:
                    evicted = self._evict_idle()
                settings = self.settings.replace(model_name=name)
                lane = ModelLane(settings, Client(settings), self.metrics, owned=True)
                self._lanes[name] = lane
            lane.users += 1
            lane.used_at = time.monotonic()
        if evicted is not None:
            evicted.close()
        try:
            yield lane
        finally:
            with self._lanes_lock:
                lane.users -= 1

    def _evict_idle(self) -> ModelLane:
        """Take the least recently used idle lane out (never the default model's); under
        the lanes lock. Its claims live in Redis, so nothing of it is lost."""
        idle = [(lane.used_at, name) for name, lane in self._lanes.items()
                if name != self.settings.model_name and lane.idle()]
        if not idle:
            raise ApiError(429, "too_many_models", f"this server is submitting to "
                           f"{MAX_MODELS} models at once; retry later", {"Retry-After": "1"})
        return self._lanes.pop(min(idle)[1])

    def now(self) -> dt.datetime:
        """Now on the Redis server's clock, which row times are stamped on
        (:meth:`Client.server_now`); Redis refusing the broker URL: this host's clock."""
        try:
            return utc_from_timestamp(self.client.server_now())
        except ConfigError:
            return utcnow()

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.close()
        self.client.close()


def refuse_outdated_schema(store: ResultStore) -> None:
    """Raise :class:`SchemaMismatch` when the database holds an outdated schema.

    An empty database is fine (the API never creates the schema; a worker or
    ``db upgrade`` does); an unreachable one is reported by ``/readyz``. One a
    worker is migrating right now is waited for, not refused. One that refuses
    (:class:`StoreRefused`: a file that is no SQLite database) is raised.
    """
    try:
        schema = migrate.settled(store)
    except StoreRefused:
        raise  # a setting: no wait mends it
    except StoreUnavailable:
        return
    problem = schema.problem()
    if problem and not schema.empty:
        raise SchemaMismatch(problem)


def refuse_database_role(store: ResultStore) -> None:
    """Raise :class:`StoreRefused` when the database refuses the API's role: a login (a
    wrong password, no CONNECT, a role or database that does not exist) or a privilege
    to read the results (``bertstream serve`` exits 2 on it). An outage passes: the API
    starts and ``/readyz`` reports it, as for Redis."""
    try:
        migrate.check_privileges(store, migrate.READER_PRIVILEGES, "the API")
    except StoreRefused:
        raise  # a setting: no wait mends it
    except StoreUnavailable:
        return


class CountRequests:
    """ASGI middleware: counts each HTTP request by route and status, and times it to its
    last body message.

    Plain ASGI, not Starlette's ``BaseHTTPMiddleware``: that one ends a streamed body
    cleanly when the route fails mid-stream, so a broken export reached the client as a
    whole 200 with rows missing. Here the failure goes on to the server, which breaks
    the transfer (the client sees an incomplete body). A request whose app raises counts
    as a 500: the 500 of an unexpected error is sent (and the error logged) by
    ``errors.InternalErrors``, and one raised mid-stream is a failed request whatever status had been sent.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, routes: list[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = 500
            raise
        finally:
            route = _route_path(scope, self.routes)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def _route_path(scope: Scope, routes: list[BaseRoute]) -> str:
    """The path template of the route that serves ``scope``, or ``unmatched`` (one label for
    every path no route serves, so a scan of random paths adds no series).

    The router names the route in the scope; a request refused on its headers before the
    router ran (``BodyLimit``'s 413 and 415) is matched here against ``routes``, so it
    counts under the route it was sent to (one of another method: the path's route)."""
    route = scope.get("route")
    if route is None:
        partial = None
        for candidate in routes:
            match = candidate.matches(scope)[0]
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and partial is None:
                partial = candidate
        route = route or partial
    return str(getattr(route, "path", "unmatched"))


def create_app(settings: Settings) -> FastAPI:
    """The FastAPI application for ``settings`` (tokens, limits and CORS from it)."""
    services = Services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            await run_in_threadpool(refuse_outdated_schema, services.client.store)
        except StoreRefused as exc:
            # `serve` refused it before its processes started; one refused since (a
            # rotated password, then a process restarted) starts and /readyz says so,
            # rather than failing its start over and over.
            log.warning("starting while the database refuses this server: %s", exc)
        poller = asyncio.create_task(services.waiter.run())
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await run_in_threadpool(services.close)
            logthrottle.close_all()  # the refusals' counts not logged yet

    # docs_url, redoc_url None: FastAPI's pages load Swagger UI and ReDoc from a CDN;
    # api.docs serves them from this server.
    app = FastAPI(title="bertstream", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Submit texts for micro-batched BERT analysis and read the "
                              "stored results. Errors are JSON {\"error\": {\"code\", \"message\"}}.")
    app.state.services = services
    errors.install(app)  # first: its InternalErrors must be the innermost middleware
    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes)
    # A browser's Origin never ends in "/": an origin configured as copied from the
    # address bar ("https://app.example/") matched nothing, and CORS failed silently.
    origins = [o.strip().rstrip("/") or o.strip() for o in settings.api_cors_origins.split(",")
               if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"])

    # Outside CORS and the body limit: their answers (a refused preflight, a 413, a 408)
    # carry the security headers too.
    app.add_middleware(SecurityHeaders, private=("/v1/", "/metrics"))
    # Every route with its path template, for the requests refused before the router ran:
    # filled once the routes are added below (the middleware is built at the first request).
    counted_routes: list[BaseRoute] = []
    app.add_middleware(CountRequests, metrics=services.metrics, routes=counted_routes)

    # JsonBodyRoute: a body Python's JSON reader chokes on is a 422 with the reason
    guarded = APIRouter(dependencies=[Depends(TokenCheck(settings.token_list()))],
                        route_class=JsonBodyRoute)
    # Ids may hold "/" (a URL, "orders/17"): the routes take the rest of the path, so the
    # windows route, the more specific, goes first.
    _window_routes(guarded, services)
    _task_routes(guarded, services)
    _read_routes(guarded, services)
    dashboard.install(app, guarded, services, _stored_filters(services), NO_NUL)

    @guarded.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics of this server (text exposition format)."""
        return Response(generate_latest(services.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    app.include_router(guarded)
    _health_routes(app, services)
    docs.install(app)
    counted_routes.extend(route for route in (*app.router.routes, *guarded.routes)
                          if isinstance(getattr(route, "path", None), str))
    return app


def _task_routes(router: APIRouter, services: Services) -> None:
    settings = services.settings

    @router.post("/v1/tasks", status_code=202, tags=["tasks"],
                 response_model=Accepted | BulkAccepted,
                 responses={404: {"description": "unknown_model: no live worker serves the "
                                                  "model, or BERTSTREAM_API_MODELS does not "
                                                  "list it (nothing queued)"},
                            409: {"description": "the id was accepted with another text"},
                            422: {"description": "invalid input"},
                            429: {"description": "the queue is over its bound"},
                            503: {"description": "Redis or the database is unreachable, or "
                                                  "Redis is out of memory (broker_full)"}})
    async def submit(body: Annotated[TaskIn | BulkIn, Body()], request: Request) -> Any:
        """Queue one task (202 with its id) or many (202 with ids in input order).

        Input is validated first (an invalid request is a 422, never a 429, and opens no
        model lane); then the model (404 ``unknown_model`` for one no live worker serves,
        unless BERTSTREAM_API_MODELS accepts it; nothing claimed or queued); the queue bound
        comes next, except for the repeat of a task already accepted with the same text,
        which is answered ``duplicate`` even then.
        """
        if isinstance(body, BulkIn):
            answer = await run_in_threadpool(_submit_bulk, services, body)
            # Already a BulkAccepted: skip the response model's second validation pass.
            # JsonAnswer: a refused item's id may hold a lone surrogate, echoed escaped.
            return JsonAnswer(answer.model_dump(), status_code=202)
        raw = body.model_dump(exclude={"lane", "model", "ttl_s"}, exclude_none=True)
        checked = ItemValidator(services.settings_for(body.model),
                                ttl_s=body.ttl_s).check(0, raw)
        lane = body.lane or LANE_INTERACTIVE
        if isinstance(checked, ItemError):
            services.metrics.items.labels(lane, "invalid").inc()
            raise ApiError(422, "invalid_input", checked.reason)
        if services.model_passes(body.model) is not True:
            await run_in_threadpool(services.check_model, body.model)
        with services.lane(body.model) as target:
            if await run_in_threadpool(target.submitter.queue_full):
                if body.id is not None and await run_in_threadpool(
                        target.submitter.repeated, checked.id, checked.text):
                    return await _duplicate(services, request, checked.id, body.model)
                raise _busy()
            outcome = await target.coalescer.submit(checked, lane,
                                                    caller_id=body.id is not None)
        services.metrics.items.labels(lane, outcome.status).inc()
        if outcome.status == CONFLICT:
            raise ApiError(409, "id_conflict", outcome.reason)
        if outcome.status == DUPLICATE:
            return await _duplicate(services, request, outcome.id, body.model)
        return Accepted(id=outcome.id, duplicate=False)

    @router.get("/v1/tasks/{task_id:path}", tags=["tasks"],
                responses={404: {"description": "no task with this id was accepted"}})
    async def status(
        task_id: Annotated[str, Path(max_length=settings.max_id_chars)],
        wait: Annotated[float, Query(ge=0, description="Seconds to long-poll for the result "
                                     "(at most BERTSTREAM_API_MAX_WAIT_S)")] = 0,
        model: Annotated[str | None, Query(pattern=f"^{MODEL_NAME_PATTERN}$",
                                           description="This model's result (default: the "
                                                       "task's latest)")] = None,
        *, request: Request,
    ) -> dict[str, Any]:
        """``queued``, ``done`` (label, score, scores, model), ``failed`` (reason) or
        ``expired`` (reason: its ``ttl_s`` deadline passed before it reached the model)."""
        return await _status(services, request, task_id, min(wait, settings.api_max_wait_s),
                             model)


async def _duplicate(services: Services, request: Request, task_id: str,
                     model: str | None) -> Accepted:
    """The answer to a duplicate submit: the task's status as ``GET /v1/tasks/{id}`` gives
    it (a web app re-posting after a timeout learns its task is ``done``, not ``queued``).
    Read for the model it was sent to; a duplicate of another model's stored row (nothing
    queued for this one) gives that row's status. Read only for duplicates: a submit that
    queues a task answers ``queued`` without it. A database that cannot be read leaves it
    ``queued``: the repeat was judged on its Redis claim, and a 503 would tell the caller
    its accepted task was not."""
    for asked in dict.fromkeys((model, None)):
        try:
            found = await _status(services, request, task_id, 0, asked)
        except StoreUnavailable:
            break
        except ApiError as exc:
            if exc.status != 404:
                raise
            continue
        return Accepted(id=task_id, status=found["status"], duplicate=True)
    # Its row deleted (db delete) since it was judged a duplicate, or the database down:
    # still what it was.
    return Accepted(id=task_id, duplicate=True)


async def _disconnected(request: Request) -> None:
    """Return once the client of ``request`` (a request without a body to read, as a GET)
    has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _long_poll(services: Services, request: Request, task_id: str, wait: float,
                     model: str | None, replacing: ResultRecord | None = None
                     ) -> ResultRecord | None:
    """:meth:`Waiter.wait`, ended (None) when the client disconnects first: a client or a
    proxy that gave up left its poll running for the rest of ``wait``, and a stopping
    server waited for it (up to BERTSTREAM_API_MAX_WAIT_S)."""
    polling = asyncio.ensure_future(services.waiter.wait(task_id, wait, model,
                                                         replacing=replacing))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({polling, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if gone.done() and not gone.cancelled():
            gone.exception()  # retrieved: a refused body is BodyLimit's to answer
        polling.cancel()  # a no-op once done; a cancelled task ends at its next step
    return polling.result() if polling.done() and not polling.cancelled() else None


async def _status(services: Services, request: Request, task_id: str, wait: float,
                  model: str | None) -> dict[str, Any]:
    """The answer of ``GET /v1/tasks/{id}``, after up to ``wait`` seconds of long poll.
    Rows are read under the name they are stored under (``default``: the default model's
    own); the id's claim is looked up under the name asked."""
    asked, model = model, await run_in_threadpool(services.client.stored_model, model)
    record = await run_in_threadpool(services.client.get, task_id, model, latest=True)
    if record is not None:
        return await _row_status(services, request, task_id, record, wait, model)
    # Looked up without opening a lane: a status request never counts as a model
    # this server submits to. Without a model, any model's claim will do.
    known = await run_in_threadpool(services.submitter.accepted_for, task_id, asked)
    if known is None:
        # Workers drop a claim after storing its row: a row committed since the first
        # read is found by a second one.
        record = await run_in_threadpool(services.client.get, task_id, model, latest=True)
        if record is not None:
            return await _row_status(services, request, task_id, record, wait, model)
        raise ApiError(404, "not_found", f"no task {task_id!r} was accepted"
                       + (f" for model {asked!r}" if asked else ""))
    if wait > 0:
        record = await _long_poll(services, request, task_id, wait, model)
        if record is not None:
            return _view(record)
    return {"id": task_id, "status": "queued"}


async def _row_status(services: Services, request: Request, task_id: str,
                      record: ResultRecord, wait: float, model: str | None) -> dict[str, Any]:
    """The status a stored row gives: the row, or ``queued`` (with ``retry_of``) while a
    retry of its failed or expired attempt is queued, until the new attempt is stored."""
    if not await run_in_threadpool(services.submitter.retrying, record, model):
        return _view(record)
    if wait > 0:
        again = await _long_poll(services, request, task_id, wait, model, replacing=record)
        if again is not None:
            return _view(again)
    return {"id": task_id, "status": "queued",
            "retry_of": {"status": record.status, "reason": record.error,
                         "attempts": record.attempts}}


def _window_routes(router: APIRouter, services: Services) -> None:
    settings = services.settings

    @router.get("/v1/tasks/{task_id:path}/windows", tags=["tasks"],
                responses={404: {"description": "no stored result for this id (and model)"}})
    async def windows_route(
        task_id: Annotated[str, Path(max_length=settings.max_id_chars)],
        model: Annotated[str | None, Query(max_length=256, pattern=NO_NUL,
                                           description="The model whose result to show "
                                           "(default: the task's latest)")] = None,
    ) -> dict[str, Any]:
        """The windows a long text was scored in, in order, with their character spans
        and scores; ``windows`` is empty for a text scored in one pass."""
        record, found = await run_in_threadpool(services.client.windowed, task_id, model)
        if record is None:
            raise ApiError(404, "not_found", f"no stored result for task {task_id!r}"
                           + (f" under model {model!r}" if model is not None else ""))
        return {"id": record.id, "model": record.model, "status": record.status,
                "count": record.windows, "windows": [w.to_json() for w in found]}


def _busy() -> ApiError:
    return ApiError(429, "busy", "the queue is over its bound; retry later",
                    {"Retry-After": "1"})


def _caller_id(raw: Any) -> str | None:
    """The id a bulk item's caller gave (None: the id is generated)."""
    given = raw.get("id") if isinstance(raw, dict) else None
    return given if isinstance(given, str) else None


def _submit_bulk(services: Services, body: BulkIn) -> BulkAccepted:
    settings = services.settings
    if len(body.items) > settings.api_max_items:
        raise ApiError(413, "too_many_items",
                       f"{len(body.items)} items, over the limit of {settings.api_max_items}")
    lane = body.lane or LANE_BULK
    model_settings = services.settings_for(body.model)
    # An item object's own ttl_s (not null) wins over the body's.
    validator = ItemValidator(model_settings, body.source, ttl_s=body.ttl_s, item_ttl=True)
    if body.ttl_s is not None:
        # Refused once, as Client.submit_many refuses it, not once per item.
        probe = ItemValidator(model_settings, ttl_s=body.ttl_s).check(0, "-")
        if isinstance(probe, ItemError):
            raise ApiError(422, "invalid_input", probe.reason)
    refused: list[ItemRefusal] = []
    good: list[tuple[int, Any]] = []
    for index, raw in enumerate(body.items):
        checked = validator.check(index, raw)
        if isinstance(checked, ItemError):
            # A generated id names nothing the caller could ask about: shown as null.
            refused.append(ItemRefusal(index=index, id=_caller_id(raw), reason=checked.reason))
        else:
            good.append((index, checked))
    outcomes: list[Outcome] = []
    if good or not body.items:
        # An empty bulk still names its model: a typo is a 404 now, not at the first item.
        services.check_model(body.model)
    if good:
        with services.lane(body.model) as target:
            if target.submitter.queue_full():
                raise _busy()
            caller = frozenset(it.id for i, it in good if _caller_id(body.items[i]) is not None)
            outcomes = target.submitter.submit([it for _, it in good], lane=lane,
                                               caller_ids=caller)
    ids: list[str | None] = [None] * len(body.items)
    duplicates = 0
    for (index, _item), outcome in zip(good, outcomes, strict=True):
        services.metrics.items.labels(lane, outcome.status).inc()
        if outcome.status == CONFLICT:
            refused.append(ItemRefusal(index=index, id=outcome.id, reason=outcome.reason))
            continue
        ids[index] = outcome.id
        duplicates += outcome.status == DUPLICATE
    services.metrics.items.labels(lane, "invalid").inc(len(body.items) - len(good))
    accepted = sum(1 for o in outcomes if o.status == ACCEPTED)
    if body.items and not good:
        # 422 only when every item is invalid; an id conflict is an item error of a 202
        # even when every item has one (a single submit's 409 is no invalid input either).
        first = min(refused, key=lambda r: r.index)
        raise ApiError(422, "invalid_input", f"no item was accepted; item {first.index}: "
                       f"{first.reason}")
    refused.sort(key=lambda r: r.index)
    return BulkAccepted(ids=ids, accepted=accepted, duplicates=duplicates, errors=refused)


def _filters(source: str | None, label: str | None, status: str | None, model: str | None,
             since: dt.datetime | None, until: dt.datetime | None,
             lang: str | None = None) -> Filters:
    # Filters reads a time bound as UTC (naive = UTC); an empty text means no filter:
    # HTML forms send every field, the empty ones as `name=`. A time bound whose UTC is
    # out of range is a bad query parameter, as a malformed one is (invalid_request).
    for name, value in (("since", since), ("until", until)):
        try:
            as_utc(value)
        except InvalidInput as exc:
            raise ApiError(422, "invalid_request", f"query.{name}: {exc}") from exc
    why = empty_range(since, until)
    if why:
        raise ApiError(422, "invalid_request", f"query.until: {why}")
    return Filters(source=source or None, label=label or None, status=status or None,
                   model=model or None, since=since, until=until, lang=lang or None)


def _stored_filters(services: Services) -> Any:
    """The dependency of the read routes' filters: :func:`_filter_params` with ``model``
    as its rows are stored (``default``: the default model's own name,
    ``Client.stored_model``), in the thread pool (it may ask Redis)."""
    def stored(filters: Annotated[Filters, Depends(_filter_params)],
               request: Request) -> Filters:
        _known_query_only(request)
        if filters.model is None:
            return filters
        return dataclasses.replace(filters, model=services.client.stored_model(filters.model))

    return stored


def _known_query_only(request: Request) -> None:
    """Refuse a query parameter the route does not take (422 ``invalid_request`` naming it
    and the ones it takes): a read route ignored it, so a misspelt filter or another
    route's (``id`` or ``q`` on ``/v1/results``) gave every row as though it matched.
    The names are the route's own, read from the OpenAPI schema (built once); ``_``, the
    cache-buster some HTTP libraries add (jQuery's ``cache: false``), passes."""
    route = request.scope.get("route")
    operation = (request.app.openapi()["paths"].get(getattr(route, "path", ""), {})
                 .get(request.method.lower(), {}))
    known = {p["name"] for p in operation.get("parameters", ()) if p.get("in") == "query"}
    unknown = [name for name in dict.fromkeys(request.query_params.keys())
               if name not in known and name != "_"]
    if not unknown or not known:
        return
    search = ("; a text or id search is /v1/search"
              if {"q", "id"} & set(unknown) and "q" not in known else "")
    raise ApiError(422, "invalid_request",
                   f"unknown query parameter {quoted(unknown[0])}: {getattr(route, 'path', '')} "
                   f"takes {', '.join(sorted(known))}{search}")


FilterParams = dict[str, Any]
#: Query texts that reach SQL: PostgreSQL text cannot hold NUL, so it is a 422, not a 500.
NO_NUL = r"^[^\x00]*$"
#: A time whose UTC offset's ``+`` reached the API as a space: in a query string ``+``
#: stands for a space, so ``since=2026-12-05T08:00+08:00`` typed into curl or a browser
#: arrives as ``2026-12-05T08:00 08:00``.
_OFFSET_PLUS_AS_SPACE = re.compile(
    r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?) (\d{2}:?\d{2})")


def _offset_plus(value: Any) -> Any:
    """``value`` with its offset's ``+`` back where a URL left a space (a space cannot
    stand there otherwise, so this reading is the only one): the bound the caller wrote,
    not a 422 about "extra characters"."""
    if isinstance(value, str) and (found := _OFFSET_PLUS_AS_SPACE.fullmatch(value)):
        return f"{found[1]}+{found[2]}"
    return value


#: A ``since`` or ``until`` query parameter (ISO 8601 or Unix time; naive is UTC).
TimeBound = Annotated[dt.datetime | None, BeforeValidator(_offset_plus)]


def _filter_params(
    source: Annotated[str | None, Query(max_length=256, pattern=NO_NUL)] = None,
    label: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    status: Status | Literal[""] | None = None,
    model: Annotated[str | None, Query(max_length=256, pattern=NO_NUL)] = None,
    since: Annotated[TimeBound, Query(description="finished at or after (ISO 8601)")] = None,
    until: Annotated[TimeBound, Query(description="finished before (ISO 8601)")] = None,
    lang: Annotated[Lang | Literal[""] | None, Query(description="the detected language")] = None,
) -> Filters:
    return _filters(source, label, status, model, since, until, lang)


def _read_routes(router: APIRouter, services: Services) -> None:
    store = services.client.store
    stored_filters = _stored_filters(services)

    @router.get("/v1/results", tags=["results"])
    def results_route(
        filters: Annotated[Filters, Depends(stored_filters)],
        format: Literal["json", "csv", "jsonl"] = "json",  # noqa: A002 - the API's name for it
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[str | None, Query(max_length=2048)] = None,
        order: Literal["newest", "oldest"] = "newest",
        bom: Annotated[bool, Query(description="format=csv only: start with a UTF-8 "
                                   "byte-order mark, so that Excel reads it as UTF-8")] = False,
        *, request: Request,
    ) -> Any:
        """Stored results, filtered. ``json``: one page of ``limit`` rows and ``next_cursor``
        (stable while rows are added); ``csv``/``jsonl``: every matching row, streamed
        (``csv`` with ``bom=true``: after a UTF-8 byte-order mark, for Excel)."""
        newest = order == "newest"
        _params_of_format(format, request)
        table = services.client.has_results_table()
        if format == "json":
            if not table:
                if cursor:
                    decode_cursor(cursor, newest)  # refused as with a table: malformed
                return {"items": [], "next_cursor": None}
            got = page(store, filters, cursor=cursor, limit=limit, newest_first=newest)
            return {"items": [_view(r) for r in got.records], "next_cursor": got.next_cursor}
        # no table yet: an empty export, as of an empty table (CSV: its header, after the mark)
        rows = _started(iter_records(store, filters, newest_first=newest)) if table else iter(())
        body = _csv_lines(rows, bom=bom) if format == "csv" else _jsonl_lines(rows)
        return StreamingResponse(body, media_type=_MEDIA[format], headers={
            "Content-Disposition": f'attachment; filename="bertstream-results.{format}"'})

    @router.get("/v1/stats", tags=["results"])
    def stats_route(
        filters: Annotated[Filters, Depends(stored_filters)],
        by: Literal["label", "source", "status", "model", "lang"] = "label",
        bucket: Literal["1m", "1h", "1d"] | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_STATS_LIMIT,
                                    description="the values of `by` with the most rows that "
                                    "get groups of their own; the rows of the others are "
                                    "summed in `other`")] = STATS_LIMIT,
    ) -> dict[str, Any]:
        """Counts and mean score per ``by``, and per time bucket of ``finished_at`` (UTC).

        Groups for the ``limit`` values of ``by`` with the most rows; when there are more
        values, ``other`` sums the rest per bucket (``values``, ``count``, ``mean_score``)."""
        if not services.client.has_results_table():
            return {"by": by, "bucket": bucket, "groups": []}
        # since alone spans up to now: the Redis server's, as the rows' times are
        got = top_stats(store, filters, by=by, bucket=bucket, limit=limit, now=services.now)
        return {"by": by, "bucket": bucket, "groups": got.groups,
                **({"other": got.other} if got.other else {})}


    model_name = Annotated[str, Query(pattern=f"^{MODEL_NAME_PATTERN}$")]

    @router.get("/v1/compare", tags=["results"])
    def compare_route(
        a: model_name,
        b: model_name,
        filters: Annotated[Filters, Depends(stored_filters)],
        top: Annotated[int, Query(ge=0, le=1000)] = 10,
    ) -> dict[str, Any]:
        """Model ``b`` against model ``a`` on the texts both scored: agreement, label flips,
        the mean change of b's probability of a's label, the texts b moved most (in SQL).
        ``source``, ``label`` (a's), ``lang`` and the time range select a's rows."""
        if a == b:
            raise InvalidInput("compare two different models")
        if filters.model is not None or filters.status is not None:
            raise InvalidInput("compare takes a and b, not model or status")
        if not services.client.has_results_table():
            return Comparison(a, b, 0, 0, [], None, []).as_dict()
        return compare(store, *_stored_pair(services.client, a, b), filters,
                       top=top).as_dict()


def _stored_pair(client: Client, a: str, b: str) -> tuple[str, str]:
    """Models ``a`` and ``b`` as their rows are stored (``Client.stored_model``): ``default``
    and the default model's own name are one model."""
    stored_a, stored_b = (str(client.stored_model(name)) for name in (a, b))
    if stored_a == stored_b:
        raise InvalidInput(f"default is the default model, {stored_a}: compare two "
                           "different models")
    return stored_a, stored_b


_MEDIA = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


#: Query parameters of ``/v1/results`` that one format only takes: name -> that format.
_FORMAT_ONLY = {"limit": "json", "cursor": "json", "bom": "csv"}


def _params_of_format(fmt: str, request: Request) -> None:
    """Refuse, in one 422 naming them all, the query parameters given that ``fmt`` does not
    take: ``limit`` and ``cursor`` page ``format=json`` (an export streams every matching
    row: a limit ignored gave every row to a caller who asked for a few), ``bom`` marks a
    CSV (no part of JSON). Checked before anything is read, so the answer does not depend
    on whether the results table exists yet."""
    wrong = [name for name, only in _FORMAT_ONLY.items()
             if name in request.query_params and fmt != only]
    if not wrong:
        return
    message = "; ".join(f"{name} applies to format={_FORMAT_ONLY[name]} only"
                        for name in wrong) + f", not format={fmt}"
    if fmt != "json" and {"limit", "cursor"} & set(wrong):
        message += ("; exports stream every matching row (narrow them with the filters, "
                    "since and until)")
    raise InvalidInput(message)


def _started(rows: Iterator[ResultRecord]) -> Iterator[ResultRecord]:
    """``rows`` with its first page read now, before the response starts.

    Once the response has started, a failure can only break the transfer off. A
    database that refuses the export from its first page (a role without SELECT, a
    statement timeout) then answered 200 with a broken body, where every other read
    answers 503; now it raises here, and the route answers as they do.
    """
    first = next(rows, None)
    return iter(()) if first is None else itertools.chain([first], rows)


def _csv_lines(rows: Iterator[ResultRecord], *, bom: bool = False) -> Iterator[str]:
    """Every field of each row; the cells of ``producer.formatting.GUARDED_COLUMNS`` and
    the id always guarded against running as spreadsheet formulas, as ``results
    --excel-safe`` does (``producer.formatting.unguard_id`` gives an exported id back).
    With ``bom``, the header follows ``producer.formatting.BOM``, once."""
    buffer = io.StringIO()
    if bom:
        buffer.write(BOM)
    writer = csv.writer(buffer)
    writer.writerow(RECORD_FIELDS)
    count = 0
    for record in rows:
        writer.writerow(csv_cells(record.to_json(), RECORD_FIELDS, guard=True))
        count += 1
        if count % 500 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def _jsonl_lines(rows: Iterator[ResultRecord]) -> Iterator[str]:
    for record in rows:
        yield json.dumps(record.to_json(), ensure_ascii=False) + "\n"


def _health_routes(app: FastAPI, services: Services) -> None:
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up (no dependency is checked)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"],
             responses={503: {"description": "a dependency is not ready; checks say which"}})
    def readyz() -> JSONResponse:
        """Redis and the database answer, and at least one worker is alive (of any model:
        the default one's queue family or a named model's)."""
        checks = {"redis": _redis_ready(services)}
        try:
            schema = migrate.state(services.client.store)
            if schema.empty:
                # A schema the role lost USAGE on hides its tables: "empty" to this role,
                # which then read every task as 404. Refused when so, naming the GRANT.
                migrate.check_privileges(services.client.store, migrate.READER_PRIVILEGES,
                                         "the API")
            problem = schema.problem()
            checks["database"] = ("ok" if problem is None else
                                  "ok: no schema yet (a worker or `bertstream db upgrade` "
                                  "creates it)" if schema.empty else f"schema: {problem}")
        except StoreRefused as exc:  # a setting: what to grant or fix, no host or password
            checks["database"] = f"misconfigured: {exc.problem}"
        except Exception as exc:  # noqa: BLE001
            checks["database"] = f"unreachable: {brief_cause(exc)}"
        if checks["database"] == "ok":
            # The revision table answering is not the results table being readable: a
            # role without SELECT on it answered ready while every read was a 503.
            try:
                migrate.check_privileges(services.client.store, migrate.READER_PRIVILEGES,
                                         "the API")
                services.client.store.run(_read_nothing, "cannot read results")
            except StoreRefused as exc:
                checks["database"] = f"misconfigured: {exc.problem}"
            except Exception as exc:  # noqa: BLE001
                checks["database"] = f"cannot read the results table: {brief_cause(exc)}"
        if checks["redis"] == "ok" or checks["redis"].startswith("ok:"):
            try:
                alive = family_workers(services.submitter.redis, services.settings.queue)
                checks["workers"] = (f"ok: {len(alive)} alive" if alive
                                     else "none alive (no heartbeat)")
            except (BertstreamError, Exception) as exc:  # noqa: BLE001
                checks["workers"] = f"unknown: {type(exc).__name__}"
        else:
            checks["workers"] = ("unknown: Redis refuses the broker URL"
                                 if checks["redis"].startswith("misconfigured")
                                 else "unknown: Redis unreachable")
        ready = all(v == "ok" or v.startswith("ok:") for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


def _redis_ready(services: Services) -> str:
    """``/readyz``'s Redis check: "ok", or why not (:func:`errors.redis_check`). A Redis
    whose eviction policy may drop the queues (``allkeys-*`` under a maxmemory) is still
    ready, "ok: " and the warning (``EvictionPolicy.warning`` in contract.broker): it
    serves until it fills, and taking the API out of service or restarting it mends
    nothing. A Redis that refuses ``INFO`` (an ACL) is "ok": its policy cannot be read."""
    redis_ = services.submitter.redis
    try:
        redis_.ping()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return errors.redis_check(services.settings, exc)
    try:
        policy = eviction_policy(redis_)
    except Exception:  # noqa: BLE001 - the policy is a note, never a failed check
        return "ok"
    warning = policy.warning() if policy else None
    return f"ok: {warning}" if warning else "ok"


def _read_nothing(conn: Connection) -> None:
    """A read of the results table that returns no row (privileges are still checked)."""
    conn.execute(sa.select(results_table.c.id).limit(0)).all()


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory`` (settings from BERTSTREAM_* variables)."""
    return create_app(Settings.from_env())
