"""The results database's schema revision: upgrade it, read it, check it.

Migrations are Alembic revisions in ``contract/migrations/versions``.
``bertstream db upgrade`` applies them; the worker and the API check the
revision at start and refuse an outdated (or unknown, newer) schema with a
message that names the command to run. An empty database is the one case a
worker sets up by itself (to head, exactly as ``db upgrade`` would), so the
embedded demo needs no extra step.

Concurrent upgrades (several workers or ``migrate`` containers at once) are
serialised: a PostgreSQL advisory lock, or a lock file next to a SQLite
database. A run commits as one transaction, DDL and revision stamp included,
on SQLite too: killed part-way, it leaves the database as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from contract.constants import MIGRATIONS_TABLE, RESULTS_TABLE, WINDOWS_TABLE
from contract.errors import InvalidInput, SchemaMismatch, StoreRefused, StoreUnavailable

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from contract.results import ResultStore

T = TypeVar("T")

log = logging.getLogger(__name__)

#: What an operator runs to bring the schema up to date.
UPGRADE_COMMAND = "bertstream db upgrade"
#: Seconds a migration (with its wait for another process's) may take: far beyond the
#: statement timeout, which bounds ordinary operations, not rewriting a large table.
MIGRATION_TIMEOUT_S = 3600.0

#: The table privileges each kind of command uses on PostgreSQL, checked at its start
#: (:func:`check_privileges`): a role without one is a GRANT to run, refused at once
#: rather than met as an outage at every flush.
WORKER_PRIVILEGES: dict[str, tuple[str, ...]] = {
    RESULTS_TABLE: ("SELECT", "INSERT", "UPDATE"), WINDOWS_TABLE: ("SELECT", "INSERT", "DELETE")}
READER_PRIVILEGES: dict[str, tuple[str, ...]] = {
    RESULTS_TABLE: ("SELECT",), WINDOWS_TABLE: ("SELECT",)}
DELETE_PRIVILEGES: dict[str, tuple[str, ...]] = {
    RESULTS_TABLE: ("SELECT", "UPDATE", "DELETE"), WINDOWS_TABLE: ("SELECT", "DELETE")}
#: What ``db settle`` uses: it rewrites the latest flags.
SETTLE_PRIVILEGES: dict[str, tuple[str, ...]] = {RESULTS_TABLE: ("SELECT", "UPDATE")}

#: Key of the PostgreSQL advisory lock held while migrating.
_LOCK_KEY = zlib.crc32(b"bertstream-migrations")


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: its revision (None: unstamped), the code's head, the table."""

    current: str | None
    head: str
    has_results: bool

    @property
    def empty(self) -> bool:
        """Nothing of bertstream's there yet."""
        return self.current is None and not self.has_results

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    def newer(self, script: ScriptDirectory | None = None) -> bool:
        """Stamped with a revision this code does not know (newer code migrated it)."""
        if self.current is None or self.current == self.head:
            return False
        return self.current not in {rev.revision for rev in (script or _script()).walk_revisions()}

    def problem(self, script: ScriptDirectory | None = None) -> str | None:
        """Why a worker or the API must not run on this database, or None."""
        if self.up_to_date and self.has_results:
            return None
        if self.empty:
            return f"the results database has no schema yet: run `{UPGRADE_COMMAND}`"
        if not self.has_results:
            return (f"the schema is stamped {self.current} but the results table is missing "
                    f"(dropped by hand?): drop {MIGRATIONS_TABLE} too, then run "
                    f"`{UPGRADE_COMMAND}`")
        if self.current is None:
            return (f"the results table predates schema migrations: run `{UPGRADE_COMMAND}` "
                    "(it adopts the table, rows kept)")
        if self.newer(script):
            return (f"the results database is at schema revision {self.current}, which this "
                    f"bertstream does not know (newer code migrated it?): upgrade bertstream "
                    f"to a version whose `bertstream db history` lists it")
        return (f"the results database is at schema revision {self.current}, this bertstream "
                f"needs {self.head}: run `{UPGRADE_COMMAND}`")


def _quiet_alembic() -> None:
    """Alembic's INFO lines (a plugin set up, a context made) would fill every worker's
    start-up log: its logger is set to WARNING, unless the application set a level.
    Done on import, before Alembic is imported (its import logs) or reads a revision."""
    alembic_log = logging.getLogger("alembic")
    if alembic_log.level == logging.NOTSET:
        alembic_log.setLevel(logging.WARNING)


_quiet_alembic()


def _config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "contract:migrations")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())


@functools.cache
def head_revision() -> str:
    """The revision this code's schema is at."""
    head = _script().get_current_head()
    if head is None:  # pragma: no cover - the package ships its revisions
        raise RuntimeError("no migrations found in contract/migrations/versions")
    return head


def id_sorts_by_code_point(conn: Connection) -> bool:
    """Whether the results table's ``id`` compares by code point, so that its primary-key
    index serves an id-prefix range. True on SQLite (BINARY); on PostgreSQL, under a C or
    POSIX collation, the column's own or (``default``) the database's."""
    if conn.dialect.name != "postgresql":
        return True
    row = conn.execute(sa.text(
        "SELECT c.collname, c.collprovider, c.collcollate FROM pg_attribute a"
        " JOIN pg_collation c ON c.oid = a.attcollation"
        " WHERE a.attrelid = to_regclass(:table) AND a.attname = 'id'"),
        {"table": RESULTS_TABLE}).one_or_none()
    if row is None:
        return False
    name, provider, collate = row
    if name != "default":
        return bool(provider == "c" and collate in ("C", "POSIX") or name in ("C", "POSIX"))
    # The database's own collation; datlocprovider exists from PostgreSQL 15 (ICU before
    # it could not be a database's default).
    collate, provider = conn.execute(sa.text(
        "SELECT d.datcollate, to_jsonb(d) ->> 'datlocprovider' FROM pg_database d"
        " WHERE d.datname = current_database()")).one()
    return bool(provider in (None, "c")
                and (collate in ("C", "POSIX") or collate.startswith("C.")))


def _current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    # Alembic builds a new version Table per context, so its SELECT is new to the engine's
    # compiled-statement cache at every read (every /readyz): each read held an entry
    # until the cache's size bound pushed it out. The connection (short-lived, or one
    # running migrations) compiles its statements afresh from here on.
    conn.execution_options(compiled_cache=None)
    context = MigrationContext.configure(conn, opts={"version_table": MIGRATIONS_TABLE})
    return context.get_current_revision()


def _read(conn: Connection) -> SchemaState:
    return SchemaState(_current(conn), head_revision(), sa.inspect(conn).has_table(RESULTS_TABLE))


def state(store: ResultStore) -> SchemaState:
    """The database's :class:`SchemaState` (raises StoreUnavailable on an outage)."""
    return store.run(_read, "cannot read the schema revision")


def settled(store: ResultStore) -> SchemaState:
    """The state as a reader must see it: never part-way through a migration.

    An older bertstream setting up an empty database committed its migrations
    one by one, so for a moment the results table existed without its later
    columns. A state that is neither current nor empty is read again under the
    migration lock, which waits for a running migration to end.

    An empty state is checked for a schema the role lost USAGE on (:func:`check_privileges`):
    PostgreSQL hides its tables, and a reader took stored tasks for never accepted.
    Checked only then, so a read of a current schema costs no more.
    """
    current = state(store)
    if current.empty:
        check_privileges(store, READER_PRIVILEGES, "a reader")
        return current
    if current.problem() is None:
        return current
    return _locked(store, _read, "cannot read the schema revision", reader=True)


def check(store: ResultStore) -> SchemaState:
    """The state, or :class:`SchemaMismatch` naming what to run when it is not head."""
    current = state(store)
    problem = current.problem()
    if problem:
        raise SchemaMismatch(problem)
    return current


def upgrade(store: ResultStore, revision: str = "head") -> tuple[str | None, str | None]:
    """Apply the migrations up to ``revision``; give (revision before, revision after)."""
    return _move(store, "upgrade", revision)


def downgrade(store: ResultStore, revision: str) -> tuple[str | None, str | None]:
    """Undo migrations down to ``revision`` (a rollback; each revision says what it drops)."""
    return _move(store, "downgrade", revision)


def _move(store: ResultStore, direction: str, revision: str) -> tuple[str | None, str | None]:
    """Alembic's ``upgrade`` or ``downgrade`` to ``revision`` under the migration lock."""
    from alembic import command

    step = command.upgrade if direction == "upgrade" else command.downgrade

    def apply(conn: Connection) -> tuple[str | None, str | None]:
        before = _current(conn)
        step(_config(conn), revision)
        conn.commit()
        return before, _current(conn)

    from alembic.util import CommandError

    try:
        return _locked(store, apply, f"cannot {direction} the schema")
    except CommandError as exc:  # an unknown revision, say
        raise InvalidInput(f"cannot {direction} the schema to {revision!r}: {exc} "
                           "(`bertstream db history` lists the revisions)") from exc


def ensure(store: ResultStore) -> SchemaState:
    """What a worker runs at start: set up an empty database, refuse an outdated one, and
    one its role may not write (:func:`check_privileges`).

    When the schema is not plainly current, it is read again under the
    migration lock: another process may be migrating right now (several
    workers starting at once on an empty database).
    """
    current = _state_once_free(store)
    if current.problem() is None:
        check_privileges(store, WORKER_PRIVILEGES, "a worker")
        return current
    # a schema without USAGE hides the tables: refused, not created again (and failing)
    check_privileges(store, WORKER_PRIVILEGES, "a worker")

    def settle(conn: Connection) -> SchemaState:
        now = _read(conn)
        if now.empty:
            from alembic import command

            command.upgrade(_config(conn), "head")
            conn.commit()
            now = SchemaState(_current(conn), head_revision(), True)
        return now

    current = _locked(store, settle, "cannot set up the schema")
    problem = current.problem()
    if problem:
        raise SchemaMismatch(problem)
    check_privileges(store, WORKER_PRIVILEGES, "a worker")
    return current


def check_privileges(store: ResultStore, needs: dict[str, tuple[str, ...]], who: str) -> None:
    """:class:`StoreRefused` naming the GRANTs to run when the role lacks a privilege of
    ``needs`` (table: privileges) on a table that exists, or USAGE on the schema of its
    search path that holds them. Only PostgreSQL has roles: elsewhere, and for tables
    not there yet, nothing is checked. SELECT, INSERT and UPDATE granted on some columns
    only pass (a DBA may grant them per column): a statement needing another column is
    still refused when it runs.

    Without it, a worker whose role may not write started, and then met each flush's
    ``permission denied`` as an outage, requeueing for ever. PostgreSQL leaves a schema
    without USAGE out of the search path (``current_schema()`` too): its tables look
    missing, so the configured path (``$user`` being the role) is read. The schema to
    grant, when it holds the tables while none is visible: the path's first schema that
    exists for a role that inserts (it creates the tables there), the first one holding
    one of the tables for a role that only reads or changes rows."""
    if store.engine.dialect.name != "postgresql":
        return
    pairs = [(table, privilege) for table, privileges in needs.items()
             for privilege in privileges]
    values = ", ".join(f"(:t{i}, :p{i})" for i in range(len(pairs)))
    params: dict[str, str] = {}
    for i, (table, privilege) in enumerate(pairs):
        params.update({f"t{i}": table, f"p{i}": privilege})
    needed = "(VALUES " + values + ") AS v(t, p)"
    # A role that creates the tables does so in its path's first schema that exists (an
    # empty one of its own, "$user", say): that one is its schema. One that only uses
    # rows reads them from the first schema holding them: an empty "$user" schema
    # ahead of it hid a lost USAGE, and stored tasks read as never accepted.
    candidate = ("SELECT 1 FROM pg_namespace WHERE nspname = q.s"
                 if any("INSERT" in privileges for privileges in needs.values()) else
                 "SELECT 1 FROM pg_class c2 JOIN pg_namespace n2 ON n2.oid = c2.relnamespace"
                 " WHERE n2.nspname = q.s AND c2.relname IN (SELECT v.t FROM " + needed + ")")
    query = sa.text(
        "SELECT current_user, "
        "array(SELECT DISTINCT n.nspname FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname IN (SELECT v.t FROM " + needed + ")"
        " AND NOT has_schema_privilege(n.oid, 'USAGE')"
        " AND NOT EXISTS (SELECT 1 FROM " + needed + " WHERE to_regclass(v.t) IS NOT NULL)"
        " AND n.nspname = (SELECT q.s FROM unnest(string_to_array("
        "current_setting('search_path'), ',')) WITH ORDINALITY AS sp(x, i)"
        " CROSS JOIN LATERAL (SELECT CASE WHEN btrim(sp.x) IN ('$user', '\"$user\"')"
        " THEN CAST(current_user AS text) ELSE btrim(btrim(sp.x), '\"') END AS s) AS q"
        " WHERE EXISTS (" + candidate + ")"
        " ORDER BY sp.i LIMIT 1)), "
        "array(SELECT v.t || ' ' || v.p FROM " + needed +
        " WHERE to_regclass(v.t) IS NOT NULL"
        # SELECT, INSERT and UPDATE may be granted per column: a table-wide test says no
        # to a role granted them on the columns it uses (the statements then tell)
        " AND NOT CASE WHEN v.p IN ('SELECT', 'INSERT', 'UPDATE')"
        " THEN has_any_column_privilege(to_regclass(v.t), v.p)"
        " ELSE has_table_privilege(to_regclass(v.t), v.p) END)")

    def read(conn: Connection) -> tuple[str, list[str], list[str]]:
        role, hidden, missing = conn.execute(query, params).one()
        return str(role), list(hidden), list(missing)

    role, hidden, missing = store.run(read, "cannot read the role's privileges")
    from contract.results import sql_name

    grants = [f"GRANT USAGE ON SCHEMA {sql_name(schema)} TO {sql_name(role)}"
              for schema in sorted(hidden)]
    lacking: dict[str, list[str]] = {}
    for entry in missing:
        table, privilege = entry.split(" ", 1)
        lacking.setdefault(table, []).append(privilege)
    grants += [f"GRANT {', '.join(privileges)} ON {table} TO {sql_name(role)}"
               for table, privileges in lacking.items()]
    if grants:
        problem = f"role {sql_name(role)} lacks privileges {who} needs: {'; '.join(grants)}"
        raise StoreRefused(f"{problem} (a setting to fix, not an outage)", problem)


#: Attempts of :func:`_state_once_free` while SQLite reports the file locked.
SQLITE_LOCKED_TRIES = 5


def _state_once_free(store: ResultStore) -> SchemaState:
    """:func:`state`, read again after another process's migration of a SQLite file.

    SQLite may answer "database is locked" at once (without its busy wait) to a
    reader while another process changes the schema: several workers starting
    on one new file. That is no outage: wait for the migration lock, then read
    again, a few times.
    """
    for attempt in range(SQLITE_LOCKED_TRIES):
        try:
            return state(store)
        except StoreUnavailable as exc:
            if (store.engine.dialect.name != "sqlite" or "database is locked" not in str(exc)
                    or attempt == SQLITE_LOCKED_TRIES - 1):
                raise
            log.info("the SQLite file is locked (another process sets it up?): waiting "
                     "for its migration lock, then reading the schema again")
            _wait_unlocked(store.engine.url)
    raise AssertionError("unreachable")  # pragma: no cover


def _wait_unlocked(url: sa.engine.URL) -> None:
    """Wait until no process holds the migration lock of SQLite file ``url`` (by the
    thread's deadline, as :func:`_take_lock` waits)."""
    if url.database and url.database != ":memory:":
        with contextlib.suppress(OSError), open(_lock_path(url), "a") as handle:
            _take_lock(lambda: _flock(handle), lambda: fcntl.flock(handle, fcntl.LOCK_EX),
                       "cannot read the schema revision")
            fcntl.flock(handle, fcntl.LOCK_UN)
    time.sleep(0.05)


#: Seconds between two tries of a migration lock another process holds, under a deadline.
LOCK_RETRY_S = 0.05


def _take_lock(attempt: Callable[[], bool], block: Callable[[], object], what: str) -> None:
    """Take the migration lock: ``block()`` waits for it; under the thread's deadline
    (:meth:`ResultStore.until`, a wait's read) ``attempt()`` tries it without waiting,
    again every :data:`LOCK_RETRY_S`, and :class:`StoreUnavailable` saying a migration
    holds it ends the try before the deadline. A wait blocked in the lock (a kernel
    ``flock``, a server-side lock wait) outlived any deadline: a read of a schema one
    revision behind waited out a whole migration."""
    from contract.results import _deadline

    deadline = _deadline()
    if deadline is None:
        block()
        return
    while not attempt():
        if time.monotonic() + LOCK_RETRY_S >= deadline:
            raise StoreUnavailable(f"{what}: another process is migrating the schema (it "
                                   "holds the migration lock), not done in time")
        time.sleep(LOCK_RETRY_S)


def _flock(handle: IO[str]) -> bool:
    """Lock ``handle``'s file without waiting: False while another process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_path(url: sa.engine.URL) -> Path:
    """The migration lock file of SQLite file ``url``, next to it."""
    database = Path(str(url.database))
    return database.with_name(database.name + ".migrate-lock")


def drop_all(conn: Connection) -> None:
    """Drop bertstream's tables and the revision table (tests and benchmarks start clean)."""
    conn.execute(sa.text(f"DROP TABLE IF EXISTS {WINDOWS_TABLE}"))
    conn.execute(sa.text(f"DROP TABLE IF EXISTS {RESULTS_TABLE}"))
    conn.execute(sa.text(f"DROP TABLE IF EXISTS {MIGRATIONS_TABLE}"))


def rollback_plan(store: ResultStore, revision: str) -> tuple[str | None, list[tuple[str, str]]]:
    """What ``downgrade(store, revision)`` would undo: the current revision, and each
    revision rolled back (newest first) with what its rollback drops."""
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    current = state(store).current
    if current is None:
        return None, []
    try:
        undone = list(_script().iterate_revisions(current, revision))
    except (CommandError, RevisionError) as exc:
        raise InvalidInput(f"cannot downgrade the schema to {revision!r}: Can't locate "
                           f"revision identified by {revision!r} below {current} ({exc}; "
                           "`bertstream db history` lists the revisions)") from exc
    return current, [(rev.revision, rollback_drops(rev.revision))
                     for rev in undone if rev.revision != revision]


def rollback_drops(revision: str) -> str:
    """What rolling back ``revision`` drops, as its migration module says."""
    script = _script().get_revision(revision)
    return str(getattr(script.module, "rollback_drops", "unknown")) if script else "unknown"


def history() -> list[tuple[str, str | None, str]]:
    """Every revision, oldest first: (revision, the one it revises, its first doc line)."""
    revisions = list(_script().walk_revisions())
    revisions.reverse()
    out = []
    for rev in revisions:
        down = rev.down_revision
        down_text = down if isinstance(down, str) or down is None else ",".join(down)
        out.append((rev.revision, down_text, (rev.doc or "").strip().splitlines()[0]))
    return out


def _locked(store: ResultStore, work: Callable[[Connection], T], what: str, *,
            reader: bool = False) -> T:
    """``work`` on one connection while no other bertstream migrates this database.

    A ``reader`` that cannot create a SQLite lock file (a directory it may
    only read) goes on without the lock: it only waits, never migrates.
    """
    def run(conn: Connection) -> T:
        with _lock(conn, store.engine.url, reader, what):
            if not reader:
                _sqlite_transactional_ddl(conn)
            return work(conn)

    return store.run_long(run, what, MIGRATION_TIMEOUT_S)


def _sqlite_transactional_ddl(conn: Connection) -> None:
    """On SQLite, put ``conn``'s DDL in its transactions, as PostgreSQL does: a migration
    (its version stamp included) commits or rolls back as one.

    The sqlite3 module begins no transaction before CREATE, DROP or ALTER, so each
    committed at once: a migration killed part-way left its first steps (a half-copied
    table, a new column) under the old revision, and a rerun failed on them. SQLAlchemy's
    recipe for pysqlite: the module leaves transactions alone, and each transaction
    SQLAlchemy begins is a ``BEGIN``; IMMEDIATE takes the write lock at once (waiting out
    a writer), so no write committed between the migration's first read and its first
    write fails it ("database is locked", which WAL answers without waiting). The
    connection is closed after the migration (:meth:`ResultStore.run_long`), never pooled.
    """
    if conn.dialect.name != "sqlite":
        return
    dbapi: Any = conn.connection.dbapi_connection
    dbapi.isolation_level = None
    sa.event.listen(conn, "begin", lambda c: c.exec_driver_sql("BEGIN IMMEDIATE"))


@contextlib.contextmanager
def _lock(conn: Connection, url: sa.engine.URL, reader: bool = False,
          what: str = "cannot take the migration lock") -> Iterator[None]:
    if conn.dialect.name == "postgresql":
        def attempt() -> bool:
            taken = conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"),
                                 {"key": _LOCK_KEY}).scalar()
            conn.commit()
            return bool(taken)

        _take_lock(attempt, lambda: conn.execute(sa.text("SELECT pg_advisory_lock(:key)"),
                                                 {"key": _LOCK_KEY}), what)
        conn.commit()
        # Unlocked only after a success: after a failure the transaction is aborted, and
        # an unlock there would fail and hide the error. The connection is closed then
        # (ResultStore.run_long), which ends the session and its lock.
        yield
        conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
        conn.commit()
        return
    if conn.dialect.name == "sqlite" and url.database and url.database != ":memory:":
        try:
            handle = open(_lock_path(url), "a")  # noqa: SIM115 - closed by the with below
        except OSError:
            if not reader:
                raise
            yield
            return
        with handle:
            _take_lock(lambda: _flock(handle), lambda: fcntl.flock(handle, fcntl.LOCK_EX),
                       what)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    yield
