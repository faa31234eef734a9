"""Schema migrations on SQLite and PostgreSQL: from empty, from every earlier
revision and from a pre-migration table, rows kept; outdated schemas refused."""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from contract import migrate
from contract.constants import MIGRATIONS_TABLE, RESULTS_TABLE
from contract.errors import SchemaMismatch, StoreUnavailable
from contract.results import ResultStore, metadata
from contract.settings import Settings
from worker.process import ServeProc, settings_env

ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)


def bertstream(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def insert_row(store: ResultStore, task_id: str) -> None:
    """A row with only the columns every revision has had (the baseline's NOT NULLs)."""
    with store.engine.begin() as conn:
        conn.execute(sa.text(
            f"INSERT INTO {RESULTS_TABLE} (id, text_sha256, text_chars, model, status, "
            "attempts, truncated, finished_at, label, score) VALUES (:id, :sha, 4, 'm', 'done', "
            "1, :f, :at, 'positive', 0.9)"),
            {"id": task_id, "sha": "0" * 64, "f": False, "at": NOW})


def upgraded_with_row(url: str, task_id: str) -> None:
    """Bring the database at ``url`` to the head revision and store one row there."""
    store = ResultStore.from_url(url)
    try:
        migrate.upgrade(store)
        insert_row(store, task_id)
    finally:
        store.close()


def ids(store: ResultStore) -> list[str]:
    with store.engine.connect() as conn:
        return sorted(conn.execute(sa.text(f"SELECT id FROM {RESULTS_TABLE}")).scalars())


def test_upgrade_from_empty_matches_the_tables_the_code_uses(store_url: str) -> None:
    store = ResultStore.from_url(store_url)
    assert migrate.state(store).empty
    before, after = migrate.upgrade(store)
    assert (before, after) == (None, migrate.head_revision())
    assert migrate.check(store).up_to_date
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": MIGRATIONS_TABLE})
        diffs = compare_metadata(context, metadata)
    # The migrations build exactly the table the code reads and writes.
    assert diffs == []
    store.create_schema()  # idempotent: a second upgrade changes nothing
    assert migrate.state(store).current == after
    store.close()


def test_upgrade_from_every_earlier_revision_keeps_rows(store_url: str) -> None:
    revisions = [rev for rev, _down, _doc in migrate.history()]
    assert revisions and revisions[-1] == migrate.head_revision()
    for start in revisions[:-1] or revisions:
        store = ResultStore.from_url(store_url)
        with store.engine.begin() as conn:
            migrate.drop_all(conn)
        migrate.upgrade(store, start)
        assert migrate.state(store).current == start
        insert_row(store, f"kept-{start}")
        migrate.upgrade(store)
        assert migrate.check(store).up_to_date
        assert ids(store) == [f"kept-{start}"]
        store.close()


def test_a_table_from_before_migrations_is_adopted_with_its_rows(store_url: str) -> None:
    store = ResultStore.from_url(store_url)
    migrate.upgrade(store, "0001")
    with store.engine.begin() as conn:  # what bertstream 0.1 left: the table, no revision
        conn.execute(sa.text(f"DROP TABLE {MIGRATIONS_TABLE}"))
    insert_row(store, "legacy-1")
    insert_row(store, "legacy-2")
    state = migrate.state(store)
    assert state.current is None and state.has_results
    with pytest.raises(SchemaMismatch, match="predates schema migrations.*bertstream db upgrade"):
        migrate.ensure(store)  # a worker refuses it instead of creating anything
    out = bertstream(Settings(database_url=store_url), "db", "upgrade")
    assert out.returncode == 0, out.stderr
    assert "upgraded a table from before migrations -> " in out.stdout
    assert migrate.check(store).up_to_date
    assert ids(store) == ["legacy-1", "legacy-2"]
    store.close()


def test_db_commands_report_and_check_the_revision(store_url: str) -> None:
    settings = Settings(database_url=store_url)
    head = migrate.head_revision()
    out = bertstream(settings, "db", "current", "--check")
    assert out.returncode == 1
    assert "revision none (empty)" in out.stdout and "bertstream db upgrade" in out.stderr
    assert bertstream(settings, "db", "upgrade").returncode == 0
    out = bertstream(settings, "db", "upgrade")
    assert out.returncode == 0 and f"already at revision {head}" in out.stdout
    out = bertstream(settings, "db", "current", "--check")
    assert out.returncode == 0, out.stderr
    assert f"revision {head}; this bertstream needs {head}" in out.stdout
    history = bertstream(settings, "db", "history")
    assert history.returncode == 0 and f"-> {head} (head)" in history.stdout


def test_password_is_never_printed(pg_url: str) -> None:
    url = pg_url.replace("postgres@", "postgres:s3cret-pw@")
    out = bertstream(Settings(database_url=url), "db", "current")
    assert "s3cret-pw" not in out.stdout + out.stderr
    assert "***" in out.stdout


def test_concurrent_upgrades_all_succeed_once(pg_url: str) -> None:
    settings = Settings(database_url=pg_url)
    procs = [subprocess.Popen([sys.executable, "-c", "from producer.cli import main; main()",
                               "db", "upgrade"], env=settings_env(settings), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    upgraded = [o for o, _ in outputs if "upgraded" in o]
    assert len(upgraded) == 1, outputs  # the others found it done
    store = ResultStore.from_url(pg_url)
    assert migrate.check(store).up_to_date
    with store.engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {MIGRATIONS_TABLE}")).scalar() == 1
    store.close()


def _stamp(store: ResultStore, revision: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {MIGRATIONS_TABLE} SET version_num = :r"), {"r": revision})


@pytest.mark.parametrize("stamp, message", [
    (None, "predates schema migrations"),
    ("f00dfeed", "revision f00dfeed, which this bertstream does not know"),
])
def test_worker_and_api_refuse_an_outdated_schema_before_loading_anything(
        sqlite_url: str, redis_url: str, tmp_path: Path, stamp: str | None, message: str) -> None:
    store = ResultStore.from_url(sqlite_url)
    migrate.upgrade(store)
    if stamp is None:
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {MIGRATIONS_TABLE}"))
    else:
        _stamp(store, stamp)
    store.close()
    # A model path that does not exist: the schema check must come first.
    settings = Settings(database_url=sqlite_url, broker_url=redis_url,
                        model=str(tmp_path / "no-model"), cache_dir=str(tmp_path / "cache"))
    started = time.monotonic()
    worker = bertstream(settings, "worker", "--device", "cpu")
    assert worker.returncode == 2, worker.stderr
    assert message in worker.stderr
    assert time.monotonic() - started < 30
    api = bertstream(settings, "serve", "--port", "1")
    assert api.returncode == 2, api.stderr
    assert message in api.stderr and "Traceback" not in api.stderr


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """An empty database (no results table, no revision) on each engine."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


def test_readyz_reports_the_schema(sqlite_url: str, redis_url: str,
                                   api_factory: Callable[..., ServeProc]) -> None:
    import json
    import urllib.error
    import urllib.request

    def database_check(api: ServeProc) -> str:
        try:
            with urllib.request.urlopen(api.url + "/readyz", timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
        return str(json.loads(body)["checks"]["database"])

    api = api_factory(Settings(database_url=sqlite_url, broker_url=redis_url))
    assert database_check(api).startswith("ok: no schema yet")
    store = ResultStore.from_url(sqlite_url)
    migrate.upgrade(store)
    assert database_check(api) == "ok"
    _stamp(store, "f00dfeed")  # newer code migrated the database under this API
    assert database_check(api).startswith("schema: the results database is at schema revision "
                                          "f00dfeed")
    store.close()


def test_downgrade_to_one_row_per_task_keeps_the_latest_and_upgrades_again(
        store_url: str) -> None:
    store = ResultStore.from_url(store_url)
    migrate.upgrade(store)
    later = NOW + dt.timedelta(minutes=5)
    with store.engine.begin() as conn:
        for task_id, model, at in (("t1", "old", NOW), ("t1", "new", later), ("t2", "old", NOW)):
            conn.execute(sa.text(
                f"INSERT INTO {RESULTS_TABLE} (id, model, text_sha256, text_chars, status, "
                "attempts, truncated, finished_at) VALUES (:id, :m, :sha, 4, 'done', 1, :f, :at)"),
                {"id": task_id, "m": model, "sha": "0" * 64, "f": False, "at": at})
    dry = bertstream(Settings(database_url=store_url), "db", "downgrade", "0001")
    assert dry.returncode == 0, dry.stderr
    assert f"would roll back {migrate.head_revision()} -> 0001" in dry.stdout and "--yes" in dry.stdout
    assert "0002: every row but each task's latest" in dry.stdout, dry.stdout
    assert migrate.state(store).current == migrate.head_revision()  # a dry run: nothing dropped
    out = bertstream(Settings(database_url=store_url), "db", "downgrade", "0001", "--yes")
    assert out.returncode == 0, out.stderr
    assert migrate.state(store).current == "0001"
    with store.engine.connect() as conn:
        kept = sorted(conn.execute(sa.text(f"SELECT id, model FROM {RESULTS_TABLE}")).all())
    assert [tuple(r) for r in kept] == [("t1", "new"), ("t2", "old")]
    migrate.upgrade(store)
    assert migrate.check(store).up_to_date and ids(store) == ["t1", "t2"]
    store.close()


def test_a_session_holding_the_tables_fails_the_fixture_fast_and_is_named(pg_url: str) -> None:
    """A leftover connection in an open transaction fails the next test's table reset within
    the lock timeout, naming that session, instead of every test waiting out pytest's
    timeout."""
    from tests.conftest import _drop_tables

    store = ResultStore.from_url(pg_url)
    store.create_schema()
    store.close()
    engine = sa.create_engine(pg_url, connect_args={"application_name": "leftover-shell"})
    try:
        with engine.connect() as holder:
            holder.execute(sa.text(f"SELECT count(*) FROM {RESULTS_TABLE}"))  # a read lock
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="leftover-shell"):
                _drop_tables(engine, lock_timeout="1s")
            assert time.monotonic() - started < 15
            holder.rollback()
        _drop_tables(engine, lock_timeout="1s")  # nothing holds them now
        assert RESULTS_TABLE not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _first_setup_paused(store: ResultStore, pause_s: float) -> Iterator[dict[str, float]]:
    """A worker's first set-up of an empty database, caught between two migrations.

    Revision 0001 is committed (the results table exists, without the later
    columns) while the migration lock is held for ``pause_s`` more seconds,
    then the rest is applied. Yields once the half-built table is visible a
    dict that gets ``"done"`` (a monotonic time) when the last revision is
    committed, just before the lock is released.
    """
    from alembic import command

    halfway = threading.Event()
    marks: dict[str, float] = {}

    def setup(conn: sa.Connection) -> None:
        command.upgrade(migrate._config(conn), "0001")
        conn.commit()
        halfway.set()
        time.sleep(pause_s)
        command.upgrade(migrate._config(conn), "head")
        conn.commit()
        marks["done"] = time.monotonic()

    thread = threading.Thread(target=migrate._locked, args=(store, setup, "set up"))
    thread.start()
    try:
        assert halfway.wait(30)
        yield marks
    finally:
        thread.join(60)


def test_readers_wait_out_a_first_setup_instead_of_reading_a_half_built_table(
        store_url: str, redis_url: str) -> None:
    """A client (and so the API and the dashboard) polling while a worker is still
    migrating an empty database waits for the migration, instead of querying columns
    that are not there yet; the API's start-up check waits too instead of refusing."""
    from api.app import refuse_outdated_schema
    from producer.client import Client

    store = ResultStore.from_url(store_url)
    for reader in ("client", "api start-up"):
        with _first_setup_paused(store, pause_s=1.0) as setup:
            partial = migrate.state(store)
            assert (partial.current, partial.has_results) == ("0001", True)
            if reader == "client":
                with Client(Settings(database_url=store_url, broker_url=redis_url)) as client:
                    assert client.get_many(["t1"]) == {}
                    read_at = time.monotonic()
                    assert client.query(source="web") == []
            else:
                refuse_outdated_schema(store)
                read_at = time.monotonic()
            assert read_at >= setup["done"], "the reader did not wait for the set-up"
        assert migrate.check(store).up_to_date
        with store.engine.begin() as conn:
            migrate.drop_all(conn)
    store.close()


def test_a_reader_of_an_outdated_schema_is_told_the_command(
        sqlite_url: str, redis_url: str, api_factory: Callable[..., ServeProc]) -> None:
    """A schema left behind (no migration running) is a clear error naming the command:
    on the client, and as a 503 ``schema_mismatch`` from an API that started on an empty
    database; submitting, which needs only Redis, still works."""
    import json
    import urllib.error
    import urllib.request

    from producer.client import Client

    settings = Settings(database_url=sqlite_url, broker_url=redis_url)
    api = api_factory(settings)  # an empty database: the API starts
    store = ResultStore.from_url(sqlite_url)
    migrate.upgrade(store, "0001")
    with Client(settings) as client:
        with pytest.raises(SchemaMismatch, match="bertstream db upgrade"):
            client.get_many(["t1"])
        assert client.submit("still accepted", id="s1") == "s1"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(api.url + "/v1/results", timeout=10)
    assert caught.value.code == 503
    error = json.loads(caught.value.read())["error"]
    assert error["code"] == "schema_mismatch" and "bertstream db upgrade" in error["message"]
    store.close()


def test_a_schema_downgraded_under_a_running_client_is_a_schema_mismatch(
        store_url: str, redis_url: str) -> None:
    """A client that has read the table (its schema check is cached), then `bertstream db
    downgrade` under it: its next reads are a SchemaMismatch naming the command, not an
    outage (StoreUnavailable: the missing column was read as one). After `db upgrade` it
    reads again; rolled back to base (no table left) it reads nothing, as before any
    worker ran."""
    from producer.client import Client

    settings = Settings(database_url=store_url, broker_url=redis_url)
    upgraded_with_row(store_url, "t1")
    reads: list[Callable[[Client], object]] = [
        lambda c: c.get_many(["t1"]), lambda c: c.query(), lambda c: c.count(),
        lambda c: c.aggregate(), lambda c: c.windowed("t1")]
    with Client(settings) as client:
        for read in reads:  # each read once: the check is cached
            read(client)
        assert client.count() == 1
        out = bertstream(settings, "db", "downgrade", "0002", "--yes")
        assert out.returncode == 0, out.stderr
        for read in reads:
            with pytest.raises(SchemaMismatch, match=f"at schema revision 0002, this "
                               f"bertstream needs {migrate.head_revision()}: run "
                               "`bertstream db upgrade`"):
                read(client)
        assert client.submit("still accepted", id="s1") == "s1"  # submitting needs Redis
        assert bertstream(settings, "db", "upgrade").returncode == 0
        assert client.count() == 1 and set(client.get_many(["t1"])) == {"t1"}
        assert bertstream(settings, "db", "downgrade", "base", "--yes").returncode == 0
        assert client.get_many(["t1"]) == {} and client.count() == 0


def test_a_schema_downgraded_under_a_running_api_is_a_503_schema_mismatch(
        store_url: str, redis_url: str, api_factory: Callable[..., ServeProc]) -> None:
    """The API read the table (its client cached the check); `bertstream db downgrade`
    under it: a read is a 503 ``schema_mismatch`` naming the command, and after `db
    upgrade` it reads again."""
    import json
    import urllib.error
    import urllib.request

    def get(route: str) -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(api.url + route, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    settings = Settings(database_url=store_url, broker_url=redis_url)
    upgraded_with_row(store_url, "t1")
    api = api_factory(settings)
    assert get("/v1/results")[0] == 200
    assert bertstream(settings, "db", "downgrade", "0002", "--yes").returncode == 0
    for route in ("/v1/results", "/v1/stats", "/v1/tasks/t1"):
        status, body = get(route)
        assert status == 503, (route, body)
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "schema_mismatch", (route, body)
        assert "bertstream db upgrade" in error["message"]
    assert bertstream(settings, "db", "upgrade").returncode == 0
    assert get("/v1/results")[0] == 200


def test_a_reader_that_cannot_create_the_lock_file_reads_without_it(
        sqlite_url: str, redis_url: str, tmp_path: Path) -> None:
    """Waiting on the SQLite lock file is for readers a courtesy, not a need: where the
    file cannot be created (here a directory stands in its place, which stops root too)
    the reader goes on, while a migration still refuses to run unlocked."""
    from producer.client import Client

    store = ResultStore.from_url(sqlite_url)
    migrate.upgrade(store, "0001")
    (tmp_path / "results.db.migrate-lock").unlink()
    (tmp_path / "results.db.migrate-lock").mkdir()
    with Client(Settings(database_url=sqlite_url, broker_url=redis_url)) as client:
        with pytest.raises(SchemaMismatch, match=f"needs {migrate.head_revision()}"):
            client.get_many(["t1"])
    with pytest.raises(StoreUnavailable):
        migrate.upgrade(store)
    store.close()


@pytest.mark.parametrize("command", [("downgrade", "0009"), ("upgrade", "zz")])
def test_an_unknown_revision_exits_2_with_the_command_that_lists_them(
        sqlite_url: str, command: tuple[str, str]) -> None:
    settings = Settings(database_url=sqlite_url)
    assert bertstream(settings, "db", "upgrade").returncode == 0
    out = bertstream(settings, "db", *command)
    assert out.returncode == 2, out.stderr
    assert f"Can't locate revision identified by '{command[1]}'" in out.stderr
    assert "bertstream db history" in out.stderr and "Traceback" not in out.stderr
    assert migrate.check(ResultStore.from_url(sqlite_url)).up_to_date  # untouched


def test_an_upgrade_waits_out_another_migration_longer_than_the_statement_timeout(
        pg_url: str) -> None:
    """Another host holds the migration lock for longer than the statement timeout (a
    large table being rewritten): `db upgrade` waits for it instead of being cancelled by
    that timeout ("canceling statement due to statement timeout", exit 3)."""
    settings = Settings(database_url=pg_url, db_statement_timeout_s=1.0)
    holder = sa.create_engine(pg_url)
    conn = holder.connect()
    try:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": migrate._LOCK_KEY})
        conn.commit()
        release = threading.Timer(3.0, lambda: (
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": migrate._LOCK_KEY}),
            conn.commit()))
        release.start()
        try:
            done = bertstream(settings, "db", "upgrade")
        finally:
            release.join()
    finally:
        conn.close()
        holder.dispose()
    assert done.returncode == 0, done.stderr
    assert "upgraded" in done.stdout


def test_a_failed_migration_reports_its_own_error(pg_url: str) -> None:
    """A migration step fails (here a table of the next revision is already there): the
    error names that failure, not the unlock that followed inside the aborted
    transaction ("current transaction is aborted"), and the lock is not left held."""
    store = ResultStore.from_url(pg_url)
    migrate.upgrade(store, "0001")
    with store.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE bertstream_windows (x integer)"))
    settings = Settings(database_url=pg_url)
    failed = bertstream(settings, "db", "upgrade")
    assert failed.returncode != 0
    assert "already exists" in failed.stderr and "aborted" not in failed.stderr, failed.stderr
    with store.engine.connect() as conn:  # nobody holds the migration lock now
        assert conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"),
                            {"k": migrate._LOCK_KEY}).scalar()
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": migrate._LOCK_KEY})
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE bertstream_windows"))
    store.close()


def test_a_worker_meeting_a_locked_new_sqlite_file_waits_for_its_migration(
        tmp_path: Path) -> None:
    """Several workers starting on one new SQLite file: one holds the file's lock and the
    migration lock while it sets the file up; another's first read is answered "database
    is locked". That is no outage: it waits for the migration lock and reads again (it
    used to exit 3, which stopped its launcher's whole set of workers)."""
    import fcntl
    import sqlite3
    import threading

    from contract import migrate
    from contract.results import DbTimeouts

    db = tmp_path / "new.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # rollback journal: readers are locked out
    lock = open(tmp_path / "new.db.migrate-lock", "a")  # noqa: SIM115 - closed below
    fcntl.flock(lock, fcntl.LOCK_EX)
    store = ResultStore.from_url(f"sqlite:///{db}", DbTimeouts(statement_s=0.2))
    outcome: list[object] = []

    def start() -> None:
        try:
            outcome.append(migrate.ensure(store))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    worker = threading.Thread(target=start)
    worker.start()
    try:
        time.sleep(1.0)  # past the busy wait: the first read has met the lock
        assert not outcome, outcome
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        worker.join(timeout=30)
    store.close()
    [state] = outcome
    assert isinstance(state, migrate.SchemaState) and state.problem() is None, state


def test_an_upgrade_to_a_revision_below_the_database_s_is_refused_naming_downgrade(
        store_url: str) -> None:
    """`db upgrade 0001` on a database at a later revision changed nothing and said
    "already at revision ..." with exit 0, as if it had been done; it is refused (exit 2)
    naming `db downgrade`, the command that rolls back."""
    settings = Settings(database_url=store_url)
    head = migrate.head_revision()
    assert bertstream(settings, "db", "upgrade").returncode == 0
    for target in ("0001", "base"):
        out = bertstream(settings, "db", "upgrade", target)
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"is at revision {head}, above {target}: nothing changed" in out.stderr
        assert f"run `bertstream db downgrade {target}`" in out.stderr
        assert "already at" not in out.stdout and "Traceback" not in out.stderr
        store = ResultStore.from_url(store_url)
        assert migrate.state(store).current == head  # untouched
        store.close()
    out = bertstream(settings, "db", "upgrade", head)  # the same revision: nothing to do
    assert out.returncode == 0 and f"already at revision {head}" in out.stdout


def test_setting_up_a_database_logs_no_alembic_info_lines(tmp_path: Path) -> None:
    """A worker logs at INFO; Alembic's own INFO lines (a plugin set up, a migration
    context made) filled its start-up log. An application's own level for the
    ``alembic`` logger is kept."""
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "if sys.argv[2] == 'keep':\n"
        "    logging.getLogger('alembic').setLevel(logging.INFO)\n"
        "from contract import migrate\n"
        "from contract.results import ResultStore\n"
        "migrate.upgrade(ResultStore.from_url(sys.argv[1]))\n")
    for mode, want in (("default", False), ("keep", True)):
        url = f"sqlite:///{tmp_path / mode}.db"
        out = subprocess.run([sys.executable, "-c", script, url, mode], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=True).stdout
        assert ("INFO:alembic" in out) is want, out
