"""The results table and every query on it (SQLite by default, PostgreSQL in production).

The table is keyed by task id, so persisting is an idempotent upsert: a task
redelivered after a crash never makes a second row. A ``done`` row is final;
a ``failed`` or ``expired`` row may be overwritten by a later attempt.

Errors are classified where they happen. A row the database refuses (a
value too long, a NUL, an unencodable string: ``DataError``,
``IntegrityError``, encoding errors) is that row's failure: the write is
bisected until the refused rows stand alone, and the rest commit. A lost,
refused or silent connection (``OperationalError``, ``InterfaceError``, a
timeout) is an outage: :class:`StoreUnavailable`, which callers retry.
Every operation is bounded in time (:class:`DbTimeouts`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import math
import os
import pathlib
import random
import re
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_types
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from contract.constants import (
    ENV_PREFIX,
    ID_COLUMN_CHARS,
    MIGRATIONS_TABLE,
    RESULTS_TABLE,
    STATUS_DONE,
    STATUSES,
    WINDOWS_TABLE,
)
from contract.errors import ConfigError, InvalidInput, StoreRefused, StoreUnavailable, causes
from contract.messages import id_problem
from contract.settings import Settings, mask_url

log = logging.getLogger(__name__)

T = TypeVar("T")

metadata = sa.MetaData()

results = sa.Table(
    RESULTS_TABLE,
    metadata,
    # Keyed by (task id, model): one text can hold a result from each model.
    sa.Column("id", sa.String(ID_COLUMN_CHARS), primary_key=True),
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("source", sa.String(ID_COLUMN_CHARS)),
    # none_as_null: a missing meta is SQL NULL, not the JSON text 'null'.
    sa.Column("meta", sa.JSON(none_as_null=True)),
    sa.Column("text", sa.Text),
    sa.Column("text_sha256", sa.String(64), nullable=False),
    sa.Column("text_chars", sa.Integer, nullable=False),
    sa.Column("model_revision", sa.String(64)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("label", sa.String(64), index=True),
    sa.Column("score", sa.Float),
    sa.Column("scores", sa.JSON(none_as_null=True)),
    sa.Column("error", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=1),
    sa.Column("truncated", sa.Boolean, nullable=False, default=False),
    sa.Column("tokens", sa.Integer),
    sa.Column("batch_size", sa.Integer),
    sa.Column("worker", sa.String(256)),
    sa.Column("submitted_at", sa.DateTime(timezone=True)),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False, index=True),
    # zh, en, mixed or other (contract.constants.LANGS); NULL on rows older than revision 0002.
    sa.Column("lang", sa.String(8), index=True),
    # How many windows a long text was scored in (NULL: one pass).
    sa.Column("windows", sa.Integer),
    # Is this row its task's latest result (the default views)? Kept by ResultStore.upsert.
    sa.Column("latest", sa.Boolean, nullable=False, server_default=sa.true(), default=True),
    # A page filtered by source or status reads its rows in (finished_at, id) order from
    # where the last page ended (revision 0005); equality lookups use them too.
    sa.Index(f"ix_{RESULTS_TABLE}_source_finished", "source", "finished_at", "id"),
    sa.Index(f"ix_{RESULTS_TABLE}_status_finished", "status", "finished_at", "id"),
)

#: The scores of each window of a text scored in windows (the sentence-level view).
windows = sa.Table(
    WINDOWS_TABLE,
    metadata,
    sa.Column("id", sa.String(ID_COLUMN_CHARS), primary_key=True),
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("window", sa.Integer, primary_key=True),
    sa.Column("start_char", sa.Integer, nullable=False),
    sa.Column("end_char", sa.Integer, nullable=False),
    sa.Column("tokens", sa.Integer, nullable=False),
    sa.Column("label", sa.String(64)),
    sa.Column("score", sa.Float),
    sa.Column("scores", sa.JSON(none_as_null=True)),
)


@dataclass(frozen=True)
class IdState:
    """A stored task id as an id check sees it: every row's text hash, and its latest
    row's hash, status, attempts and model."""

    hashes: frozenset[str]
    text_sha256: str
    status: str
    attempts: int
    model: str


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
    lang: str | None = None
    windows: int | None = None
    #: This row is its task's latest result, of any model (what the default views show).
    latest: bool = True

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (datetimes as ISO 8601 strings), its ``meta`` and ``scores``
        copied one level: ``dataclasses.asdict`` deep-copied every value, and that copy
        took most of the time of a large export."""
        out = {name: getattr(self, name) for name in _RECORD_FIELDS}
        for key in ("meta", "scores"):
            if isinstance(out[key], dict):
                out[key] = dict(out[key])
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


@dataclass
class WindowRecord:
    """One row of the windows table: one window of a text scored in windows."""

    id: str
    model: str
    window: int
    start_char: int
    end_char: int
    tokens: int
    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


#: A result row's windows, keyed by the row's (id, model).
Windows = dict[tuple[str, str], list[WindowRecord]]


def utc_from_timestamp(ts: float) -> dt.datetime:
    """An aware UTC datetime from a UNIX timestamp."""
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)


def utcnow() -> dt.datetime:
    """Now, aware, in UTC."""
    return dt.datetime.now(dt.timezone.utc)


@overload
def as_utc(value: dt.datetime) -> dt.datetime: ...
@overload
def as_utc(value: None) -> None: ...
def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """``value`` as an aware UTC datetime; a naive one is taken to be UTC already.

    Every time bound goes through this before it reaches SQL: SQLite compares
    the clock text (an offset would be ignored), and PostgreSQL reads a naive
    value in the session's TimeZone, not UTC. SQLite hands naive values back,
    and everything we write is UTC. A time whose UTC falls outside years 1 to
    9999 (``0001-01-01T00:00+05:00``) is :class:`InvalidInput`, not an
    ``OverflowError``: a bound a caller typed, refused as such.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    try:
        return value.astimezone(dt.timezone.utc)
    except OverflowError as exc:
        raise InvalidInput(f"time {value.isoformat()} is out of range: in UTC it falls "
                           "before year 1 or after year 9999") from exc


@dataclass(frozen=True)
class DbTimeouts:
    """How long database work may take; defaults are :class:`Settings`' defaults.

    ``connect_s`` bounds establishing a PostgreSQL connection; ``statement_s``
    bounds one operation (PostgreSQL's ``statement_timeout``, SQLite's wait
    for a lock, and on both a client-side guard that cuts a connection whose
    server stopped answering); ``keepalive_s`` is the TCP keepalive idle time
    on PostgreSQL connections (0: the OS default).
    """

    connect_s: float = Settings.db_connect_timeout_s
    statement_s: float = Settings.db_statement_timeout_s
    keepalive_s: int = Settings.db_keepalive_s

    @classmethod
    def from_settings(cls, settings: Settings) -> DbTimeouts:
        """The timeouts ``settings`` configure."""
        return cls(settings.db_connect_timeout_s, settings.db_statement_timeout_s,
                   settings.db_keepalive_s)

    @property
    def guard_s(self) -> float:
        """When the client-side guard cuts: after the server had its chance to time out."""
        return self.statement_s + max(1.0, self.statement_s / 10)


def make_engine(database_url: str, timeouts: DbTimeouts | None = None) -> Engine:
    """An engine for ``database_url`` with bounded waits on both backends.

    SQLite gets WAL and a busy timeout so the worker writing and clients
    reading at once do not fail with 'database is locked'; a new database
    file is created readable by its owner only (it holds the texts).
    PostgreSQL gets a connect timeout (cut short by a deadline,
    :meth:`ResultStore.until`), a statement timeout and TCP keepalives. Stale
    pooled connections are not pinged on checkout (a ping to a silent server
    would hang before any guard is armed); :class:`ResultStore` retries an
    operation once when its connection turns out to be dead.
    """
    t = timeouts or DbTimeouts()
    url = _parse_url(database_url)
    if url.get_backend_name() == "sqlite":
        _create_private(url.database)
        engine = sa.create_engine(url, connect_args={"timeout": t.statement_s})
        _this_process_only(engine)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
            # SQLite's own lower() folds ASCII only; PostgreSQL's folds every script, and a
            # case-insensitive search must find the same rows on both.
            dbapi_conn.create_function("lower", 1, _unicode_lower, deterministic=True)

        return engine
    args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and url.get_driver_name() in ("psycopg", "psycopg2"):
        args = _libpq_args(t, url.query.get("options"))
    try:
        engine = sa.create_engine(url, connect_args=args)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise ConfigError(f"{ENV_PREFIX}DATABASE_URL={mask_url(database_url)}: {exc}; "
                          f"{_SUPPORTED}") from exc
    _this_process_only(engine)
    if engine.dialect.name == "postgresql":
        sa.event.listen(engine, "handle_error", _end_read_only_session)
    if "connect_timeout" in args:
        sa.event.listen(engine, "do_connect", _connect_by_deadline)
    return engine


def _this_process_only(engine: Engine) -> None:
    """Never hand out a pooled connection another process opened.

    A forked process (a pre-fork web server's worker, multiprocessing) inherits the
    pool: two processes on one socket read each other's replies (another id's row,
    "result object does not return rows"). The client's at-fork hook drops the pool,
    but uWSGI forks from C, where no such hook runs, and a store used without a client
    has none. So each connection remembers the process that opened it; one checked out
    in another process is dropped without being closed (closing would end the parent's
    session) and replaced by a new one, as SQLAlchemy's documentation on pools and
    ``os.fork()`` advises."""
    def connect(_dbapi: Any, record: Any) -> None:
        record.info["pid"] = os.getpid()

    def checkout(_dbapi: Any, record: Any, proxy: Any) -> None:
        pid = os.getpid()
        if record.info.get("pid", pid) != pid:
            record.dbapi_connection = proxy.dbapi_connection = None
            raise sa.exc.DisconnectionError(
                f"connection opened by process {record.info['pid']}, checked out in {pid}")

    sa.event.listen(engine, "connect", connect)
    sa.event.listen(engine, "checkout", checkout)


#: SQLSTATE of a write refused because the session is read-only (read_only_sql_transaction).
READ_ONLY_SQLSTATE = "25006"


def _end_read_only_session(ctx: sa.engine.ExceptionContext) -> None:
    """Take a write refused as read-only for a lost connection: replace the session.

    A PostgreSQL session keeps the read-only default it began with (a database set
    ``default_transaction_read_only``, a standby a failover left it on): pooled, it
    refused every write after the database took writes again, and a worker requeued
    its flushes for ever. As a disconnect, the pool's connections are replaced and the
    store tries the work once more on a new session (:meth:`ResultStore._run`); while
    the database stays read-only, that is an outage as before.
    """
    if getattr(ctx.original_exception, "sqlstate", None) == READ_ONLY_SQLSTATE:
        ctx.is_disconnect = True


#: What a database URL may name.
_SUPPORTED = ("bertstream stores results in PostgreSQL (postgresql://USER@HOST/DB, "
              "on the psycopg 3 it installs) or SQLite (sqlite:///PATH)")


def _parse_url(database_url: str) -> sa.engine.URL:
    """The URL, with ``postgres://`` and a bare ``postgresql://`` on psycopg 3.

    The driver bertstream installs is psycopg 3; SQLAlchemy's default for a
    bare ``postgresql://`` is psycopg2 on some versions, and ``postgres://``
    (the form many hosts hand out) is no dialect name of its own.
    """
    try:
        url = sa.engine.make_url(database_url)
    except (sa.exc.ArgumentError, ValueError) as exc:  # ValueError: a port that is no number
        raise ConfigError(f"{ENV_PREFIX}DATABASE_URL={mask_url(database_url)} is not a "
                          f"database URL; {_SUPPORTED}") from exc
    if url.drivername in ("postgres", "postgresql"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _unicode_lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _libpq_args(t: DbTimeouts, options: Any) -> dict[str, Any]:
    statement_ms = int(t.statement_s * 1000)
    extra = f"-c statement_timeout={statement_ms}"
    args: dict[str, Any] = {
        "connect_timeout": _libpq_seconds(t.connect_s),
        "options": f"{options} {extra}" if isinstance(options, str) else extra,
        # unacknowledged data fails the connection instead of waiting for TCP's
        # own retransmission timeout (minutes)
        "tcp_user_timeout": int(t.guard_s * 1000),
    }
    if t.keepalive_s:
        args.update(keepalives=1, keepalives_idle=t.keepalive_s,
                    keepalives_interval=max(1, t.keepalive_s // 3), keepalives_count=3)
    return args


def _libpq_seconds(seconds: float) -> int:
    """``seconds`` as libpq's connect timeout counts them: whole seconds, at least 2."""
    return max(2, int(seconds + 0.999))


def _connect_by_deadline(dialect: Any, _record: Any, cargs: Any,
                         cparams: dict[str, Any]) -> Any:
    """A connection opened under a deadline (:meth:`ResultStore.until`) waits for the
    server until then at most (libpq's whole seconds), not the full connect timeout.
    It connects with a copy of ``cparams``: older SQLAlchemy 2.0 releases hand every
    connect the engine's own dict, where a lowered timeout stayed for later ones."""
    until = _deadline()
    if until is None:
        return None
    left = _libpq_seconds(until - time.monotonic())
    return dialect.connect(*cargs, **{**cparams, "connect_timeout": min(
        cparams["connect_timeout"], left)})


def _create_private(path: str | None) -> None:
    """Create an SQLite database file as 0600 before SQLite creates it as 0644.

    SQLite gives its -wal and -shm files the database file's mode. An
    existing file keeps its mode; ``:memory:`` and URI paths are left alone.
    A path it cannot create (an existing file, a directory missing, not a
    directory or closed to this user) is left for SQLite to fail on, where
    :meth:`ResultStore.unavailable` says why.
    """
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _blocked_on_the_way(path: str, fix: str) -> str | None:
    """What stops this user reaching the directory of the absolute ``path``: the first
    component on the way that is no directory, or the first directory it may not
    search. None when nothing does, or when a missing component comes first (a
    directory to create)."""
    folder = pathlib.PurePath(path).parent
    for step in [*reversed(folder.parents), folder]:
        try:
            mode = os.stat(step).st_mode
        except OSError:
            return None
        if not stat.S_ISDIR(mode):
            what = "a file, not a directory" if stat.S_ISREG(mode) else "not a directory"
            return f"{step} is {what} (on the way to {path}): {fix}"
        if not os.access(step, os.X_OK):
            return f"this user may not search {step} (on the way to {path}): grant it or {fix}"
    return None


def is_row_error(exc: BaseException) -> bool:
    """True when ``exc`` is about the data written, not the connection.

    ``DataError`` (too long, NUL, out of range) and ``IntegrityError`` come
    from the database; encoding and value errors come from the driver or a
    bind processor before anything is sent.
    """
    if isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError)):
        return True
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, DBAPIError):
        return is_row_error(exc.orig) if isinstance(exc.orig, BaseException) else False
    return isinstance(exc, (UnicodeError, ValueError, TypeError, OverflowError, InvalidInput))


#: SQLSTATEs of a transaction the server aborted to break a lock cycle (40P01) or a
#: serialization conflict (40001): running it again is the remedy.
CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})
#: How many times :meth:`ResultStore._run` runs such a transaction again.
CONFLICT_RETRIES = 5


def _is_conflict(exc: BaseException) -> bool:
    """True when ``exc`` is a deadlock or serialization failure the server rolled back."""
    return (isinstance(exc, DBAPIError)
            and getattr(exc.orig, "sqlstate", None) in CONFLICT_SQLSTATES)


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means the database cannot be used right now."""
    return isinstance(exc, (SQLAlchemyError, OSError, TimeoutError)) and not is_row_error(exc)


#: SQLite's result code for a file that holds no database (SQLITE_NOTADB).
_SQLITE_NOTADB = 26
#: SQLite's result code for a file it cannot open (SQLITE_CANTOPEN).
_SQLITE_CANTOPEN = 14
#: SQLSTATE of a privilege the role lacks (insufficient_privilege): a GRANT to run.
PRIVILEGE_SQLSTATE = "42501"
#: SQLSTATE of a search path naming no schema the role may use (invalid_schema_name: "no
#: schema has been selected to create in"): a schema without USAGE is left out of it.
NO_SCHEMA_SQLSTATE = "3F000"
#: The privileges bertstream's commands use, per table: what a refusal's GRANT names
#: when it cannot tell which one the statement needed (``contract.migrate`` checks a
#: command's own at its start). The revision table is only read but by the migrating
#: role (``bertstream db upgrade``), which owns the tables: SELECT is all others need.
TABLE_PRIVILEGES = {RESULTS_TABLE: "SELECT, INSERT, UPDATE, DELETE",
                    WINDOWS_TABLE: "SELECT, INSERT, DELETE",
                    MIGRATIONS_TABLE: "SELECT"}
#: Connection refusals that are settings, as PostgreSQL words them (libpq gives a refused
#: connection no SQLSTATE: its message is all there is), each with its cause and its fix
#: ({0}: the name the message quotes, {role}: the URL's user). "too many connections"
#: and a server starting or shutting down stay outages.
_LOGIN_REFUSALS = (
    (re.compile(r'password authentication failed for user "([^"]*)"'),
     "password authentication failed for role {0}",
     f"check the user and password of {ENV_PREFIX}DATABASE_URL"),
    (re.compile(r'role "([^"]*)" does not exist'), "role {0} does not exist",
     f"create it (CREATE ROLE {{0}} LOGIN PASSWORD '...') or fix the user of "
     f"{ENV_PREFIX}DATABASE_URL"),
    (re.compile(r'role "([^"]*)" is not permitted to log in'), "role {0} may not log in",
     "ALTER ROLE {0} LOGIN"),
    (re.compile(r'permission denied for database "([^"]*)"'),
     "role {role} may not connect to database {0}", "GRANT CONNECT ON DATABASE {0} TO {role}"),
    (re.compile(r'database "([^"]*)" does not exist'), "database {0} does not exist",
     f"create it (CREATE DATABASE {{0}}) or fix the database of {ENV_PREFIX}DATABASE_URL"),
    (re.compile(r"no pg_hba\.conf entry"), "the server's pg_hba.conf admits no such "
     "connection", "add a pg_hba.conf entry for this host, user and database"),
)
#: Statement refusals (SQLSTATE 42501): what the role lacks, and the GRANT.
_PRIVILEGE_REFUSALS = (
    (re.compile(r"permission denied for (?:table|relation) (\S+)"),
     "role {role} lacks a privilege on table {0}", "GRANT {privileges} ON {0} TO {role}"),
    (re.compile(r"permission denied for schema (\S+)"),
     "role {role} lacks a privilege on schema {0}",
     "GRANT USAGE, CREATE ON SCHEMA {0} TO {role} (to read and write only, USAGE is "
     "enough), or run `bertstream db upgrade` as the schema's owner"),
    (re.compile(r"must be owner of (?:table|relation) (\S+)"),
     "role {role} does not own table {0}", "run `bertstream db upgrade` as its owner"),
    (re.compile(r"permission denied for database (\S+)"),
     "role {role} may not connect to database {0}", "GRANT CONNECT ON DATABASE {0} TO {role}"),
)


def ping(conn: Connection) -> None:
    """The cheapest query, for :meth:`ResultStore.run`: does the database answer?"""
    conn.exec_driver_sql("SELECT 1")


def sql_name(name: str) -> str:
    """``name`` as SQL writes an identifier: as it is when plain, else double-quoted."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def refusal(exc: BaseException, role: str | None) -> str | None:
    """The cause and its fix when ``exc`` is PostgreSQL refusing ``role`` (the URL's user)
    something a setting decides: a privilege (SQLSTATE 42501), a search path naming no
    schema it may use (3F000), a login (a wrong password,
    a role or database that does not exist, no CONNECT, no pg_hba.conf entry). None for
    anything else: an outage (refused, dropped or silent connections, too many
    connections, a read-only standby, an administrator's shutdown) or a row error. The
    text names no host and no password."""
    for cause in causes(exc):
        orig = getattr(cause, "orig", None) or cause
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        text = str(orig)
        rules: tuple[tuple[re.Pattern[str], str, str], ...]
        if sqlstate == PRIVILEGE_SQLSTATE:
            rules = _PRIVILEGE_REFUSALS
        elif sqlstate is None and "FATAL:" in text:
            rules = _LOGIN_REFUSALS
            text = text.split("FATAL:", 1)[1]
        elif sqlstate == NO_SCHEMA_SQLSTATE:
            rules = ()
        else:
            continue
        line = text.strip().splitlines()[0] if text.strip() else type(orig).__name__
        who = sql_name(role) if role else "<role>"
        if sqlstate == NO_SCHEMA_SQLSTATE:
            return (f"{line}: the search_path of role {who} names no schema it may use: "
                    f"GRANT USAGE, CREATE ON SCHEMA <the schema> TO {who}, or set its "
                    f"search_path (ALTER ROLE {who} SET search_path = ...)")
        for pattern, what, fix in rules:
            found = pattern.search(line)
            if found:
                name = found.group(1).strip('"')
                privileges = TABLE_PRIVILEGES.get(name, "SELECT, INSERT, UPDATE, DELETE")
                shown = sql_name(name)
                return (f"{what.format(shown, role=who)}: "
                        f"{fix.format(shown, role=who, privileges=privileges)}")
        if sqlstate == PRIVILEGE_SQLSTATE:
            return f"{line}: grant role {who} what it lacks"
    return None


def _sqlite_errors(exc: BaseException) -> Iterator[tuple[BaseException, BaseException, int | None]]:
    """Each cause of ``exc``, the driver's error it is or wraps (a SQLAlchemy error's
    ``orig``), and that error's SQLite result code (None: not an SQLite error, or Python
    3.10, whose sqlite3 errors carry no code): what tells a setting to fix on SQLite."""
    for cause in causes(exc):
        orig = getattr(cause, "orig", None) or cause
        yield cause, orig, getattr(orig, "sqlite_errorcode", None)


#: A host a driver's message names: psycopg's "failed to resolve host 'db.internal'",
#: libpq's 'could not translate host name "db.internal" to address'.
_HOST_NAMED = re.compile(r"""\b(host(?: name)?) (["'])[^"']*\2""")


def brief_cause(exc: BaseException) -> str:
    """Why ``exc`` happened in the database driver's own words, in one short line without
    the host, port or URL (a health answer shows it): the error's type and the server's
    message, or the driver's reason ("Connection refused")."""
    orig: BaseException = exc
    for cause in causes(exc):
        inner = getattr(cause, "orig", None)
        if isinstance(inner, BaseException):
            orig = inner
            break
    text = str(orig)
    if "FATAL:" in text:
        text = text.split("FATAL:", 1)[1]
    elif " failed: " in text:
        text = text.rsplit(" failed: ", 1)[1]
    lines = text.strip().splitlines()
    line = _HOST_NAMED.sub(r"\1", lines[0].strip() if lines else "")
    line = line if len(line) <= 120 else line[:117] + "..."
    return f"{type(orig).__name__}: {line}" if line else type(orig).__name__


#: How long a guard's watcher thread waits with nothing to watch before it ends.
_GUARD_IDLE_S = 30.0

#: How long an operation that starts a guard's watcher waits for it to be waiting.
_GUARD_START_WAIT_S = 2.0

#: SQLite virtual-machine steps between two looks at the clock of a guarded statement
#: (milliseconds of work). Each look is Python, so it takes the interpreter's lock, which
#: a busy thread beside it holds up to a switch interval: looked at every 10 000 steps, a
#: scan ran several times slower beside one.
_SQLITE_STEPS = 1_000_000

#: This thread's deadline (:meth:`ResultStore.until`), as ``until``.
_DEADLINE = threading.local()


def _deadline() -> float | None:
    """The :func:`time.monotonic` time this thread's database work must end by, if any."""
    return getattr(_DEADLINE, "until", None)


class _Watched:
    """One operation the guard watches: when to cut its connection, and whether it did."""

    __slots__ = ("by_deadline", "cut", "dbapi", "until")

    def __init__(self, until: float, dbapi: Any, by_deadline: bool) -> None:
        self.until, self.dbapi, self.cut, self.by_deadline = until, dbapi, False, by_deadline


class _Guard:
    """Cuts the connection of an operation still running ``seconds`` after it began, or
    at the thread's deadline (:meth:`ResultStore.until`) when that comes first.

    PostgreSQL's own statement timeout needs a server that answers. A server
    that accepts TCP and then stays silent (a hung host, a proxy whose far
    side is gone) would keep the caller in the driver's poll forever: the
    guard shuts the socket down, so the driver raises and the operation ends
    as an outage. On SQLite it interrupts the running statement.

    One watcher thread per guard holds the operations in flight and sleeps
    until the earliest cut. A thread started per operation, as a
    ``threading.Timer`` does, cost more than a small read itself.

    A pre-fork server (uWSGI) may fork from C right after an operation, where
    no at-fork hook of Python runs: a thread of the parent that was passing
    the interpreter's lock at that moment leaves the lock's state broken in
    the child, which then hangs at its first database read. So SQLite needs
    no thread: the statement itself looks at the clock every
    :data:`_SQLITE_STEPS` steps (SQLite's progress handler) and stops. On
    PostgreSQL the operation that starts the watcher runs once the watcher
    waits, so the watcher's start is over before that operation returns. Its
    own wakes (at the cut it planned, when it ends idle) come at no operation:
    a fork from C at one of those moments still leaves a child that hangs.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._running: set[_Watched] = set()
        self._watcher: threading.Thread | None = None
        self._waiting = False  # the watcher waits (on ``_cond``) for its next cut
        self._wakes_at = 0.0  # when the waiting watcher wakes by itself (monotonic)

    @contextlib.contextmanager
    def __call__(self, conn: Connection) -> Iterator[_Watched]:
        """Guards the operation on ``conn`` within; what it yields says whether it cut."""
        if self._pid != os.getpid():  # a forked child: the parent's watcher is not here
            self._reset()
        until, deadline = time.monotonic() + self.seconds, _deadline()
        cut_at = until if deadline is None else min(until, deadline)
        watched = _Watched(cut_at, conn.connection.dbapi_connection, cut_at < until)
        if isinstance(watched.dbapi, sqlite3.Connection):
            with _sqlite_stops_at(watched):
                yield watched
            return
        with self._cond:
            self._running.add(watched)
            if self._watcher is None or not self._watcher.is_alive():
                self._waiting = False
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name="bertstream-db-guard")
                self._watcher.start()
                self._cond.wait_for(lambda: self._waiting, _GUARD_START_WAIT_S)
            elif cut_at < self._wakes_at:
                # A cut before the one it sleeps until (a deadline): wake it to plan
                # again. Only then: each wake is a thread passing the interpreter's lock.
                # notify_all: an operation starting a watcher may wait on it too.
                self._cond.notify_all()
        try:
            yield watched
        finally:
            with self._cond:
                self._running.discard(watched)

    def _watch(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for watched in [w for w in self._running if w.until <= now]:
                    self._running.discard(watched)
                    watched.cut = True
                    try:
                        _cut(watched.dbapi, watched.by_deadline)
                    except Exception:  # noqa: BLE001 - the watcher must outlive any one cut
                        log.exception("cannot cut a database connection")
                earliest = min((w.until for w in self._running), default=None)
                if not self._waiting:
                    self._waiting = True
                    self._cond.notify_all()  # the operation that started this thread
                self._wakes_at = now + _GUARD_IDLE_S if earliest is None else earliest
                if earliest is not None:
                    self._cond.wait(earliest - now)
                elif not self._cond.wait(_GUARD_IDLE_S) and not self._running:
                    # Idle: end, so a store no longer used holds no thread; the next
                    # operation starts a watcher again.
                    self._watcher = None
                    return


@contextlib.contextmanager
def _sqlite_stops_at(watched: _Watched) -> Iterator[None]:
    """SQLite statements run within stop (``interrupted``) once ``watched.until`` passed:
    the guard's cut, made by the statement's own thread."""
    def past_until() -> int:
        if time.monotonic() < watched.until:
            return 0
        watched.cut = True
        return 1

    watched.dbapi.set_progress_handler(past_until, _SQLITE_STEPS)
    try:
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):  # closed within (a migration's own)
            watched.dbapi.set_progress_handler(None, 0)


def _cut(dbapi: Any, by_deadline: bool = False) -> None:
    """End the operation on ``dbapi``: the guard's statement time ran out (the server is
    silent: an error), or the caller's deadline came first (a warning: the server may
    only be slow)."""
    interrupt = getattr(dbapi, "interrupt", None)  # SQLite drivers but sqlite3
    if callable(interrupt):
        interrupt()
        return
    fileno = getattr(dbapi, "fileno", None)  # psycopg 3 and psycopg2
    if not callable(fileno):
        return
    if by_deadline:
        log.warning("the database did not answer by the caller's deadline: cutting the "
                    "connection")
    else:
        log.error("database silent for too long: cutting the connection")
    with contextlib.suppress(OSError, ValueError):
        sock = socket.socket(fileno=os.dup(fileno()))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


@dataclass(frozen=True)
class Refused:
    """A record the database refused (a row error), and why."""

    record: ResultRecord
    reason: str


class Upserted(list[Refused]):
    """What :meth:`ResultStore.upsert` did: the records the database refused (the list
    itself) and :attr:`written`, the records it wrote.

    A record it did not write is one whose id already had a ``done`` row (kept, also
    when another worker committed it a moment before), or another copy of its (id,
    model) in the same call that the store kept instead.
    """

    def __init__(self, refused: Iterable[Refused] = (),
                 written: Iterable[ResultRecord] = ()) -> None:
        super().__init__(refused)
        self.written: list[ResultRecord] = list(written)


class _DoneRowKept(Exception):
    """The fast upsert wrote fewer rows than it was given: a ``done`` row stood in the
    way of one. The transaction is rolled back and written again, row by row told."""


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

    def execute(self, conn: Any, rows: list[dict[str, Any]]) -> int:
        """Write ``rows``; gives how many the database wrote (the driver's row count)."""
        procs, defaults = self.processors, self.defaults
        params: list[Any] = []
        for row in rows:
            values = dict(defaults)
            values.update(row)
            for name, proc in procs.items():  # None too, exactly as SQLAlchemy does
                values[name] = proc(values[name])
            params.append(tuple(values[n] for n in self.names) if self.positional else values)
        return int(conn.exec_driver_sql(self.sql, params).rowcount)


class ResultStore:
    """Reads and writes the results table. Takes an engine; owns no globals."""

    def __init__(self, engine: Engine, timeouts: DbTimeouts | None = None) -> None:
        self.engine = engine
        self.timeouts = timeouts or DbTimeouts()
        self._guard = _Guard(self.timeouts.guard_s)

    @classmethod
    def from_url(cls, database_url: str, timeouts: DbTimeouts | None = None) -> ResultStore:
        """A store on a new engine for ``database_url``."""
        return cls(make_engine(database_url, timeouts), timeouts)

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultStore:
        """A store on ``settings.database_url`` with the timeouts ``settings`` configure."""
        return cls.from_url(settings.database_url, DbTimeouts.from_settings(settings))

    def create_schema(self) -> None:
        """Bring the schema to the code's revision: the migrations, as ``db upgrade``.

        Idempotent. Raises :class:`StoreUnavailable` when the database cannot
        be reached.
        """
        from contract import migrate

        migrate.upgrade(self)

    def has_table(self) -> bool:
        """True when the results table exists (a reader must not create it)."""
        return self._run(lambda conn: sa.inspect(conn).has_table(RESULTS_TABLE),
                         "cannot reach the results database")

    def close(self) -> None:
        """Dispose of the engine's connections."""
        self.engine.dispose()

    @staticmethod
    @contextlib.contextmanager
    def until(deadline: float | None) -> Iterator[None]:
        """Database work this thread does within ends by ``deadline`` (a
        :func:`time.monotonic` time; None: no deadline but an outer one), on any store:
        a connection still busy then is cut as the guard cuts, none is opened (or opened
        again) after it, and one opened before it waits for the server until then at
        most. Work cut short is :class:`StoreUnavailable`."""
        outer = _deadline()
        _DEADLINE.until = min((d for d in (outer, deadline) if d is not None), default=None)
        try:
            yield
        finally:
            _DEADLINE.until = outer

    def run(self, work: Callable[[Connection], T], what: str) -> T:
        """``work`` on a guarded connection, outages as :class:`StoreUnavailable`."""
        return self._run(work, what)

    def run_long(self, work: Callable[[Connection], T], what: str, seconds: float) -> T:
        """:meth:`run` with ``seconds`` instead of the statement timeout, for schema
        migrations (waiting for another process's migration; rewriting a large table).

        PostgreSQL's statement timeout is lifted to ``seconds`` for the session, and
        the guard cuts at ``seconds``. The connection is closed afterwards, not pooled:
        its session settings (and any lock a failed ``work`` left) end with it.
        """
        def long(conn: Connection) -> T:
            try:
                if conn.dialect.name == "postgresql":
                    conn.execute(sa.text("SELECT set_config('statement_timeout', :ms, false)"),
                                 {"ms": str(int(seconds * 1000))})
                    conn.commit()
                return work(conn)
            finally:
                conn.invalidate()

        return self._run(long, what, guard=_Guard(seconds))

    def _run(self, work: Callable[[Connection], T], what: str, *, begin: bool = False,
             guard: _Guard | None = None) -> T:
        """``work`` on a guarded connection (in a transaction when ``begin``).

        A connection found dead (a pooled one after a database restart) is
        replaced and ``work`` tried once more; not one the guard cut (the server
        was silent: a new connection would wait for it too), nor past the thread's
        deadline (:meth:`until`), nor is any opened then. A transaction the server
        aborted to break a deadlock or a serialization conflict is run again,
        up to :data:`CONFLICT_RETRIES` times after a short random pause: the
        remedy PostgreSQL documents, where a worker would otherwise take it
        for an outage and requeue its whole flush. Outages raise
        :class:`StoreUnavailable`; row errors propagate as they are.
        """
        stale_retried, conflicts = False, 0
        while True:
            deadline, watched = _deadline(), None
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreUnavailable(f"{what}: no answer from the database in time")
            try:
                with self.engine.connect() as conn, (guard or self._guard)(conn) as watched:
                    if not begin:
                        return work(conn)
                    with conn.begin():
                        return work(conn)
            except Exception as exc:
                if is_row_error(exc):
                    raise
                if not is_outage(exc):
                    raise
                if _is_conflict(exc) and conflicts < CONFLICT_RETRIES:
                    conflicts += 1
                    log.info("%s: %s; running the transaction again (%d)", what,
                             _first_line(exc), conflicts)
                    time.sleep(random.uniform(0.005, 0.05) * conflicts)
                    continue
                stale = (isinstance(exc, DBAPIError) and exc.connection_invalidated
                         and not (watched is not None and watched.cut))
                if stale and not stale_retried and (deadline is None
                                                    or time.monotonic() < deadline):
                    stale_retried = True
                    continue
                raise self.unavailable(what, exc) from exc

    def unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        """The error for ``exc``, an outage :meth:`_run` would not retry: a
        :class:`StoreRefused` naming the fix when the database refuses this role or URL
        (:func:`refusal`) or the URL's SQLite file holds no database, else
        :class:`StoreUnavailable`."""
        problem = (refusal(exc, self.engine.url.username) or self._not_a_database(exc)
                   or self._cannot_open(exc))
        if problem is not None:
            return StoreRefused(f"{what}: {_first_line(exc)}; a setting to fix, not an "
                                f"outage: {problem}", problem)
        return StoreUnavailable(f"{what}: {_first_line(exc)}")

    def _not_a_database(self, exc: BaseException) -> str | None:
        """The fix when ``exc`` is SQLite finding no database in the URL's file (one
        holding something else): a setting to fix, as a refusal is, not an outage that
        a wait mends. None for anything else."""
        if self.engine.dialect.name != "sqlite":
            return None
        if any(code == _SQLITE_NOTADB or str(orig).endswith("is not a database")
               for _, orig, code in _sqlite_errors(exc)):  # Python 3.10: no code
            return (f"{self.engine.url.database} is not an SQLite database: point "
                    f"{ENV_PREFIX}DATABASE_URL at the results database's file (or at "
                    "a path where none is yet)")
        return None

    def _cannot_open(self, exc: BaseException) -> str | None:
        """The fix when ``exc`` is SQLite unable to open the URL's file for a reason the
        path shows (its directory missing, a directory in its place, a file in place of
        a directory on the way, a directory this user may not search or create it in):
        a setting, not an outage. None for anything else (a lack of file handles, a
        disk that went away: a wait may mend those)."""
        database = self.engine.url.database
        if self.engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return None
        opened = any(code == _SQLITE_CANTOPEN or "unable to open database file" in str(cause)
                     for cause, _, code in _sqlite_errors(exc))
        if not opened:
            return None
        path = os.path.abspath(database)  # a relative one lies under the working directory
        fix = f"fix {ENV_PREFIX}DATABASE_URL"
        if os.path.isdir(path):
            return f"{path} is a directory: {fix} to name a file in it"
        blocked = _blocked_on_the_way(path, fix)
        if blocked is not None:
            return blocked
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            return f"{folder} does not exist (the directory of {path}): create it or {fix}"
        if not os.path.exists(path) and not os.access(folder, os.W_OK | os.X_OK):
            return (f"cannot create {path}: this user may not write in {folder}; "
                    f"grant it or {fix}")
        if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
            return f"this user may not read and write {path}: grant it or {fix}"
        return None

    # -- writing --------------------------------------------------------

    def upsert(self, records: Sequence[ResultRecord],
               windows: Windows | None = None) -> Upserted:
        """Write ``records`` keyed by id; gives the records the database refused, a list
        whose ``written`` holds the records it wrote (:class:`Upserted`).

        ``windows`` holds the window rows of records scored in windows, keyed
        by the record's (id, model). They are written in the transaction of
        their record and follow its rules: a ``done`` row keeps the windows
        it has (none are added), a row replaced by a new attempt gets the new
        attempt's windows; a refused window refuses its record.

        Guarantees: a ``done`` row is never overwritten (a redelivered task
        keeps its first result); a ``failed`` or ``expired`` row is replaced by
        the new attempt with ``attempts`` incremented. Normally one
        transaction; when a row is refused, the write is bisected into
        smaller transactions until each refused row stands alone, so every
        other row still commits.
        Raises :class:`StoreUnavailable` on an outage: then none of the
        transactions not yet committed are.
        """
        unique: dict[tuple[str, str], ResultRecord] = {}
        for r in records:
            # The same (id, model) twice in one batch follows the rule between batches: a
            # done record stands, any other is replaced by the later one (an expired copy
            # and its resubmission in one flush keep the resubmission's result).
            key = (r.id if isinstance(r.id, str) else repr(r.id),
                   r.model if isinstance(r.model, str) else repr(r.model))
            kept = unique.get(key)
            if kept is None or kept.status != STATUS_DONE:
                unique[key] = r
        refused: list[Refused] = []
        written: list[ResultRecord] = []
        if unique:
            # in key order: two writers of overlapping rows then lock them in one order,
            # which is what keeps concurrent transactions from deadlocking
            self._write([unique[k] for k in sorted(unique)], refused, windows or {}, written)
            if self.engine.dialect.name == "postgresql":
                self._settle_committed(list(unique.values()), refused)
        return Upserted(refused, written)

    def _settle_committed(self, records: list[ResultRecord], refused: list[Refused]) -> None:
        """PostgreSQL: the written tasks' ``latest`` flags, settled after their commit.

        Inside the write's transaction another model's row for the same task,
        written at the same moment and not yet committed, is invisible, and
        the other writer cannot see this one's: both rows would stay flagged.
        After the commit, whichever of the two settles last sees both. (SQLite
        has one writer at a time: it settles inside the transaction.) Until
        then, for a few milliseconds, a task that has just gained a row of
        another model shows both rows in the default views.
        """
        skip = {id(r.record) for r in refused}
        self.settle_latest([r.id for r in records if id(r) not in skip])

    def settle_latest(self, ids: Iterable[str]) -> None:
        """Put the ``latest`` flags of these tasks right (cheap when each has one row).

        The upsert does it for what it writes; a worker calls it for
        redelivered tasks whose write may have committed just before a crash.
        """
        wanted = sorted({i for i in ids if id_problem(i) is None})
        if wanted:
            self._run(lambda conn: _settle_latest(conn, wanted),
                      f"cannot settle the latest flags of {len(wanted)} task(s)", begin=True)

    def settle_all(self, batch: int = 500) -> int:
        """Put every task's ``latest`` flag right; gives the number of flags that were wrong.

        For a table edited by hand (rows inserted, deleted or re-dated outside
        bertstream): bertstream's own writes and deletes keep the flags. Walks
        the tasks in key order, ``batch`` tasks a transaction, so it holds no
        lock for long and can run beside the workers.
        """
        fixed, after = 0, None
        while True:

            def work(conn: Connection, after: str | None = after) -> tuple[list[str], int]:
                query = sa.select(results.c.id).distinct().order_by(results.c.id).limit(batch)
                if after is not None:
                    query = query.where(results.c.id > after)
                ids = list(conn.execute(query).scalars())
                return ids, _settle_latest(conn, ids) if ids else 0

            ids, wrong = self._run(work, "cannot settle the latest flags", begin=True)
            fixed += wrong
            if len(ids) < batch:
                return fixed
            after = ids[-1]

    def delete(
        self,
        *,
        ids: Sequence[str] | None = None,
        source: str | None = None,
        label: str | None = None,
        status: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        model: str | None = None,
        lang: str | None = None,
        dry_run: bool = False,
        batch: int = 500,
    ) -> DeleteCount:
        """Delete the stored rows matching every given filter, with their windows.

        Unlike the reads, the filters select rows of every model (``model``:
        that model's only), so deleting a task by id removes all its results.
        At least one filter is required. ``dry_run``: count, delete nothing.
        Rows go ``batch`` tasks at a time, each batch in its own transaction
        with the ``latest`` flags of its tasks settled (the newest row left is
        flagged), so a large retention delete holds no long lock; an outage
        stops it with the batches done so far deleted.
        A task still queued or being scored writes its row when it finishes.
        """
        given = (ids, source, label, status, since, until, model, lang)
        if all(v is None for v in given):
            raise InvalidInput("give at least one filter: deleting every row is not a filter")
        id_sets: list[list[str] | None] = [None]
        if ids is not None:
            wanted = [i for i in dict.fromkeys(ids) if id_problem(i) is None]
            id_sets = [wanted[k:k + batch] for k in range(0, len(wanted), batch)]
        counted = DeleteCount(0, 0)
        for chunk in id_sets:
            conds = _filters(chunk, source, label, status, since, until, model, lang,
                             every_model=True, dialect=self.engine.dialect.name)
            if dry_run:
                counted += self._read(functools.partial(_count_rows, conds=conds))
            else:
                counted += self._delete_rows(conds, batch)
        return counted

    def _delete_rows(self, conds: list[Any], batch: int) -> DeleteCount:
        """Delete the rows matching ``conds``, ``batch`` tasks a transaction."""
        done = DeleteCount(0, 0)
        while True:

            def work(conn: Connection) -> tuple[list[str], int]:
                pick = sa.select(results.c.id).where(*conds).distinct().limit(batch)
                if conn.dialect.name == "postgresql":
                    return _delete_batch_pg(conn, pick, conds)
                tasks = list(conn.execute(pick).scalars())
                if not tasks:
                    return [], 0
                # SQLite (no RETURNING before 3.35): the keys read, then deleted by key
                keys = conn.execute(sa.select(results.c.id, results.c.model)
                                    .where(results.c.id.in_(tasks), *conds)).all()
                params = [{"rid": r.id, "rmodel": r.model} for r in keys]
                for table in (windows, results):
                    conn.execute(table.delete().where(table.c.id == sa.bindparam("rid"),
                                                      table.c.model == sa.bindparam("rmodel")),
                                 params)
                _settle_latest(conn, sorted(tasks))  # one writer at a time: exact here
                return tasks, len(keys)

            tasks, rows = self._run(work, "cannot delete results", begin=True)
            if not tasks:
                return done
            if self.engine.dialect.name == "postgresql":
                # after the commit, as for a write (see _settle_committed)
                self.settle_latest(tasks)
            done += DeleteCount(rows, len(tasks))
            if len(tasks) < batch:
                return done

    def _write(self, records: list[ResultRecord], refused: list[Refused],
               windows: Windows, written: list[ResultRecord]) -> None:
        try:
            rows = [self._row(r) for r in records]
            children = {(r.id, r.model): windows[(r.id, r.model)] for r in records
                        if (r.id, r.model) in windows}

            def work(conn: Connection, exact: bool = False) -> list[int]:
                if children:
                    self._write_windows(conn, children)
                wrote = self._execute(conn, rows, exact)
                if conn.dialect.name != "postgresql":  # one writer at a time: exact here
                    _settle_latest(conn, sorted({row["id"] for row in rows}))
                return wrote

            what = f"cannot write {len(rows)} result(s)"
            try:
                wrote = self._run(work, what, begin=True)
            except _DoneRowKept:
                wrote = self._run(functools.partial(work, exact=True), what, begin=True)
            written.extend(records[i] for i in wrote)
        except StoreUnavailable:
            raise
        except Exception as exc:
            if not is_row_error(exc):
                raise
            if len(records) == 1:
                refused.append(Refused(records[0], f"{type(exc).__name__}: {_first_line(exc)}"))
                return
            half = len(records) // 2
            self._write(records[:half], refused, windows, written)
            self._write(records[half:], refused, windows, written)

    def _write_windows(self, conn: Connection, children: Windows) -> None:
        """Replace the windows of the rows about to be written, except ``done`` rows'.

        Runs before the results upsert, so ``done`` means done before this
        write. The delete and the insert each check it again in SQL: a
        concurrent writer that made a row done since leaves its windows, and
        a window already there is kept (ON CONFLICT DO NOTHING).
        """
        keys = sorted(children)
        is_done = sa.and_(results.c.status == STATUS_DONE,
                          results.c.id == sa.bindparam("rid"),
                          results.c.model == sa.bindparam("rmodel"))
        done = _done_keys(conn, sorted({k[0] for k in keys}))
        todo = [k for k in keys if k not in done]
        if not todo:
            return
        delete = windows.delete().where(
            windows.c.id == sa.bindparam("rid"), windows.c.model == sa.bindparam("rmodel"),
            ~sa.exists().where(is_done))
        conn.execute(delete, [{"rid": i, "rmodel": m} for i, m in todo])
        rows = [self._window_row(w) for k in todo for w in children[k]]
        if rows:
            conn.execute(self._insert(windows).on_conflict_do_nothing(), rows)

    @staticmethod
    def _window_row(w: WindowRecord) -> dict[str, Any]:
        row = vars(w).copy()
        if id_problem(row["id"]) is not None:
            raise InvalidInput(f"id {id_problem(row['id'])}")
        return row

    def _insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT for ``table`` (it has ON CONFLICT)."""
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table)
        raise StoreUnavailable(f"unsupported database dialect {dialect!r}")

    def _execute(self, conn: Connection, rows: list[dict[str, Any]],
                 exact: bool = False) -> list[int]:
        """Upsert ``rows``; gives the positions of those written (not kept out by a
        ``done`` row).

        The fast write tells only how many rows it wrote: all of them, nearly always.
        When fewer, it raises :class:`_DoneRowKept`, and the caller runs the
        transaction again with ``exact``: the upsert then returns the key of each row
        it writes (an SQLite older than RETURNING: one row a statement, each counted).
        """
        if exact:
            if not conn.dialect.insert_executemany_returning:
                stmt = self._upsert_statement().execution_options(preserve_rowcount=True)
                return [n for n, row in enumerate(rows) if conn.execute(stmt, row).rowcount > 0]
            at = {(row["id"], row["model"]): n for n, row in enumerate(rows)}
            stmt = self._upsert_statement().returning(results.c.id, results.c.model)
            return sorted(at[(key.id, key.model)] for key in conn.execute(stmt, rows))
        writer = self._writer()
        if writer is not None:
            count = writer.execute(conn, rows)
        else:
            stmt = self._upsert_statement().execution_options(preserve_rowcount=True)
            count = conn.execute(stmt, rows).rowcount
        if count != len(rows):
            raise _DoneRowKept(f"{count} of {len(rows)} rows written")
        return list(range(len(rows)))

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
        # Every write is its task's newest row until _settle_latest finds a newer one.
        row["latest"] = True
        if row["status"] not in STATUSES:
            raise InvalidInput(f"unknown status {row['status']!r}")
        # SQLite does not enforce VARCHAR lengths: check here so both
        # databases refuse the same rows.
        for key in ("id", "source"):
            if (key == "id" or row[key] is not None) and id_problem(row[key]) is not None:
                raise InvalidInput(f"{key} {id_problem(row[key])}")
        return row

    def _upsert_statement(self) -> Any:
        ins = self._insert(results)
        excluded = ins.excluded
        updates = {
            c.name: getattr(excluded, c.name)
            for c in results.columns
            if c.name not in ("id", "model", "attempts", "submitted_at")
        }
        updates["attempts"] = results.c.attempts + 1
        return ins.on_conflict_do_update(
            index_elements=[results.c.id, results.c.model],
            set_=updates,
            where=results.c.status != STATUS_DONE,
        )

    # -- reading --------------------------------------------------------

    def get(self, task_id: str, model: str | None = None) -> ResultRecord | None:
        """The row of ``task_id`` (for ``model``; else its latest), or None while not stored."""
        found = self.get_many([task_id], model=model)
        return found.get(task_id)

    def get_many(self, ids: Iterable[str], model: str | None = None) -> dict[str, ResultRecord]:
        """Rows for the given ids that exist, keyed by id: ``model``'s, else each id's latest."""
        # an id no row can have (too long, NUL, lone surrogate) is simply absent
        wanted = [i for i in dict.fromkeys(ids) if id_problem(i) is None]

        def read(conn: Connection) -> dict[str, ResultRecord]:
            out: dict[str, ResultRecord] = {}
            for match in _id_chunks(conn, wanted):
                query = sa.select(results).where(match)
                if model is not None:
                    query = query.where(results.c.model == model)
                for row in conn.execute(query).mappings():
                    rec = _record(row)
                    held = out.get(rec.id)
                    if held is None or (rec.finished_at, rec.model) > (held.finished_at, held.model):
                        out[rec.id] = rec
            return out

        return self._read(read) if wanted else {}

    def get_windows(self, task_id: str, model: str | None = None) -> tuple[ResultRecord | None,
                                                                       list[WindowRecord]]:
        """The row of ``task_id`` under ``model`` (default: its latest row) and its windows
        in order; ``(None, [])`` when there is no such row, no windows for a text scored
        in one pass."""
        if id_problem(task_id) is not None:
            return None, []

        def read(conn: Connection) -> tuple[ResultRecord | None, list[WindowRecord]]:
            query = sa.select(results).where(results.c.id == task_id)
            if model is not None:
                query = query.where(results.c.model == model)
            query = query.order_by(results.c.finished_at.desc(), results.c.model.desc()).limit(1)
            found = conn.execute(query).mappings().first()
            if found is None:
                return None, []
            row = _record(found)
            query = (sa.select(windows)
                     .where(windows.c.id == row.id, windows.c.model == row.model)
                     .order_by(windows.c.window))
            out = []
            for w in conn.execute(query).mappings():
                data = dict(w)
                if isinstance(data["scores"], str):
                    data["scores"] = json.loads(data["scores"])
                data["scores"] = _finite_scores(data["scores"])
                out.append(WindowRecord(**data))
            return row, out

        return self._read(read)

    def id_states(self, ids: Iterable[str]) -> dict[str, IdState]:
        """What an id check needs of the given ids that exist, read by key (lighter than
        whole rows): every row's text hash and the latest row's status."""
        wanted = [i for i in dict.fromkeys(ids) if id_problem(i) is None]

        def read(conn: Connection) -> dict[str, IdState]:
            rows: dict[str, list[Any]] = {}
            for match in _id_chunks(conn, wanted):
                query = sa.select(results.c.id, results.c.text_sha256, results.c.status,
                                  results.c.attempts, results.c.model,
                                  results.c.finished_at).where(match)
                for row in conn.execute(query):
                    rows.setdefault(row.id, []).append(row)
            out = {}
            for task_id, found in rows.items():
                # the latest as get_many picks it: last finished, then by model
                last = max(found, key=lambda r: (as_utc(r.finished_at), r.model))
                out[task_id] = IdState(frozenset(r.text_sha256 for r in found),
                                       last.text_sha256, last.status, last.attempts,
                                       last.model)
            return out

        return self._read(read) if wanted else {}

    def done_ids(self, ids: Iterable[str], model: str | None = None) -> set[str]:
        """The ids among ``ids`` with a ``done`` row (``model``'s, or any model's)."""
        wanted = [i for i in dict.fromkeys(ids) if id_problem(i) is None]
        if not wanted:
            return set()
        return self._read(lambda conn: {i for i, _ in _done_keys(conn, wanted, model)})

    def _read(self, work: Callable[[Connection], T]) -> T:
        try:
            return self._run(work, "cannot read results")
        except StoreUnavailable:
            raise
        except Exception as exc:
            if is_row_error(exc):
                raise InvalidInput(f"a filter value cannot be looked up: {_first_line(exc)}") from exc
            raise

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
        model: str | None = None,
        lang: str | None = None,
    ) -> list[ResultRecord]:
        """Rows matching every given filter, by ``finished_at``.

        ``since``/``until`` bound ``finished_at`` (inclusive / exclusive).
        Without ``model``, each task's latest result (of any model).
        """
        query = sa.select(results).where(
            *_filters(ids, source, label, status, since, until, model, lang,
                      dialect=self.engine.dialect.name))
        order = results.c.finished_at.desc() if newest_first else results.c.finished_at.asc()
        query = query.order_by(order, results.c.id)
        if limit is not None:
            query = query.limit(limit)
        return self._read(lambda conn: [_record(row) for row in conn.execute(query).mappings()])

    def aggregate(
        self,
        *,
        by: str = "label",
        source: str | None = None,
        status: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        model: str | None = None,
        lang: str | None = None,
    ) -> list[dict[str, Any]]:
        """Counts and mean score grouped by ``label``, ``source``, ``status``, ``model`` or
        ``lang`` (each task once: its latest result, unless ``model`` is given).

        Most rows first; groups of as many rows in value order, no value (a NULL source,
        label or lang) last on both backends, as ``contract.queries.top_stats`` ranks them
        (SQLite sorts NULL first, PostgreSQL gave a tie in no set order)."""
        if by not in ("label", "source", "status", "model", "lang"):
            raise InvalidInput(f"cannot group by {by!r}")
        column = results.c[by]
        query = (
            sa.select(
                column.label("key"),
                sa.func.count().label("count"),
                sa.func.avg(results.c.score).label("mean_score"),
            )
            .where(*_filters(None, source, None, status, since, until, model, lang,
                             every_model=by == "model"))
            .group_by(column)
            .order_by(sa.func.count().desc(), column.is_(None), column)
        )
        rows = self._read(lambda conn: conn.execute(query).mappings().all())
        return [
            {by: r["key"], "count": int(r["count"]),
             "mean_score": None if r["mean_score"] is None else float(r["mean_score"])}
            for r in rows
        ]

    def count(
        self,
        *,
        ids: Sequence[str] | None = None,
        source: str | None = None,
        label: str | None = None,
        status: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        model: str | None = None,
        lang: str | None = None,
    ) -> int:
        """Number of tasks stored, or matching every given filter (as :meth:`query`)."""
        query = (sa.select(sa.func.count()).select_from(results)
                 .where(*_filters(ids, source, label, status, since, until, model, lang,
                                  dialect=self.engine.dialect.name)))
        return self._read(lambda conn: int(conn.execute(query).scalar_one()))


def _delete_batch_pg(conn: Connection, pick: Any, conds: list[Any]) -> tuple[list[str], int]:
    """PostgreSQL: delete the rows matching ``conds`` of the tasks ``pick`` selects, and the
    windows of exactly those rows; gives the tasks and the number of rows.

    Two statements, the id lists kept in the server (a subquery, then arrays): the
    500-id IN lists of a statement built in Python cost more than the delete itself.
    """
    # the rows locked in key order first, as the writes lock them (no lock cycle)
    doomed = (sa.select(results.c.id, results.c.model)
              .where(results.c.id.in_(pick.correlate(None)), *conds)
              .order_by(results.c.id, results.c.model).with_for_update().cte("doomed"))
    keys = conn.execute(results.delete()
                        .where(results.c.id == doomed.c.id, results.c.model == doomed.c.model)
                        .returning(results.c.id, results.c.model)).all()
    if keys:
        conn.execute(sa.text(f"DELETE FROM {WINDOWS_TABLE} WHERE (id, model) IN "
                             "(SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:models AS text[])))"),
                     {"ids": [r.id for r in keys], "models": [r.model for r in keys]})
    return sorted({r.id for r in keys}), len(keys)


@dataclass(frozen=True)
class DeleteCount:
    """Rows deleted (or that a dry run would delete) and the tasks they belonged to."""

    rows: int
    tasks: int

    def __add__(self, other: DeleteCount) -> DeleteCount:
        return DeleteCount(self.rows + other.rows, self.tasks + other.tasks)


def _count_rows(conn: Connection, conds: list[Any]) -> DeleteCount:
    """Rows and distinct tasks matching ``conds`` (every model's rows)."""
    row = conn.execute(sa.select(sa.func.count(), sa.func.count(sa.distinct(results.c.id)))
                       .select_from(results).where(*conds)).one()
    return DeleteCount(int(row[0]), int(row[1]))


def _id_chunks(conn: Connection, ids: Sequence[str]) -> Iterator[Any]:
    """Clauses matching ``ids``, 500 at a time (bounded statements, key searches).

    PostgreSQL gets ``id = ANY(:array)``, one parameter whatever the count:
    an ``IN`` list of 500 placeholders, built and parsed in Python for each
    statement, cost more than the key search itself. Elsewhere ``id IN (...)``.
    """
    pg = conn.dialect.name == "postgresql"
    for start in range(0, len(ids), 500):
        chunk = list(ids[start:start + 500])
        yield (results.c.id == sa.any_(sa.bindparam(None, chunk, type_=pg_types.ARRAY(sa.String)))
               if pg else results.c.id.in_(chunk))


def _done_keys(conn: Connection, ids: Sequence[str],
               model: str | None = None) -> set[tuple[str, str]]:
    """The (id, model) keys among ``ids`` (of ``model``, or of any model) with a ``done`` row.

    The status is checked on the rows read, not in SQL: beside a long IN
    list, ``status = 'done'`` made SQLite's planner walk the status index
    (every done row in the table) instead of the key, so each flush's
    lookup grew with the table.
    """
    out: set[tuple[str, str]] = set()
    for match in _id_chunks(conn, ids):
        query = sa.select(results.c.id, results.c.model, results.c.status).where(match)
        if model is not None:
            query = query.where(results.c.model == model)
        out.update((r.id, r.model) for r in conn.execute(query) if r.status == STATUS_DONE)
    return out


def _has_newer() -> Any:
    """The task of this row has a newer row (of another model).

    Newer: finished later; of two finished at once, the greater model name.
    """
    newer = results.alias("newer")
    return sa.exists().where(
        newer.c.id == results.c.id,
        sa.or_(newer.c.finished_at > results.c.finished_at,
               sa.and_(newer.c.finished_at == results.c.finished_at,
                       newer.c.model > results.c.model)))


def latest_only(columns: Any = None) -> Any:
    """Rows that are their task's latest result, of whichever model (the default views).

    Reads the ``latest`` flag that :meth:`ResultStore.upsert` keeps, so a
    view's cost follows the rows it asks for, not the table: asked as a
    ``NOT EXISTS`` per row, PostgreSQL answered with an anti-join over the
    whole table whatever the time range. ``columns``: a subquery's (default: the table's).
    """
    return (results.c if columns is None else columns).latest == sa.true()


def _settle_latest(conn: Connection, ids: Sequence[str]) -> int:
    """Make ``latest`` true on each task's newest row among ``ids`` and false on its other rows.

    Gives the number of rows whose flag was found wrong (and put right).

    One key search reads the tasks' rows; only rows whose flag is wrong are
    written, so a task with one row (the common case) costs its share of
    that search. Each write checks the rule again in SQL, against what is
    committed by then, so a concurrent settler's newer view is never undone.
    """
    wrong: list[tuple[str, str]] = []
    for match in _id_chunks(conn, ids):
        rows = conn.execute(sa.select(results.c.id, results.c.model, results.c.finished_at,
                                      results.c.latest).where(match)).all()
        newest: dict[str, tuple[Any, str]] = {}
        for r in rows:
            key = (r.finished_at, r.model)
            if r.id not in newest or key > newest[r.id]:
                newest[r.id] = key
        wrong.extend((r.id, r.model) for r in rows
                     if bool(r.latest) != (newest[r.id] == (r.finished_at, r.model)))
    if wrong:
        wrong.sort()  # key order, as the writes lock rows
        # The newer-row test sits inside a comparison, which keeps it a probe per row:
        # as a bare EXISTS, PostgreSQL may plan a join over the whole table.
        conn.execute(results.update()
                     .where(results.c.id == sa.bindparam("rid"),
                            results.c.model == sa.bindparam("rmodel"),
                            results.c.latest == _has_newer())
                     .values(latest=~results.c.latest),
                     [{"rid": i, "rmodel": m} for i, m in wrong])
    return len(wrong)


class _Unindexed(ColumnElement[Any]):
    """A column that SQLite must not search by its own index (``+column``).

    Beside a list of ids, SQLite's planner (it keeps no statistics) prefers
    the index of an equality filter such as ``status = 'done'`` to the
    primary key, and walks every row with that status. The unary ``+``
    takes the column out of the choice; other databases see the column.
    """

    inherit_cache = True
    # the wrapped column is part of the statement cache's key
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: Any) -> None:
        self.column = column
        self.type = column.type


@compiles(_Unindexed)
def _unindexed_default(element: _Unindexed, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column, **kw))


@compiles(_Unindexed, "sqlite")
def _unindexed_sqlite(element: _Unindexed, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.column, **kw))


#: Most ids an ``id IN (...)`` list of a filter holds on SQLite; a longer list is sent as
#: one JSON array (each placeholder is a variable, and a build may allow 32766 at most).
ID_LIST_MAX = 500


def _ids_match(ids: Sequence[str], dialect: str | None) -> Any:
    """``results.id`` among ``ids``, however many: a filter's id list within the drivers'
    limits on placeholders (PostgreSQL takes 65535 per statement, SQLite 32766 in many
    builds). PostgreSQL gets ``id = ANY(:array)``, one parameter; SQLite an ``IN`` list,
    or past :data:`ID_LIST_MAX` ids ``IN (SELECT value FROM json_each(:array))``. Either
    way the primary key is searched, and the database orders and limits the rows."""
    wanted = list(ids)
    if dialect == "postgresql":
        return results.c.id == sa.any_(sa.bindparam(None, wanted, type_=pg_types.ARRAY(sa.String)))
    if len(wanted) <= ID_LIST_MAX:
        return results.c.id.in_(wanted)
    listed = sa.func.json_each(sa.bindparam(None, json.dumps(wanted), sa.Text))
    return results.c.id.in_(sa.select(sa.column("value")).select_from(listed))


def _filters(
    ids: Sequence[str] | None,
    source: str | None,
    label: str | None,
    status: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    model: str | None = None,
    lang: str | None = None,
    *,
    every_model: bool = False,
    dialect: str | None = None,
) -> list[Any]:
    """The conditions of a read or delete; ``dialect``: the engine's, which decides how
    ``ids`` are sent (:func:`_ids_match`)."""
    conds: list[Any] = []

    def col(name: str) -> Any:
        # given ids, the primary key is the way in: no other index may compete
        return _Unindexed(results.c[name]) if ids else results.c[name]

    if ids is not None:  # an empty list matches no row, as get_many([]) reads none
        conds.append(_ids_match(ids, dialect))
    for name, value in (("source", source), ("label", label), ("status", status),
                        ("lang", lang)):
        if value is not None:
            conds.append(col(name) == value)
    if model is not None:
        conds.append(results.c.model == model)
    elif not every_model:
        conds.append(latest_only())
    if since is not None:
        conds.append(col("finished_at") >= as_utc(since))
    if until is not None:
        conds.append(col("finished_at") < as_utc(until))
    return conds


def _record(row: Any) -> ResultRecord:
    data = dict(row)
    for key in ("submitted_at", "started_at", "finished_at"):
        data[key] = as_utc(data[key])
    for key in ("meta", "scores"):
        # Some drivers hand JSON back as text.
        if isinstance(data[key], str):
            data[key] = json.loads(data[key])
    data["scores"] = _finite_scores(data["scores"])
    return ResultRecord(**data)


def _finite_scores(scores: Any) -> Any:
    """``scores`` with a NaN or infinite value read as None (JSON null).

    Workers fail such a text now; earlier versions stored it on SQLite as done with
    NaN in ``scores`` (and a NULL ``score``), which is not JSON: read that way, every
    export and view shows null, as the API always did.
    """
    if not isinstance(scores, dict):
        return scores
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
            for k, v in scores.items()}


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (SQLAlchemy appends the SQL and a link)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
