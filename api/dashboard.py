"""The dashboard: a static page at ``/`` and the JSON routes it polls besides ``/v1/stats``.

The page (``api/static/``) is public; its data calls are ``/v1`` calls, so
they need the bearer token whenever tokens are configured. Every query here
stays bounded on a large table:

- ``/v1/live``: queue depth per lane and live workers from Redis, and a
  count of the rows finished in the last ``window`` seconds (a range on the
  ``finished_at`` index), with per-minute counts over the last half hour;
- ``/v1/sources``: the distinct sources for the page's filter, one index
  probe per source (not a scan of the time range);
- ``/v1/search``: an id or id prefix reads at most ``scan`` ids of a
  primary-key range, then applies the filters; a text search reads at most
  ``scan`` of the newest rows that match the filters (an index page) and
  filters those, so neither cost grows with the table.
"""

import datetime as dt
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import OperationalError

from contract.constants import LANE_BULK, LANE_INTERACTIVE
from contract.errors import StoreUnavailable
from contract.liveness import live_workers
from contract.queries import Filters, distinct_sources, stats
from contract.results import ResultRecord, ResultStore, _record, results, utcnow

if TYPE_CHECKING:
    from api.app import Services

#: Minutes of per-minute throughput that ``/v1/live`` returns.
TREND_MINUTES = 30
#: Most rows a search reads (the newest matching ones for a text, the first ids for an id).
MAX_SCAN = 20_000


def finished_since(store: ResultStore, since: dt.datetime) -> int:
    """Rows whose ``finished_at`` is at or after ``since`` (a range count on its index)."""
    query = sa.select(sa.func.count()).select_from(results).where(
        results.c.finished_at >= since)
    try:
        with store.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
    except OperationalError as exc:
        raise StoreUnavailable(f"cannot read results: {exc}") from exc


def trend(store: ResultStore, now: dt.datetime, minutes: int = TREND_MINUTES) -> list[dict[str, Any]]:
    """Rows finished per minute (UTC bucket start) over the last ``minutes``; empty minutes
    are left out."""
    since = (now - dt.timedelta(minutes=minutes)).replace(second=0, microsecond=0)
    per: dict[str, int] = {}
    for group in stats(store, Filters(since=since), by="status", bucket="1m"):
        per[group["bucket"]] = per.get(group["bucket"], 0) + group["count"]
    return [{"bucket": b, "count": c} for b, c in sorted(per.items())]


def _prefix_range(prefix: str) -> list[Any]:
    """``id`` starts with ``prefix``, as a primary-key range (code point order) and a LIKE
    that keeps the answer right under any collation."""
    upper = prefix[:-1] + chr(min(ord(prefix[-1]) + 1, 0x10FFFF))
    return [results.c.id >= prefix, results.c.id < upper,
            results.c.id.startswith(prefix, autoescape=True)]


def _clauses_on(sub: Any, filters: Filters, q: str | None, *, latest: bool) -> list[Any]:
    """``filters`` and the text search on the columns of the subquery ``sub``; ``latest``:
    with no model named, each task's latest row only (the rule of the default views)."""
    conds = filters.clauses(every_model=not latest, columns=sub.c)
    if q:
        conds.append(sa.func.lower(sub.c.text).contains(q.lower(), autoescape=True))
    return conds


def search(store: ResultStore, filters: Filters, *, q: str | None = None,
           task_id: str | None = None, limit: int = 50,
           scan: int = MAX_SCAN) -> list[ResultRecord]:
    """Up to ``limit`` rows matching ``filters``, newest first.

    ``task_id``: rows whose id is it or starts with it, among the first ``scan``
    such ids (a primary-key range), in id order.
    ``q``: rows whose text contains it, case-insensitively, among the ``scan``
    newest rows matching ``filters``.
    """
    order = (results.c.finished_at.desc(), results.c.id.desc())
    conds = filters.clauses()
    if task_id:
        # The first `scan` ids with the prefix, then the other filters: bounded even when
        # the filters reject most of a wide prefix.
        ids = (sa.select(results).where(*_prefix_range(task_id)).order_by(results.c.id)
               .limit(scan).subquery("ids"))
        query = (sa.select(ids).where(*_clauses_on(ids, filters, q, latest=True))
                 .order_by(ids.c.id).limit(limit))
    elif q:
        recent = (sa.select(results).where(*conds).order_by(*order).limit(scan)
                  .subquery("recent"))
        query = (sa.select(recent).where(*_clauses_on(recent, Filters(), q, latest=False))
                 .order_by(recent.c.finished_at.desc(), recent.c.id.desc()).limit(limit))
    else:
        query = sa.select(results).where(*conds).order_by(*order).limit(limit)
    try:
        with store.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query).mappings()]
    except OperationalError as exc:
        raise StoreUnavailable(f"cannot read results: {exc}") from exc


def live(services: "Services", window_s: int) -> dict[str, Any]:
    """Queue depth per lane, live workers and recent throughput; Redis figures are null
    (with ``redis`` saying why) when Redis cannot be read, so the page still shows the rest."""
    now = utcnow()
    out: dict[str, Any] = {"now": now.isoformat(), "window_s": window_s}
    try:
        out["queue_depth"] = {lane: services.client.queue_length(lane)
                              for lane in (LANE_INTERACTIVE, LANE_BULK)}
        workers = live_workers(services.submitter.redis, services.settings.queue)
        out["workers"] = workers
        out["workers_alive"] = len(workers)
        out["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported in the answer, not raised
        out.update(queue_depth=None, workers=None, workers_alive=None,
                   redis=f"unreachable: {type(exc).__name__}")
    store = services.client.store
    if services.client.has_results_table():
        finished = finished_since(store, now - dt.timedelta(seconds=window_s))
        out["per_minute"] = trend(store, now)
    else:
        finished, out["per_minute"] = 0, []
    out["finished"] = finished
    out["per_s"] = finished / window_s
    return out


def install(app: FastAPI, router: APIRouter, services: "Services",
            filter_params: Any, no_nul: str) -> None:
    """Add the JSON routes to the guarded ``router`` and the page and its files to ``app``
    (``filter_params``: the dependency that reads the results filters; ``no_nul``: the
    pattern texts that reach SQL must match)."""
    store = services.client.store

    @router.get("/v1/live", tags=["dashboard"])
    def live_route(window: Annotated[int, Query(ge=1, le=3600,
                                                description="seconds of throughput")] = 60,
                   ) -> dict[str, Any]:
        """Queue depth per lane, live workers, rows finished in the last ``window`` seconds
        and per minute over the last half hour."""
        return live(services, window)

    @router.get("/v1/sources", tags=["dashboard"])
    def sources_route(limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> dict[str, Any]:
        """Up to ``limit`` distinct sources, in order."""
        if not services.client.has_results_table():
            return {"sources": []}
        return {"sources": distinct_sources(store, limit)}

    @router.get("/v1/search", tags=["dashboard"])
    def search_route(
        filters: Annotated[Filters, Depends(filter_params)],
        q: Annotated[str | None, Query(max_length=200, pattern=no_nul,
                                       description="text contains "
                                       "(case-insensitive), among the newest `scan` rows")] = None,
        id: Annotated[str | None, Query(max_length=services.settings.max_id_chars,  # noqa: A002
                                        pattern=no_nul,
                                        description="id or id prefix")] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        scan: Annotated[int, Query(ge=1, le=MAX_SCAN)] = 5000,
    ) -> dict[str, Any]:
        """Rows matching the filters, a text and an id prefix, newest first (bounded reads)."""
        if not services.client.has_results_table():
            return {"items": [], "scan": scan}
        rows = search(store, filters, q=q or None, task_id=id or None, limit=limit, scan=scan)
        return {"items": [_json(r) for r in rows], "scan": scan}

    static = resources.files("api") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html; charset=utf-8")


def _json(record: ResultRecord) -> dict[str, Any]:
    out = record.to_json()
    if record.status != "done":
        out["reason"] = record.error
    return out
