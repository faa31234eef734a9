"""Reading the results table in pages, in bounded memory, and as SQL aggregates.

What the HTTP API and exports need beyond :class:`contract.results.ResultStore`:

- keyset pages ordered by ``(finished_at, id)`` with an opaque cursor. A row
  written after a page was read finishes later than every row already there,
  so it never shifts a later page: the pages stay stable while rows are added;
- an iterator over every matching row, one keyset page at a time, so an
  export of a million rows holds one page in memory, all pages read in one
  transaction, so an export is one snapshot of the table;
- counts and mean score per label, source or time bucket, computed in SQL on
  SQLite and PostgreSQL alike;
- the distinct sources, along the source index.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError

from contract.errors import InvalidInput
from contract.messages import id_problem
from contract.results import (
    ResultRecord,
    ResultStore,
    _record,
    as_utc,
    is_outage,
    is_row_error,
    latest_only,
    results,
    utcnow,
)

#: Time buckets of :func:`stats`: name -> (PostgreSQL date_trunc unit, SQLite strftime format).
BUCKETS = {
    "1m": ("minute", "%Y-%m-%dT%H:%M:00Z"),
    "1h": ("hour", "%Y-%m-%dT%H:00:00Z"),
    "1d": ("day", "%Y-%m-%dT00:00:00Z"),
}
GROUPS = ("label", "source", "status", "model", "lang")
#: Most time buckets one :func:`stats` call may span: a 1m bucket over all history would
#: return a group per minute ever.
MAX_BUCKETS = 10_000
#: A clock giving now as an aware UTC datetime: what ends a stats span given ``since`` alone.
Now = Callable[[], dt.datetime]
_BUCKET_SECONDS = {"1m": 60, "1h": 3600, "1d": 86400}
#: Most groups (each value per bucket, and each bucket's ``other``) one bucketed
#: :func:`stats` or :func:`top_stats` answer may hold: values x buckets is otherwise bounded
#: only by the rows, and the whole answer is built and serialised at once.
MAX_CELLS = 100_000
#: Values of ``by`` that :func:`top_stats` keeps by default, and the most it may be asked
#: to keep (``GET /v1/stats?limit=``); the others are summed into one ``other`` group.
STATS_LIMIT = 100
MAX_STATS_LIMIT = 1000
#: The label a worker's neutral band gives (``worker.runner.NEUTRAL``; the worker's
#: module needs torch): it has no probability in the row's ``scores``.
NEUTRAL = "neutral"


def empty_range(since: dt.datetime | None, until: dt.datetime | None, since_name: str = "since",
                until_name: str = "until") -> str | None:
    """Why a range a user asked for holds no time, or None: ``until`` not after ``since``
    (inclusive and exclusive, so equal bounds hold nothing either). Read, it answered no
    rows as though none had been stored then; the callers refuse it (the command line's
    options, the API's query parameters), not :class:`Filters`, which internal reads
    build with ranges that may be empty."""
    if since is None or until is None or as_utc(until) > as_utc(since):
        return None
    return (f"{until_name} {as_utc(until).isoformat()} is not after {since_name} "
            f"{as_utc(since).isoformat()}: {since_name} is inclusive and {until_name} "
            f"exclusive (for one day, give the next day as {until_name})")


@dataclass(frozen=True)
class Filters:
    """Which rows: every given field must match (``since`` inclusive, ``until`` exclusive)."""

    source: str | None = None
    label: str | None = None
    status: str | None = None
    #: One model's rows; without it, each task's latest result (of any model).
    model: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    lang: str | None = None

    def __post_init__(self) -> None:
        # One reading of a time bound on every backend: aware UTC, a naive one taken as UTC.
        object.__setattr__(self, "since", as_utc(self.since))
        object.__setattr__(self, "until", as_utc(self.until))

    def clauses(self, *, every_model: bool = False, columns: Any = None) -> list[Any]:
        """The WHERE clauses (bound parameters only); ``every_model``: no latest-only rule;
        ``columns``: those of a subquery of the results table (default: the table's)."""
        cols = results.c if columns is None else columns
        conds: list[Any] = []
        for name in ("source", "label", "status", "model", "lang"):
            value = getattr(self, name)
            if value is not None:
                conds.append(cols[name] == value)
        if self.model is None and not every_model:
            conds.append(latest_only(cols))
        if self.since is not None:
            conds.append(cols.finished_at >= self.since)
        if self.until is not None:
            conds.append(cols.finished_at < self.until)
        return conds


@dataclass(frozen=True)
class Page:
    """One page of rows and the cursor of the next (None at the end)."""

    records: list[ResultRecord]
    next_cursor: str | None


def pack_cursor(fields: list[Any]) -> str:
    """An opaque cursor holding ``fields``: JSON in URL-safe base64, unpadded.

    The JSON is UTF-8, not ASCII-escaped: an id of 128 characters outside the BMP
    escapes to 1,536, and its cursor would pass the routes' 2,048-character limit."""
    raw = json.dumps(fields, ensure_ascii=False)
    return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")


def unpack_cursor(cursor: str) -> Any:
    """What :func:`pack_cursor` packed; ``ValueError``, ``TypeError``, ``UnicodeError`` or
    ``RecursionError`` for a cursor it did not make (callers answer "malformed cursor")."""
    padded = cursor + "=" * (-len(cursor) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def encode_cursor(record: ResultRecord, newest_first: bool) -> str:
    """An opaque cursor that resumes after ``record``."""
    finished = record.finished_at.isoformat() if record.finished_at else ""
    return pack_cursor([finished, record.id, "d" if newest_first else "a"])


def decode_cursor(cursor: str, newest_first: bool) -> tuple[dt.datetime, str]:
    """The ``(finished_at, id)`` a cursor resumes after; :class:`InvalidInput` when malformed."""
    try:
        finished, task_id, order = unpack_cursor(cursor)
        when = dt.datetime.fromisoformat(finished)
        if not isinstance(task_id, str) or order not in ("a", "d") or id_problem(task_id):
            raise ValueError("bad cursor fields")  # an id no row can have: NUL, too long
    except (ValueError, TypeError, UnicodeError, RecursionError) as exc:
        raise InvalidInput("malformed cursor") from exc
    if (order == "d") != newest_first:
        raise InvalidInput("the cursor belongs to the other sort order")
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when, task_id


def _after(position: tuple[dt.datetime, str] | None, newest_first: bool) -> list[Any]:
    if position is None:
        return []
    when, task_id = position
    fin, rid = results.c.finished_at, results.c.id
    # The plain bound beside the OR lets the index start at the position: without it
    # each page read every row before it (deeper pages cost more).
    if newest_first:
        return [fin <= when, sa.or_(fin < when, sa.and_(fin == when, rid < task_id))]
    return [fin >= when, sa.or_(fin > when, sa.and_(fin == when, rid > task_id))]


def _select(filters: Filters, position: tuple[dt.datetime, str] | None, newest_first: bool,
            limit: int) -> Any:
    order = ((results.c.finished_at.desc(), results.c.id.desc()) if newest_first
             else (results.c.finished_at.asc(), results.c.id.asc()))
    return (sa.select(results).where(*filters.clauses(), *_after(position, newest_first))
            .order_by(*order).limit(limit))


def page(store: ResultStore, filters: Filters, *, cursor: str | None = None, limit: int = 100,
         newest_first: bool = True) -> Page:
    """Up to ``limit`` rows after ``cursor``, in ``(finished_at, id)`` order."""
    position = decode_cursor(cursor, newest_first) if cursor else None
    rows = _fetch(store, _select(filters, position, newest_first, limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1], newest_first) if more and rows else None)


def iter_records(store: ResultStore, filters: Filters, *, chunk: int = 1000,
                 newest_first: bool = False) -> Generator[ResultRecord, None, None]:
    """Every matching row, one keyset page of ``chunk`` rows at a time (bounded memory),
    as one snapshot: the rows as they were when the first page was read.

    Every page is read on one connection in one read-only transaction
    (REPEATABLE READ on PostgreSQL; on SQLite, a read transaction, which sees
    one WAL snapshot), so a row written during the export (a task's latest
    row moving to another model's row or to a retry) can neither drop a task
    nor export it twice. The connection is held until the generator ends:
    it is given back when the generator is exhausted, closed or collected
    (a client that disconnects mid-export). Each page's read is bounded as
    every store operation is (the store's guard).

    A pooled connection found dead by the first page (the database restarted)
    is replaced and the export begun again, as :meth:`ResultStore.run` does;
    once rows were given, a failure ends the export: a new snapshot could
    repeat or skip rows. Outages raise :class:`StoreUnavailable`.
    """
    retried = False
    while True:
        given = False
        try:
            with store.engine.connect() as conn:
                _read_snapshot(conn)
                with conn.begin():
                    if conn.dialect.name == "sqlite":
                        # pysqlite starts no transaction before a SELECT: without BEGIN
                        # every page would be its own read transaction, its own snapshot
                        conn.exec_driver_sql("BEGIN")
                    position: tuple[dt.datetime, str] | None = None
                    while True:
                        query = _select(filters, position, newest_first, chunk)
                        with store._guard(conn):
                            rows = [_record(row) for row in conn.execute(query).mappings()]
                        given = given or bool(rows)
                        yield from rows
                        if len(rows) < chunk:
                            return
                        last = rows[-1]
                        if last.finished_at is None:  # pragma: no cover - NOT NULL
                            return
                        position = (last.finished_at, last.id)
        except Exception as exc:
            if is_row_error(exc) or not is_outage(exc):
                raise
            stale = isinstance(exc, DBAPIError) and exc.connection_invalidated
            if stale and not given and not retried:
                retried = True
                continue
            raise store.unavailable("cannot read results", exc) from exc


def _read_snapshot(conn: sa.Connection) -> None:
    """Make ``conn``'s next transaction read one snapshot, read-only, on PostgreSQL (the
    pool puts its isolation level and read-only flag back when it is returned)."""
    if conn.dialect.name == "postgresql":
        conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)


def stats(store: ResultStore, filters: Filters, *, by: str = "label",
          bucket: str | None = None, now: Now | None = None) -> list[dict[str, Any]]:
    """Counts and mean score per ``by`` (label, source, status, model or lang), and per time
    ``bucket`` (1m, 1h, 1d; the bucket's UTC start as ISO text) when one is given.

    Each task counts once, by its latest result; grouped by model, each model's rows.
    Groups come in bucket, then value order; no value (a NULL source, lang or label) is
    last on both backends (PostgreSQL puts NULL last by default, SQLite first).
    ``now`` ends a span given ``since`` alone (:func:`_check_span`)."""
    keys: list[Any] = []
    shown: list[Any] = []
    grouping = _grouping(store, filters, by, bucket, now)
    if grouping is not None:
        key, text = grouping
        keys.append(key)
        shown.append(text.label("bucket"))
    keys.append(results.c[by])
    shown.append(results.c[by].label(by))
    query = (sa.select(*shown, sa.func.count().label("count"),
                       sa.func.avg(results.c.score).label("mean_score"))
             .where(*filters.clauses(every_model=by == "model")).group_by(*keys)
             .order_by(*keys[:-1], results.c[by].is_(None), results.c[by]))
    if grouping is not None:
        query = query.limit(MAX_CELLS + 1)
    rows = store.run(lambda conn: conn.execute(query).mappings().all(), "cannot read results")
    if grouping is not None:
        _check_cells(len(rows), by, bucket, ranked=False)
    return [{**{k: r[k] for k in ([("bucket")] if bucket else []) + [by]},
             "count": int(r["count"]),
             "mean_score": None if r["mean_score"] is None else float(r["mean_score"])}
            for r in rows]


def _grouping(store: ResultStore, filters: Filters, by: str,
              bucket: str | None, now: Now | None = None) -> tuple[Any, Any] | None:
    """Check ``by`` and ``bucket`` (and the span of buckets, :func:`_check_span`); the
    bucket's group key and ISO text (:func:`_bucket_expr`), None without a bucket."""
    if by not in GROUPS:
        raise InvalidInput(f"cannot group by {by!r}; expected one of {', '.join(GROUPS)}")
    if bucket is None:
        return None
    if bucket not in BUCKETS:
        raise InvalidInput(f"unknown bucket {bucket!r}; expected one of {', '.join(BUCKETS)}")
    _check_span(store, filters, bucket, now)
    return _bucket_expr(store, bucket)


@dataclass(frozen=True)
class TopGroups:
    """What :func:`top_stats` gives: the groups of the top values, as :func:`stats` gives
    them, and the rows of the other values summed."""

    groups: list[dict[str, Any]]
    #: Per bucket (one entry without a bucket): ``values`` (how many values of ``by`` were
    #: summed there), the ``count`` and ``mean_score`` of their rows. Empty when no value
    #: was left out.
    other: list[dict[str, Any]]


def top_stats(store: ResultStore, filters: Filters, *, by: str = "label",
              bucket: str | None = None, limit: int = STATS_LIMIT,
              now: Now | None = None) -> TopGroups:
    """:func:`stats` for the ``limit`` values of ``by`` with the most rows over the whole
    range (ties in value order, no value last); the rows of every other value are summed
    per bucket.
    With ``limit`` values or fewer, ``groups`` is what :func:`stats` gives (a mean may
    differ in its last digits: the database sums in the order its plan reads).

    A group per source is unbounded (a source per customer, per feed); ranked in SQL,
    the answer holds at most ``limit`` + 1 groups per bucket however many there are.
    """
    if limit < 1:
        raise InvalidInput(f"limit must be at least 1, not {limit}")
    grouping = _grouping(store, filters, by, bucket, now)
    value, score = results.c[by], results.c.score
    keys: list[Any] = []
    shown: list[Any] = []
    if grouping is not None:
        key, text = grouping
        keys.append(key)
        shown += [key.label("bucket_key"), text.label("bucket")]
    per = (sa.select(*shown, value.label("value"), sa.func.count().label("n"),
                     sa.func.avg(score).label("mean"), sa.func.sum(score).label("total"),
                     sa.func.count(score).label("scored"))
           .where(*filters.clauses(every_model=by == "model")).group_by(*keys, value)
           .subquery("per"))
    # The rows of each value over every bucket, then its rank: one per distinct value.
    totals = sa.select(per, sa.func.sum(per.c.n).over(partition_by=per.c.value)
                       .label("value_n")).subquery("totals")
    ranked = sa.select(totals, sa.func.dense_rank().over(
        order_by=(totals.c.value_n.desc(), totals.c.value.is_(None), totals.c.value))
        .label("rank")).subquery("ranked")
    rank = sa.func.min(ranked.c.rank)
    bucket_cols = [ranked.c.bucket_key, ranked.c.bucket] if grouping is not None else []
    query = (sa.select(*bucket_cols, rank.label("rank"), sa.func.min(ranked.c.value).label("value"),
                       sa.func.sum(ranked.c.n).label("n"),
                       sa.func.max(ranked.c.mean).label("mean"),
                       sa.func.sum(ranked.c.total).label("total"),
                       sa.func.sum(ranked.c.scored).label("scored"),
                       sa.func.count().label("n_values"))
             .group_by(*bucket_cols, sa.case((ranked.c.rank <= limit, ranked.c.rank), else_=0))
             .order_by(*bucket_cols[:1], rank > limit, sa.func.min(ranked.c.value).is_(None),
                       sa.func.min(ranked.c.value)))
    if grouping is not None:
        query = query.limit(MAX_CELLS + 1)
    rows = store.run(lambda conn: conn.execute(query).mappings().all(), "cannot read results")
    if grouping is not None:
        _check_cells(len(rows), by, bucket, ranked=True)
    groups: list[dict[str, Any]] = []
    other: list[dict[str, Any]] = []
    for r in rows:
        head = {"bucket": r["bucket"]} if grouping is not None else {}
        if r["rank"] <= limit:  # one value: its mean as stats() computes it
            groups.append({**head, by: r["value"], "count": int(r["n"]),
                           "mean_score": None if r["mean"] is None else float(r["mean"])})
        else:
            scored = int(r["scored"])
            other.append({**head, "values": int(r["n_values"]), "count": int(r["n"]),
                          "mean_score": float(r["total"]) / scored if scored else None})
    return TopGroups(groups, other)


def _check_span(store: ResultStore, filters: Filters, bucket: str,
                now: Now | None = None) -> None:
    """:class:`InvalidInput` when ``since``..``until`` holds more than :data:`MAX_BUCKETS`
    buckets. Without ``since`` both missing bounds are the oldest and newest rows' times
    (one query, two index probes); with ``since`` alone, ``until`` is ``now()`` and
    nothing is read (the dashboard's case). Row times are on the Redis server's clock, so
    ``now`` should read it (the API's :meth:`Client.server_now`): this host's clock (the
    default) a week ahead of it refused a last hour per minute, one behind let through
    more buckets than the limit."""
    since, until = filters.since, filters.until
    if since is None:
        fin = results.c.finished_at
        query = sa.select(sa.select(sa.func.min(fin)).scalar_subquery(),
                          sa.select(sa.func.max(fin)).scalar_subquery())
        oldest, newest = store.run(lambda conn: tuple(conn.execute(query).one()),
                                   "cannot read results")
        if oldest is None:
            return  # no rows, no buckets
        since, until = as_utc(oldest), until or as_utc(newest)
    until = until or (now or utcnow)()
    span = (until - since).total_seconds() / _BUCKET_SECONDS[bucket]
    if span > MAX_BUCKETS:
        raise InvalidInput(
            f"bucket={bucket} over {since.isoformat()} .. {until.isoformat()} is "
            f"{int(span):,} buckets, over the limit of {MAX_BUCKETS:,}: narrow since/until "
            f"or take a wider bucket")


def _check_cells(got: int, by: str, bucket: str | None, *, ranked: bool) -> None:
    """:class:`InvalidInput` when a bucketed answer holds more than :data:`MAX_CELLS` groups
    (its query read at most one more row than that), saying what makes it smaller."""
    if got <= MAX_CELLS:
        return
    fewer = "a smaller limit (fewer values of by), " if ranked else ""
    raise InvalidInput(
        f"by={by} per bucket={bucket} is over {MAX_CELLS:,} groups (values x buckets), the "
        f"limit of one answer: narrow since/until, take a wider bucket, {fewer}or filter "
        f"the {by} values (source, label, model, lang, status)")


def _bucket_expr(store: ResultStore, bucket: str) -> tuple[Any, Any]:
    """The bucket to group on and its ISO text. PostgreSQL groups on the truncated timestamp
    and formats only the groups: formatting every row first made the aggregate a third slower."""
    unit, fmt = BUCKETS[bucket]
    if store.engine.dialect.name == "postgresql":
        key = sa.func.date_trunc(unit, sa.func.timezone("UTC", results.c.finished_at))
        return key, sa.func.to_char(key, 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
    text = sa.func.strftime(fmt, results.c.finished_at)
    return text, text


def distinct_sources(store: ResultStore, limit: int = 200) -> list[str]:
    """Up to ``limit`` distinct sources in order. On PostgreSQL a recursive query hops along
    the source index (one probe per source), so its cost does not grow with the rows."""
    src = results.c.source
    query: Any
    if store.engine.dialect.name == "postgresql":
        query = sa.text(
            f"WITH RECURSIVE s(source) AS ("
            f" (SELECT source FROM {results.name} WHERE source IS NOT NULL"
            f"  ORDER BY source LIMIT 1)"
            f" UNION ALL SELECT (SELECT r.source FROM {results.name} r WHERE r.source > s.source"
            f"  ORDER BY r.source LIMIT 1) FROM s WHERE s.source IS NOT NULL)"
            f" SELECT source FROM s WHERE source IS NOT NULL LIMIT :limit")
    else:
        query = sa.select(src).where(src.is_not(None)).distinct().order_by(src).limit(
            sa.bindparam("limit"))
    return store.run(lambda conn: [str(v) for v in conn.execute(query, {"limit": limit})
                                   .scalars()], "cannot read results")


def _fetch(store: ResultStore, query: Any) -> list[ResultRecord]:
    return store.run(lambda conn: [_record(row) for row in conn.execute(query).mappings()],
                     "cannot read results")


@dataclass(frozen=True)
class Comparison:
    """Two models' results on the texts both scored (``done`` rows of each)."""

    model_a: str
    model_b: str
    texts: int
    agree: int
    #: (label by A, label by B, count) for every pair of labels that differ.
    flips: list[tuple[str, str, int]]
    #: Mean of P_B(A's label) - P_A(A's label): how far B moved from A's answer.
    mean_change: float | None
    #: The texts B moved most, largest |change| first.
    largest: list[dict[str, Any]]
    #: Texts whose A label B has no probability for (another label set: the change
    #: counts it as 0, and agreement compares label names).
    unmatched: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agree / self.texts if self.texts else None

    def as_dict(self) -> dict[str, Any]:
        return {"model_a": self.model_a, "model_b": self.model_b, "texts": self.texts,
                "agree": self.agree, "agreement": self.agreement,
                "flips": [{"from": a, "to": b, "count": n} for a, b, n in self.flips],
                "mean_change": self.mean_change, "unmatched": self.unmatched,
                "largest": self.largest}


def compare(store: ResultStore, model_a: str, model_b: str, filters: Filters, *,
            top: int = 10) -> Comparison:
    """Compare ``model_b`` with ``model_a`` on the tasks both scored, in SQL.

    ``filters`` (source, label, lang, time range) select A's rows; a label
    filter means A's label. The change of a text is B's probability of A's
    label minus A's (read from B's ``scores``; 0 where B has no such label),
    so a flipped label counts as a large move whatever the label set; a text A labelled
    ``neutral`` is read on A's top label (:func:`_compared_label`). A text of the
    largest changes comes from any row of its task that kept it (:func:`_kept_text`):
    A's worker may have run with BERTSTREAM_STORE_TEXT=false.
    """
    a, b = results.alias("a"), results.alias("b")
    # A done row without a score is one an earlier worker stored with NaN scores (NaN in
    # ``scores``, not JSON: SQLite's json_extract refused the whole comparison): no
    # probability to compare, so the text is left out.
    conds = [a.c.model == model_a, b.c.model == model_b, a.c.status == "done",
             b.c.status == "done", a.c.score.is_not(None), b.c.score.is_not(None)]
    for name in ("source", "label", "lang"):
        value = getattr(filters, name)
        if value is not None:
            conds.append(a.c[name] == value)
    if filters.since is not None:
        conds.append(a.c.finished_at >= filters.since)
    if filters.until is not None:
        conds.append(a.c.finished_at < filters.until)
    # B without a score for A's label gave it nothing: a full move, never a NULL that one
    # backend sorts first and the other last, and that the mean would leave out.
    b_score = _score_of(store, b.c.scores, _compared_label(store, a.c.label, a.c.scores))
    # The join runs once: both backends materialise a CTE read more than once, and the
    # totals, the flips and the largest changes are each read from it. B's probability is
    # read once there (NULL: B has no such label), and the change and unmatched computed
    # from the column: written twice in the CTE, the lookup ran twice a row.
    pairs = (sa.select(a.c.id, a.c.label.label("label_a"), a.c.score.label("score_a"),
                       b.c.label.label("label_b"), b.c.score.label("score_b"),
                       sa.cast(b_score, sa.Float).label("prob_b"))
             .select_from(a.join(b, a.c.id == b.c.id)).where(*conds).cte("pairs"))
    p = pairs.c
    change = sa.func.coalesce(p.prob_b, 0.0) - p.score_a
    # A literal LIMIT: bound, SQLite's plan for the join below read far more rows.
    top_rows = (sa.select(pairs, change.label("change"))
                .order_by(sa.func.abs(change).desc(), p.id)
                .limit(sa.literal_column(str(int(top)))).subquery("top_rows"))
    t, task = top_rows.c, results.alias("task")
    none = {name: sa.cast(sa.null(), kind) for name, kind in (
        ("id", sa.String), ("text", sa.Text), ("label", sa.String), ("float", sa.Float),
        ("int", sa.Integer))}

    def branch(kind: int, order: Any, id_: Any, text: Any, label_a: Any, label_b: Any,
               n: Any, agree: Any, value: Any, unmatched: Any, score_a: Any,
               score_b: Any) -> Any:
        return sa.select(sa.literal(kind).label("kind"), order.label("ord"), id_.label("id"),
                         text.label("text"), label_a.label("label_a"),
                         label_b.label("label_b"), n.label("n"), agree.label("agree"),
                         value.label("value"), unmatched.label("unmatched"),
                         score_a.label("score_a"), score_b.label("score_b"))

    count = sa.func.count()
    totals = branch(0, sa.literal(0), none["id"], none["text"], none["label"], none["label"],
                    count, sa.func.sum(sa.case((p.label_a == p.label_b, 1), else_=0)),
                    sa.func.avg(change), sa.func.sum(sa.case((p.prob_b.is_(None), 1), else_=0)),
                    none["float"], none["float"]).select_from(pairs)
    flips = (branch(1, sa.func.row_number().over(order_by=(count.desc(), p.label_a,
                                                           p.label_b)),
                    none["id"], none["text"], p.label_a, p.label_b, count, none["int"],
                    none["float"], none["int"], none["float"], none["float"])
             .select_from(pairs).where(p.label_a != p.label_b).group_by(p.label_a, p.label_b))
    largest = branch(2, sa.func.row_number().over(order_by=(sa.func.abs(t.change).desc(),
                                                             t.id)),
                     t.id, _kept_text(task), t.label_a, t.label_b, none["int"], none["int"],
                     t.change, none["int"], t.score_a, t.score_b).select_from(
        top_rows.join(task, sa.and_(task.c.id == t.id, task.c.model == model_a)))
    query = sa.union_all(totals, flips, largest).order_by("kind", "ord")

    def read(conn: sa.Connection) -> list[Any]:
        if conn.dialect.name == "postgresql":
            # The plan's cost sets off JIT compilation, which took longer than the query
            # (for this transaction only: the pooled session keeps its own setting).
            conn.execute(sa.text("SET LOCAL jit = off"))
        return list(conn.execute(query).mappings())

    rows = store.run(read, "cannot read results")
    total = rows[0]
    flip_rows = [(str(r["label_a"]), str(r["label_b"]), int(r["n"]))
                 for r in rows if r["kind"] == 1]
    top_dicts = [{"id": r["id"], "text": r["text"], "label_a": r["label_a"],
                  "score_a": r["score_a"], "label_b": r["label_b"], "score_b": r["score_b"],
                  "change": r["value"]} for r in rows if r["kind"] == 2]
    mean = total["value"]
    return Comparison(model_a, model_b, int(total["n"] or 0), int(total["agree"] or 0),
                      flip_rows, None if mean is None else float(mean), top_dicts,
                      int(total["unmatched"] or 0))


def _compared_label(store: ResultStore, label: Any, scores: Any) -> Any:
    """The label of A whose probability :func:`compare` reads from B's scores: A's label,
    except on a text A labelled ``neutral``: A's top label by its scores. The neutral band
    labels a text ``neutral`` with its score the top label's probability, whether or not
    the model has a ``neutral`` label of its own (a three-way sentiment model): read by
    name, the change mixed two labels' probabilities, or B had none and it counted
    unmatched. On a tie ``neutral`` itself comes first, then the first by code point on
    both backends; members without a probability (JSON null) are passed over, and a row
    without any (no scores, or scores that are not JSON) is read by its label."""
    if store.engine.dialect.name == "postgresql":
        # The stored JSON as it is: a cast to JSONB first cost each neutral row a conversion.
        members = sa.func.json_each_text(scores).table_valued("key", "value")
        key: Any = members.c.key.collate("C")
    else:
        # Not JSON (NaN an earlier version stored beside a finite score): read by its label;
        # json_each refused it, and with it the whole comparison.
        valid = sa.case((sa.func.json_valid(scores) == 1, scores))
        members = sa.func.json_each(valid).table_valued("key", "value")
        key = members.c.key
    top = (sa.select(members.c.key).where(members.c.value.is_not(None))
           .order_by(sa.cast(members.c.value, sa.Float).desc(),
                     sa.case((members.c.key == NEUTRAL, 0), else_=1), key)
           .limit(1).scalar_subquery())
    return sa.case((label == NEUTRAL, sa.func.coalesce(top, label)), else_=label)


def _score_of(store: ResultStore, scores: Any, label: Any) -> Any:
    """``scores[label]`` in SQL: the JSON member named by another column. On SQLite by
    ``json_each``'s keys, not a JSON path: a path cannot quote a label holding ``"`` (any
    name a model's id2label gives is stored), which then read as missing."""
    if store.engine.dialect.name == "postgresql":
        return sa.cast(scores, JSONB).op("->>")(label)
    members = sa.func.json_each(scores).table_valued("key", "value")
    return sa.select(members.c.value).where(members.c.key == label).limit(1).scalar_subquery()


def _kept_text(task: Any) -> Any:
    """The text of the task of ``task`` (a row of the results table, aliased) from any of
    its rows that kept it: its own, else another model's row of the same id and text hash
    (a worker run with BERTSTREAM_STORE_TEXT=false keeps none). NULL when no row kept it.

    One probe of the primary key (id, model) per row that kept no text; COALESCE skips
    the probe on both backends when the row kept its own."""
    other = results.alias("other")
    from_other = (sa.select(other.c.text)
                  .where(other.c.id == task.c.id, other.c.text_sha256 == task.c.text_sha256,
                         other.c.text.is_not(None))
                  .limit(1).scalar_subquery())
    return sa.func.coalesce(task.c.text, from_other)


def stored_texts(store: ResultStore, filters: Filters, *,
                 batch: int = 1000) -> Iterator[dict[str, Any]]:
    """``{id, text, source, meta}`` of each matching task (its latest row's id, source and
    meta) whose text some row of it kept (see :func:`_kept_text`), oldest first.

    Read in keyset pages of ``batch`` rows (bounded memory), each through
    :meth:`ResultStore.run` as every other read: the store's guard bounds it, a dead
    pooled connection is replaced, and no connection is held while the caller sends
    a page (a rescore waits out its backpressure between pages). Rows after the newest
    one matching when the read began are not read: a task that a worker scores
    meanwhile (its new row becomes its latest) is not given twice.
    """
    task = results.alias("task")
    text = _kept_text(task).label("text")
    where = filters.clauses(columns=task.c)
    fin, rid = task.c.finished_at, task.c.id
    last = store.run(lambda conn: conn.execute(
        sa.select(fin, rid).where(*where).order_by(fin.desc(), rid.desc()).limit(1)).first(),
        "cannot read results")
    if last is None:
        return
    upto = sa.or_(fin < last[0], sa.and_(fin == last[0], rid <= last[1]))
    after: list[Any] = []
    while True:
        query = (sa.select(task.c.id, text, task.c.source, task.c.meta, fin)
                 .where(*where, upto, *after, text.is_not(None)).order_by(fin, rid).limit(batch))
        rows = _rows(store, query)
        for row in rows:
            meta = row["meta"]
            yield {"id": row["id"], "text": row["text"], "source": row["source"],
                   "meta": json.loads(meta) if isinstance(meta, str) else meta}
        if len(rows) < batch:
            return
        when, task_id = rows[-1]["finished_at"], rows[-1]["id"]
        after = [sa.or_(fin > when, sa.and_(fin == when, rid > task_id))]


def _rows(store: ResultStore, query: Any) -> list[Any]:
    return store.run(lambda conn: list(conn.execute(query).mappings()), "cannot read results")


def text_counts(store: ResultStore, filters: Filters) -> tuple[int, int]:
    """(matching tasks, those whose text some row kept: what :func:`stored_texts` gives)."""
    task = results.alias("task")
    query = (sa.select(sa.func.count(), sa.func.count(_kept_text(task)))
             .where(*filters.clauses(columns=task.c)))
    total, with_text = store.run(lambda conn: tuple(conn.execute(query).one()),
                                 "cannot read results")
    return int(total), int(with_text)
