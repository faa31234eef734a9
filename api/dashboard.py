"""The dashboard: a static page at ``/`` and the JSON routes it polls besides ``/v1/stats``.

The page (``api/static/``) is public; its data calls are ``/v1`` calls, so
they need the bearer token whenever tokens are configured. Every query here
stays bounded on a large table:

- ``/v1/live``: queue depth per lane and live workers (every model's) from Redis, and a
  count of the rows finished in the last ``window`` seconds (a range on the
  ``finished_at`` index), with per-minute counts over the last half hour (kept per
  process for the minutes that have settled, :class:`TrendCache`: a poll reads the
  last few minutes' rows, not the half hour's);
- ``/v1/sources``: the distinct sources for the page's filter, one index
  probe per source (not a scan of the time range);
- ``/v1/search``: an id or id prefix reads at most ``scan`` ids of a
  primary-key range in code point order, then applies the filters; a text
  search reads at most ``scan`` of the newest rows that match the filters
  (an index page) and filters those, so neither cost grows with the table.
  ``cursor`` pages on: the next ``limit`` rows after the last one shown, in the
  table's order (a keyset: a page stays put while new rows arrive), each page
  reading at most ``scan`` rows again. A text search whose ``scan`` rows hold fewer
  matches than a page goes on from the last row it read (``scan_ended``), so an older
  match is a page away, never behind a scan of the table.
  On a PostgreSQL database whose collation is not C (ICU, en_US) the primary
  key does not sort by code point: the prefix range is then compared under
  COLLATE "C", which schema revision 0004 indexes there.
"""

import datetime as dt
import threading
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from api.errors import redis_check
from api.metrics import by_family
from contract.constants import LANE_BULK, LANE_INTERACTIVE
from contract.errors import ConfigError, InvalidInput
from contract.liveness import family_workers
from contract.messages import id_problem
from contract.migrate import id_sorts_by_code_point
from contract.queries import Filters, _after, distinct_sources, pack_cursor, stats, unpack_cursor
from contract.results import (
    ResultRecord,
    ResultStore,
    _record,
    as_utc,
    results,
    utc_from_timestamp,
    utcnow,
)

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
    return store.run(lambda conn: int(conn.execute(query).scalar_one()), "cannot read results")


def trend(store: ResultStore, now: dt.datetime, minutes: int = TREND_MINUTES) -> list[dict[str, Any]]:
    """Rows finished per minute (UTC bucket start) over the last ``minutes``; empty minutes
    are left out. Every model's rows count, as in :func:`finished_since`: both are the
    work done, a re-score included."""
    per = _per_minute(store, _minute(now - dt.timedelta(minutes=minutes)), now)
    return [{"bucket": b, "count": c} for b, c in sorted(per.items())]


def _minute(when: dt.datetime) -> dt.datetime:
    return when.replace(second=0, microsecond=0)


def _bucket_text(minute: dt.datetime) -> str:
    """A minute as :func:`stats` names its bucket (ISO text: sorts as the times do)."""
    return minute.strftime("%Y-%m-%dT%H:%M:00Z")


def _per_minute(store: ResultStore, since: dt.datetime, now: dt.datetime,
                until: dt.datetime | None = None) -> dict[str, int]:
    """Rows finished at or after ``since`` (a minute's start), and before ``until`` (a
    minute's start) when given, per minute, every model's."""
    per: dict[str, int] = {}
    for group in stats(store, Filters(since=since, until=until), by="model", bucket="1m",
                       now=lambda: now):
        per[group["bucket"]] = per.get(group["bucket"], 0) + group["count"]
    return per


#: Seconds after a minute ends during which its count may still grow: a worker stamps
#: ``finished_at`` before its commit (``worker/flush.py``), and one commit can wait out the
#: statement timeout (30 s by default) and retry through a brief outage before its rows
#: show.
TREND_SETTLE_S = 120.0
#: Seconds between two recomputations of the whole trend by :class:`TrendCache`.
TREND_FULL_S = 300.0


class TrendCache:
    """:func:`trend` for the dashboard's poll, per API process, at the cost of its last
    minutes: the counts of the minutes that ended more than ``settle_s`` ago are kept,
    and only the rows from the first minute not kept on are read at each call.

    A row that lands in a kept minute after all (a commit later than ``settle_s``, a
    failed row replaced by its retry, a delete) shows at the next full recomputation,
    every ``full_s``. ``now`` (the Redis server's clock) moving by more than ``settle_s``
    between two calls, either way (a clock step, a failover to another Redis, or no
    call for a while), drops the kept minutes: after a step back, rows would land in
    minutes kept as ended. A smaller step back that starts the window a minute before
    the kept ones reads that minute too. Minutes that leave the window are dropped; at most
    ``minutes`` are kept. One refresh at a time (the route runs in a thread pool): a
    call waits for another's, then reads only what that one left.
    """

    def __init__(self, minutes: int = TREND_MINUTES, settle_s: float = TREND_SETTLE_S,
                 full_s: float = TREND_FULL_S) -> None:
        if not 0 <= settle_s < minutes * 60:
            raise ValueError("settle_s must be within the trend's minutes")
        self.minutes, self.settle_s, self.full_s = minutes, settle_s, full_s
        #: Whole recomputations so far (the first call's included).
        self.full_refreshes = 0
        self._lock = threading.Lock()
        self._kept: dict[str, int] = {}  # bucket -> count, the minutes before _until
        self._until: dt.datetime | None = None
        self._full_at: dt.datetime | None = None
        self._last: dt.datetime | None = None

    def clear(self) -> None:
        """Forget the kept minutes: the next call recomputes the whole trend."""
        with self._lock:
            self._kept, self._until, self._full_at, self._last = {}, None, None, None

    def trend(self, store: ResultStore, now: dt.datetime) -> list[dict[str, Any]]:
        """What :func:`trend` gives for ``now`` (see the class for when it may lag)."""
        with self._lock:
            per = self._refresh(store, now)
        return [{"bucket": b, "count": c} for b, c in sorted(per.items())]

    def _refresh(self, store: ResultStore, now: dt.datetime) -> dict[str, int]:
        since = _minute(now - dt.timedelta(minutes=self.minutes))
        settled = _minute(now - dt.timedelta(seconds=self.settle_s))
        full = (self._until is None or self._full_at is None or self._last is None
                or abs((now - self._last).total_seconds()) > self.settle_s
                or (now - self._full_at).total_seconds() >= self.full_s)
        start = since if full or self._until is None else max(since, min(self._until, settled))
        fresh = _per_minute(store, start, now)
        if not full and self._last is not None:
            # a step back that starts the window before the kept minutes: read those first
            # minutes too (the last call's window never held them)
            kept_since = _minute(self._last - dt.timedelta(minutes=self.minutes))
            if since < kept_since:
                fresh.update(_per_minute(store, since, now, until=kept_since))
        low, high, cut = _bucket_text(since), _bucket_text(start), _bucket_text(settled)
        kept = {} if full else {b: c for b, c in self._kept.items() if low <= b < high}
        answer = {**kept, **fresh}
        kept.update((b, c) for b, c in fresh.items() if b < cut)
        self._kept, self._until, self._last = kept, settled, now
        if full:
            self._full_at = now
            self.full_refreshes += 1
        return answer


def _successor(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``, in code point
    order; None when there is none (``prefix`` is all U+10FFFF)."""
    stem = prefix.rstrip("\U0010ffff")
    if not stem:
        return None
    after = ord(stem[-1]) + 1
    if 0xD800 <= after <= 0xDFFF:  # no text holds a surrogate: step over the block
        after = 0xE000
    return stem[:-1] + chr(after)


def _prefix_range(prefix: str, by_index: bool) -> tuple[Any, list[Any]]:
    """The id column to order on and the clauses ``id`` starts with ``prefix``: a range in
    code point order and a LIKE. ``by_index``: the column's own collation is code point
    order, so the primary-key index serves the range; else it compares under COLLATE "C"
    (right under any collation; served by revision 0004's index)."""
    col = results.c.id if by_index else results.c.id.collate("C")
    conds = [col >= prefix, results.c.id.startswith(prefix, autoescape=True)]
    upper = _successor(prefix)
    if upper is not None:
        conds.append(col < upper)
    return col, conds


#: What SQL ``lower()`` still leaves different after it: SQLite's is Python's ``str.lower``
#: (a final sigma becomes ``ς``, ``İ`` becomes ``i`` and a combining dot), PostgreSQL's maps
#: each character alone (``σ``, ``i``); and ``ß``, whose capital is ``SS``.
_FOLDS = (("i\u0307", "i"), ("ς", "σ"), ("ß", "ss"))


def _folded(text: Any) -> Any:
    """The SQL expression of ``text`` with its case folded the same way on every backend."""
    folded = sa.func.lower(text)
    for before, after in _FOLDS:
        folded = sa.func.replace(folded, before, after)
    return folded


def _clauses_on(sub: Any, filters: Filters, q: str | None, *, latest: bool) -> list[Any]:
    """``filters`` and the text search on the columns of the subquery ``sub``; ``latest``:
    with no model named, each task's latest row only (the rule of the default views).

    ``q`` is folded in SQL like the column, so both sides get the database's own
    ``lower()``; its LIKE wildcards are escaped first (folding leaves them alone).
    """
    conds = filters.clauses(every_model=not latest, columns=sub.c)
    if q:
        pattern = q.replace("/", "//").replace("%", "/%").replace("_", "/_")
        conds.append(_folded(sub.c.text).contains(_folded(sa.literal(pattern, sa.Text)),
                                                  escape="/"))
    return conds


#: Where a page of a search resumes: after the row of this ``finished_at`` and id (newest
#: first), or for an id search (``finished_at`` None) after this id (in id order).
Position = tuple[dt.datetime | None, str]


def encode_position(record: ResultRecord | Position, by_id: bool) -> str:
    """The opaque cursor of the page after ``record`` or a position (``by_id``: of an id
    search)."""
    finished, task_id = ((record.finished_at, record.id) if isinstance(record, ResultRecord)
                         else record)
    return pack_cursor([None if by_id or finished is None else finished.isoformat(), task_id])


def decode_position(cursor: str, by_id: bool) -> Position:
    """The position a cursor resumes after; :class:`InvalidInput` when it is malformed or
    belongs to the other kind of search (an id search pages in id order)."""
    try:
        finished, task_id = unpack_cursor(cursor)
        if not isinstance(task_id, str) or id_problem(task_id):
            raise ValueError("bad cursor id")
        if (finished is None) != by_id:
            raise ValueError("the cursor of another search")
        when = None if finished is None else dt.datetime.fromisoformat(finished)
    except (ValueError, TypeError, UnicodeError, RecursionError) as exc:
        raise InvalidInput("malformed cursor") from exc
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when, task_id


def search(store: ResultStore, filters: Filters, *, q: str | None = None,
           task_id: str | None = None, limit: int = 50,
           scan: int = MAX_SCAN, after: Position | None = None) -> list[ResultRecord]:
    """Up to ``limit`` rows matching ``filters``, newest first.

    ``task_id``: rows whose id is it or starts with it, among the first ``scan``
    such ids in code point order (a primary-key range where the collation allows), in
    that order.
    ``q``: rows whose text contains it, case-insensitively, among the ``scan``
    newest rows matching ``filters``.
    ``after``: the rows after this position in that order (the next page).
    """
    def read(conn: Any) -> list[ResultRecord]:
        query = _search_query(conn, filters, q, task_id, limit, scan, after)
        return [_record(row) for row in conn.execute(query).mappings()]

    return store.run(read, "cannot read results")


def window_end(store: ResultStore, filters: Filters, *, scan: int,
               after: Position | None = None) -> Position | None:
    """Where a text search whose ``scan`` rows (after ``after``) held fewer matches than a
    page goes on: the last of those rows, when a row matching ``filters`` is older than it
    (None when the rows read were all there are). Reads ``scan`` index entries at most."""
    def read(conn: Any) -> list[Any]:
        query = (sa.select(results.c.finished_at, results.c.id)
                 .where(*_window_clauses(filters, after))
                 .order_by(results.c.finished_at.desc(), results.c.id.desc())
                 .offset(scan - 1).limit(2))
        return list(conn.execute(query).all())

    rows = store.run(read, "cannot read results")
    return (as_utc(rows[0][0]), rows[0][1]) if len(rows) == 2 else None


def _window_clauses(filters: Filters, after: Position | None) -> list[Any]:
    """The rows a newest-first search reads: ``filters``, after ``after``."""
    conds = filters.clauses()
    if after is not None and after[0] is not None:
        conds += _after((after[0], after[1]), True)
    return conds


def _search_query(conn: Any, filters: Filters, q: str | None, task_id: str | None,
                  limit: int, scan: int, after: Position | None = None) -> Any:
    order = (results.c.finished_at.desc(), results.c.id.desc())
    conds = filters.clauses()
    if task_id:
        # The first `scan` ids with the prefix, then the other filters: bounded even when
        # the filters reject most of a wide prefix.
        id_col, in_range = _prefix_range(task_id, id_sorts_by_code_point(conn))
        if after is not None:
            in_range.append(id_col > after[1])
        ids = (sa.select(results, id_col.label("id_order")).where(*in_range).order_by(id_col)
               .limit(scan).subquery("ids"))
        query = (sa.select(*[ids.c[c.name] for c in results.columns])
                 .where(*_clauses_on(ids, filters, q, latest=True))
                 .order_by(ids.c.id_order).limit(limit))
    else:
        conds = _window_clauses(filters, after)
        if q:
            recent = (sa.select(results).where(*conds).order_by(*order).limit(scan)
                      .subquery("recent"))
            query = (sa.select(recent).where(*_clauses_on(recent, Filters(), q, latest=False))
                     .order_by(recent.c.finished_at.desc(), recent.c.id.desc()).limit(limit))
        else:
            query = sa.select(results).where(*conds).order_by(*order).limit(limit)
    return query


def live(services: "Services", window_s: int,
         trends: TrendCache | None = None) -> dict[str, Any]:
    """Queue depth per lane, live workers (of every model, and their count per queue
    family) and recent throughput; Redis figures are null (with ``redis`` saying why) when
    Redis cannot be read, so the page still shows the rest.

    ``now``, which ends the windows, is the Redis server's (:meth:`Client.server_now`):
    row times are stamped on it, so an API host whose clock is off counts the same rows.
    Redis not answering, or refusing the broker URL: this host's clock (``redis`` says why).
    ``trends``: the per-minute counts come from it (:class:`TrendCache`), not a whole read.
    """
    try:
        now = utc_from_timestamp(services.client.server_now())
    except ConfigError:  # Redis refuses the URL: the Redis figures below report it
        now = utcnow()
    out: dict[str, Any] = {"now": now.isoformat(), "window_s": window_s}
    try:
        out["queue_depth"] = {lane: services.client.queue_length(lane)
                              for lane in (LANE_INTERACTIVE, LANE_BULK)}
        workers = family_workers(services.submitter.redis, services.settings.queue)
        out["workers"] = workers
        out["workers_alive"] = len(workers)
        out["workers_by_family"] = by_family(workers)
        out["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported in the answer, not raised
        out.update(queue_depth=None, workers=None, workers_alive=None, workers_by_family=None,
                   redis=redis_check(services.settings, exc))
    store = services.client.store
    if services.client.has_results_table():
        finished = finished_since(store, now - dt.timedelta(seconds=window_s))
        out["per_minute"] = trend(store, now) if trends is None else trends.trend(store, now)
    else:
        if trends is not None:
            trends.clear()  # a table made again later starts without these minutes
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
    trends = TrendCache()

    @router.get("/v1/live", tags=["dashboard"])
    def live_route(window: Annotated[int, Query(ge=1, le=3600,
                                                description="seconds of throughput")] = 60,
                   ) -> dict[str, Any]:
        """Queue depth per lane, live workers, rows finished in the last ``window`` seconds
        and per minute over the last half hour."""
        return live(services, window, trends)

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
        cursor: Annotated[str | None, Query(max_length=2048, description="the previous "
                                            "answer's `next_cursor`: the page after it")] = None,
    ) -> dict[str, Any]:
        """Rows matching the filters, a text and an id prefix, newest first (bounded reads);
        ``next_cursor`` reads the page after these (null when there is none).

        ``scan_ended``: a text search found fewer matches than ``limit`` among the ``scan``
        rows it read and older rows remain: ``next_cursor`` reads the ``scan`` rows
        before those (the page may hold fewer rows, or none)."""
        by_id = bool(id)
        after = decode_position(cursor, by_id) if cursor else None
        if not services.client.has_results_table():
            return {"items": [], "scan": scan, "next_cursor": None, "scan_ended": False}
        rows = search(store, filters, q=q or None, task_id=id or None, limit=limit + 1,
                      scan=scan, after=after)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_position(rows[-1], by_id) if more else None
        ended = None
        if q and not id and not more:
            ended = window_end(store, filters, scan=scan, after=after)
            if ended is not None:
                next_cursor = encode_position(ended, False)
        return {"items": [_json(r) for r in rows], "scan": scan,
                "next_cursor": next_cursor, "scan_ended": ended is not None}

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
