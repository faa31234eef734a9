"""The results table and every query on it (SQLite by default, PostgreSQL in production).

The table is keyed by task id, so persisting is an idempotent upsert: a task
redelivered after a crash never makes a second row. A ``done`` row is final;
a ``failed`` row may be overwritten by a later successful attempt.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from contract.constants import RESULTS_TABLE, STATUS_DONE, STATUSES
from contract.errors import InvalidInput, StoreUnavailable

metadata = sa.MetaData()

results = sa.Table(
    RESULTS_TABLE,
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("source", sa.String(128), index=True),
    sa.Column("meta", sa.JSON),
    sa.Column("text", sa.Text),
    sa.Column("text_sha256", sa.String(64), nullable=False),
    sa.Column("text_chars", sa.Integer, nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("model_revision", sa.String(64)),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("label", sa.String(64), index=True),
    sa.Column("score", sa.Float),
    sa.Column("scores", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=1),
    sa.Column("truncated", sa.Boolean, nullable=False, default=False),
    sa.Column("tokens", sa.Integer),
    sa.Column("batch_size", sa.Integer),
    sa.Column("worker", sa.String(256)),
    sa.Column("submitted_at", sa.DateTime(timezone=True)),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False, index=True),
)


@dataclass
class ResultRecord:
    """One row of the results table as Python values."""

    id: str
    text_sha256: str
    text_chars: int
    model: str
    status: str
    finished_at: dt.datetime
    source: str | None = None
    meta: dict[str, Any] | None = None
    text: str | None = None
    model_revision: str | None = None
    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    error: str | None = None
    attempts: int = 1
    truncated: bool = False
    tokens: int | None = None
    batch_size: int | None = None
    worker: str | None = None
    submitted_at: dt.datetime | None = None
    started_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (datetimes as ISO 8601 strings)."""
        out = asdict(self)
        for key in ("submitted_at", "started_at", "finished_at"):
            value = out[key]
            out[key] = value.isoformat() if value is not None else None
        return out

    @property
    def latency_s(self) -> float | None:
        """Seconds from submit to the row being written, when both are known."""
        if self.submitted_at is None:
            return None
        return (self.finished_at - self.submitted_at).total_seconds()


_RECORD_FIELDS = tuple(f.name for f in fields(ResultRecord))


def utc_from_timestamp(ts: float) -> dt.datetime:
    """An aware UTC datetime from a UNIX timestamp."""
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)


def utcnow() -> dt.datetime:
    """Now, aware, in UTC."""
    return dt.datetime.now(dt.timezone.utc)


def _as_utc(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands naive datetimes back; everything we write is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)


def make_engine(database_url: str) -> Engine:
    """An engine for ``database_url`` with sane pooling for both backends.

    SQLite gets WAL and a busy timeout so the worker writing and clients
    reading at once do not fail with 'database is locked'.
    """
    if database_url.startswith("sqlite"):
        engine = sa.create_engine(database_url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return sa.create_engine(database_url, pool_pre_ping=True)


class _BulkUpsert:
    """The upsert statement compiled once, its rows converted by SQLAlchemy's own bind
    processors and sent with the driver's ``executemany``.

    ``Connection.execute(stmt, rows)`` re-derives the parameters of every row
    through several layers on each call: a third of a 1,024-row flush's time
    (bench/README.md, "Where the time goes"). The same processors applied in
    one loop give the same stored values in 70% of the time. When the
    compiled form is not what this expects, :meth:`build` gives None and
    the plain ``execute`` path is used.
    """

    def __init__(self, sql: str, names: list[str], defaults: dict[str, Any],
                 processors: dict[str, Any], positional: bool) -> None:
        self.sql = sql
        self.names = names
        self.defaults = defaults
        self.processors = processors
        self.positional = positional

    @classmethod
    def build(cls, stmt: Any, engine: Engine) -> _BulkUpsert | None:
        try:
            comp = stmt.compile(dialect=engine.dialect)
            processors = dict(getattr(comp, "_bind_processors", None) or {})
            positional = bool(comp.positional)
            names = (list(comp.positiontup) if positional
                     else list(dict.fromkeys(comp.bind_names.values())))
            # column binds have no value; the literals (attempts + 1, status) do
            defaults = {n: comp.binds[n].value for n in names}
        except Exception:  # noqa: BLE001 - any surprise: the plain path
            return None
        if not set(_RECORD_FIELDS) <= set(defaults) or len(set(names)) != len(names):
            return None
        return cls(str(comp), names, defaults, processors, positional)

    def execute(self, conn: Any, rows: list[dict[str, Any]]) -> None:
        procs, defaults = self.processors, self.defaults
        params: list[Any] = []
        for row in rows:
            values = dict(defaults)
            values.update(row)
            for name, proc in procs.items():  # None too, exactly as SQLAlchemy does
                values[name] = proc(values[name])
            params.append(tuple(values[n] for n in self.names) if self.positional else values)
        conn.exec_driver_sql(self.sql, params)


class ResultStore:
    """Reads and writes the results table. Takes an engine; owns no globals."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, database_url: str) -> ResultStore:
        """A store on a new engine for ``database_url``."""
        return cls(make_engine(database_url))

    def create_schema(self) -> None:
        """Create the table and indexes when missing (idempotent)."""
        try:
            metadata.create_all(self.engine, checkfirst=True)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot create schema: {exc}") from exc

    def close(self) -> None:
        """Dispose of the engine's connections."""
        self.engine.dispose()

    # -- writing --------------------------------------------------------

    def upsert(self, records: Sequence[ResultRecord]) -> None:
        """Write ``records`` in one transaction, keyed by id.

        Guarantees: all or nothing; a ``done`` row is never overwritten (a
        redelivered task keeps its first result); a ``failed`` row is
        replaced by the new attempt with ``attempts`` incremented.
        Raises :class:`StoreUnavailable` when the database refuses.
        """
        if not records:
            return
        rows = [self._row(r) for r in records]
        # Deduplicate within the batch: the same id twice in one flush keeps the first.
        unique: dict[str, dict[str, Any]] = {}
        for row in rows:
            unique.setdefault(row["id"], row)
        try:
            with self.engine.begin() as conn:
                writer = self._writer()
                if writer is not None:
                    writer.execute(conn, list(unique.values()))
                else:
                    conn.execute(self._upsert_statement(), list(unique.values()))
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"cannot write {len(unique)} result(s): {exc}") from exc

    def _writer(self) -> _BulkUpsert | None:
        if not hasattr(self, "_bulk"):
            self._bulk = _BulkUpsert.build(self._upsert_statement(), self.engine)
        return self._bulk

    def _row(self, record: ResultRecord) -> dict[str, Any]:
        # A shallow copy: dataclasses.asdict deep-copies every datetime and
        # JSON dict and was 70% of a null-model flush (issue 4 profile).
        # vars() holds exactly the dataclass fields (no slots, no extras): a
        # C-level copy, 10x cheaper than a getattr per field.
        row = vars(record).copy()
        if row["status"] not in STATUSES:
            raise InvalidInput(f"unknown status {row['status']!r}")
        return row

    def _upsert_statement(self) -> Any:
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            ins: Any = pg_insert(results)
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            ins = sqlite_insert(results)
        else:
            raise StoreUnavailable(f"unsupported database dialect {dialect!r}")
        excluded = ins.excluded
        updates = {
            c.name: getattr(excluded, c.name)
            for c in results.columns
            if c.name not in ("id", "attempts", "submitted_at")
        }
        updates["attempts"] = results.c.attempts + 1
        return ins.on_conflict_do_update(
            index_elements=[results.c.id],
            set_=updates,
            where=results.c.status != STATUS_DONE,
        )

    # -- reading --------------------------------------------------------

    def get(self, task_id: str) -> ResultRecord | None:
        """The row for ``task_id``, or None when it is not (yet) stored."""
        found = self.get_many([task_id])
        return found.get(task_id)

    def get_many(self, ids: Iterable[str]) -> dict[str, ResultRecord]:
        """Rows for the given ids that exist, keyed by id."""
        wanted = list(dict.fromkeys(ids))
        out: dict[str, ResultRecord] = {}
        try:
            with self.engine.connect() as conn:
                for start in range(0, len(wanted), 500):
                    chunk = wanted[start : start + 500]
                    query = sa.select(results).where(results.c.id.in_(chunk))
                    for row in conn.execute(query).mappings():
                        rec = _record(row)
                        out[rec.id] = rec
        except OperationalError as exc:
            raise StoreUnavailable(f"cannot read results: {exc}") from exc
        return out

    def query(
        self,
        *,
        ids: Sequence[str] | None = None,
        source: str | None = None,
        label: str | None = None,
        status: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        limit: int | None = 100,
        newest_first: bool = True,
    ) -> list[ResultRecord]:
        """Rows matching every given filter, by ``finished_at``.

        ``since``/``until`` bound ``finished_at`` (inclusive / exclusive).
        """
        query = sa.select(results).where(*_filters(ids, source, label, status, since, until))
        order = results.c.finished_at.desc() if newest_first else results.c.finished_at.asc()
        query = query.order_by(order, results.c.id)
        if limit is not None:
            query = query.limit(limit)
        try:
            with self.engine.connect() as conn:
                return [_record(row) for row in conn.execute(query).mappings()]
        except OperationalError as exc:
            raise StoreUnavailable(f"cannot read results: {exc}") from exc

    def aggregate(
        self,
        *,
        by: str = "label",
        source: str | None = None,
        status: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Counts and mean score grouped by ``label``, ``source``, ``status`` or ``model``."""
        if by not in ("label", "source", "status", "model"):
            raise InvalidInput(f"cannot group by {by!r}")
        column = results.c[by]
        query = (
            sa.select(
                column.label("key"),
                sa.func.count().label("count"),
                sa.func.avg(results.c.score).label("mean_score"),
            )
            .where(*_filters(None, source, None, status, since, until))
            .group_by(column)
            .order_by(sa.func.count().desc())
        )
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(query).mappings().all()
        except OperationalError as exc:
            raise StoreUnavailable(f"cannot read results: {exc}") from exc
        return [
            {by: r["key"], "count": int(r["count"]),
             "mean_score": None if r["mean_score"] is None else float(r["mean_score"])}
            for r in rows
        ]

    def count(self) -> int:
        """Number of rows stored."""
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(sa.select(sa.func.count()).select_from(results)).scalar_one())
        except OperationalError as exc:
            raise StoreUnavailable(f"cannot read results: {exc}") from exc


def _filters(
    ids: Sequence[str] | None,
    source: str | None,
    label: str | None,
    status: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
) -> list[Any]:
    conds: list[Any] = []
    if ids:
        conds.append(results.c.id.in_(list(ids)))
    if source is not None:
        conds.append(results.c.source == source)
    if label is not None:
        conds.append(results.c.label == label)
    if status is not None:
        conds.append(results.c.status == status)
    if since is not None:
        conds.append(results.c.finished_at >= since)
    if until is not None:
        conds.append(results.c.finished_at < until)
    return conds


def _record(row: Any) -> ResultRecord:
    data = dict(row)
    for key in ("submitted_at", "started_at", "finished_at"):
        data[key] = _as_utc(data[key])
    for key in ("meta", "scores"):
        # Some drivers hand JSON back as text.
        if isinstance(data[key], str):
            data[key] = json.loads(data[key])
    return ResultRecord(**data)
