"""A database that refuses the role (a privilege, a login) is a setting to fix, not an outage.

A worker whose role may not write the results started and met every flush's
``permission denied`` as an outage, requeueing for ever; a role without CONNECT, or a
role or database that does not exist, made the worker exit 3 ("unreachable, retry
later") and ``db`` commands too. Now each is one line naming what to grant or fix, and
exit 2; ``bertstream serve`` refuses to start on it; ``/readyz`` names the cause without
the URL's host or password. A real outage (connection refused, too many connections, a
read-only database, an administrator's shutdown) stays exit 3, and a running worker
still rides a privilege revoked under it out (tests/test_db_refusals.py). The role,
the privileges and the outages are PostgreSQL's own; only a wrong password cannot be
caused here (the test server trusts local logins), so its refusal is the server's
message as libpq reports it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import sqlalchemy as sa

from api.app import create_app
from contract import migrate
from contract.constants import MIGRATIONS_TABLE, RESULTS_TABLE, WINDOWS_TABLE
from contract.errors import StoreRefused, StoreUnavailable, exit_code
from contract.results import ResultStore, refusal
from contract.settings import Settings
from tests import test_db_refusals
from tests.served_app import served
from tests.test_db_refusals import WorkerRole
from worker.process import free_port, settings_env

ROOT = Path(__file__).resolve().parent.parent
#: A login role of the worker's own, allowed to read and write the results tables only.
worker_role = test_db_refusals.worker_role


@contextlib.contextmanager
def no_connect(role: WorkerRole) -> Iterator[None]:
    """The role may not connect to the database (CONNECT taken from PUBLIC, which grants it
    by default); given back after."""
    role.sql(f"REVOKE CONNECT ON DATABASE {role.database} FROM PUBLIC")
    try:
        yield
    finally:
        role.sql(f"GRANT CONNECT ON DATABASE {role.database} TO PUBLIC")


def as_user(role: WorkerRole, **parts: str) -> str:
    """The role's URL with ``parts`` (username, database, port) changed."""
    url = sa.engine.make_url(role.url)
    if "port" in parts:
        url = url.set(port=int(parts.pop("port")))
    return url.set(**parts).render_as_string(hide_password=False)


def bertstream(url: str, redis_url: str, *args: str,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    settings = Settings(database_url=url, broker_url=redis_url)
    return subprocess.run([sys.executable, "-c", "from producer.cli import main; main()", *args],
                          env={**settings_env(settings), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def last_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    return lines[-1] if lines else ""


# -- the store: which refusals are settings --------------------------------------------------


def test_privileges_and_logins_are_refusals_outages_are_not(worker_role: WorkerRole) -> None:
    """Each fault caused for real: the error a read raises, and the line it says."""
    cases: list[tuple[str, type[StoreUnavailable], str]] = []

    def read(url: str) -> StoreUnavailable:
        store = ResultStore.from_url(url)
        try:
            store.count()
        except StoreUnavailable as exc:
            return exc
        finally:
            store.close()
        raise AssertionError("the read was not refused")

    name = worker_role.name
    worker_role.sql(f"REVOKE SELECT ON {RESULTS_TABLE} FROM {name}")
    error = read(worker_role.url)
    worker_role.sql(f"GRANT SELECT ON {RESULTS_TABLE} TO {name}")
    assert isinstance(error, StoreRefused), error
    assert error.problem == (f"role {name} lacks a privilege on table {RESULTS_TABLE}: GRANT "
                             f"SELECT, INSERT, UPDATE, DELETE ON {RESULTS_TABLE} TO {name}")
    cases.append((as_user(worker_role, username=f"{name}_missing"), StoreRefused,
                  f"role {name}_missing does not exist"))
    cases.append((as_user(worker_role, database=f"{worker_role.database}_missing"),
                  StoreRefused, f"database {worker_role.database}_missing does not exist"))
    cases.append((as_user(worker_role, port=str(free_port())), StoreUnavailable,
                  "Connection refused"))
    for url, kind, says in cases:
        error = read(url)
        assert type(error) is kind, (url, error)
        assert says in str(error), error
        assert exit_code(error) == (2 if kind is StoreRefused else 3)
    with no_connect(worker_role):
        error = read(worker_role.url)
    assert isinstance(error, StoreRefused), error
    assert error.problem == (f"role {name} may not connect to database {worker_role.database}: "
                             f"GRANT CONNECT ON DATABASE {worker_role.database} TO {name}")
    worker_role.sql(f"ALTER ROLE {name} CONNECTION LIMIT 0")
    try:
        error = read(worker_role.url)
    finally:
        worker_role.sql(f"ALTER ROLE {name} CONNECTION LIMIT -1")
    assert type(error) is StoreUnavailable, error
    assert "too many connections" in str(error)


def test_an_administrators_shutdown_and_a_read_only_database_are_outages(
        worker_role: WorkerRole) -> None:
    """A session ended by pg_terminate_backend (SQLSTATE 57P01) and a write refused as
    read-only (25006): :func:`refusal` leaves them to the outage path."""
    engine = sa.create_engine(worker_role.url)
    try:
        with engine.connect() as conn:
            worker_role.terminate()
            with pytest.raises(sa.exc.DBAPIError) as shutdown:
                conn.execute(sa.text("SELECT 1"))
        with engine.connect() as conn:
            conn.execute(sa.text("SET TRANSACTION READ ONLY"))
            with pytest.raises(sa.exc.DBAPIError) as read_only:
                conn.execute(sa.text(f"DELETE FROM {WINDOWS_TABLE}"))
    finally:
        engine.dispose()
    assert refusal(shutdown.value, worker_role.name) is None, shutdown.value
    assert refusal(read_only.value, worker_role.name) is None, read_only.value


def test_a_wrong_password_is_a_refusal() -> None:
    """libpq gives a refused login no SQLSTATE: the server's words, as psycopg reports
    them, decide. The test server trusts local logins, so the error is built."""
    error = psycopg.OperationalError(
        'connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL:  '
        'password authentication failed for user "app"')
    wrapped = sa.exc.OperationalError("SELECT 1", {}, error)
    assert refusal(wrapped, "app") == (
        "password authentication failed for role app: check the user and password of "
        "BERTSTREAM_DATABASE_URL")
    too_many = psycopg.OperationalError(
        'connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL:  '
        "sorry, too many clients already")
    assert refusal(sa.exc.OperationalError("SELECT 1", {}, too_many), "app") is None


# -- the worker's start-up ------------------------------------------------------------------


def start_worker(url: str, redis_url: str, tiny_model_dir: Path,
                 tmp_path: Path) -> subprocess.CompletedProcess[str]:
    settings = Settings(broker_url=redis_url, database_url=url,
                        queue=f"bst-role-{uuid.uuid4().hex[:8]}", torch_threads=1,
                        cache_dir=str(tmp_path / "cache"), model=str(tiny_model_dir))
    return subprocess.run([sys.executable, "-m", "worker", "--device", "cpu"],
                          env={**settings_env(settings), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=90, cwd=ROOT)


@pytest.mark.slow
def test_a_worker_whose_role_may_not_write_exits_2_naming_the_grants(
        worker_role: WorkerRole, redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """It started, then requeued every flush for ever ("database unavailable"): now it
    refuses at start with the GRANT of exactly what it lacks."""
    name = worker_role.name
    worker_role.sql(f"REVOKE INSERT, UPDATE ON {RESULTS_TABLE} FROM {name}",
                    f"REVOKE DELETE ON {WINDOWS_TABLE} FROM {name}")
    out = start_worker(worker_role.url, redis_url, tiny_model_dir, tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert last_line(out) == (
        f"error: role {name} lacks privileges a worker needs: GRANT INSERT, UPDATE ON "
        f"{RESULTS_TABLE} TO {name}; GRANT DELETE ON {WINDOWS_TABLE} TO {name} "
        "(a setting to fix, not an outage)")
    assert str(sa.engine.make_url(worker_role.url).password) not in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["no-connect", "no-such-role", "no-such-database",
                                   "refused", "connection-limit"])
def test_a_worker_start_tells_a_setting_from_an_outage(
        worker_role: WorkerRole, redis_url: str, tiny_model_dir: Path, tmp_path: Path,
        fault: str) -> None:
    """A setting: exit 2, one line saying what to fix. An outage: exit 3, as before."""
    name, db = worker_role.name, worker_role.database
    url = {"no-such-role": as_user(worker_role, username=f"{name}_missing"),
           "no-such-database": as_user(worker_role, database=f"{db}_missing"),
           "refused": as_user(worker_role, port=str(free_port()))}.get(fault, worker_role.url)
    with contextlib.ExitStack() as undo:
        if fault == "no-connect":
            undo.enter_context(no_connect(worker_role))
        if fault == "connection-limit":
            worker_role.sql(f"ALTER ROLE {name} CONNECTION LIMIT 0")
            undo.callback(worker_role.sql, f"ALTER ROLE {name} CONNECTION LIMIT -1")
        out = start_worker(url, redis_url, tiny_model_dir, tmp_path)
    code, says = {
        "no-connect": (2, f"GRANT CONNECT ON DATABASE {db} TO {name}"),
        "no-such-role": (2, f"role {name}_missing does not exist: create it"),
        "no-such-database": (2, f"database {db}_missing does not exist: create it"),
        "refused": (3, "Connection refused"),
        "connection-limit": (3, f'too many connections for role "{name}"'),
    }[fault]
    assert out.returncode == code, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    line = last_line(out)
    assert line.startswith("error: ") and says in line, line
    assert ("a setting to fix, not an outage" in line) == (code == 2), line


# -- the API ----------------------------------------------------------------------------------


def test_serve_refuses_a_role_that_may_not_read_and_starts_through_an_outage(
        worker_role: WorkerRole, redis_url: str) -> None:
    """`bertstream serve` exits 2 naming the GRANT; an outage (too many connections) is
    no reason not to start (as for Redis): /readyz reports it."""
    name = worker_role.name
    worker_role.sql(f"REVOKE SELECT ON {WINDOWS_TABLE} FROM {name}")
    port = str(free_port())
    out = bertstream(worker_role.url, redis_url, "serve", "--port", port)
    assert out.returncode == 2, out.stderr[-3000:]
    assert last_line(out) == (
        f"error: role {name} lacks privileges the API needs: GRANT SELECT ON {WINDOWS_TABLE} "
        f"TO {name} (a setting to fix, not an outage)")
    worker_role.sql(f"GRANT SELECT ON {WINDOWS_TABLE} TO {name}",
                    f"ALTER ROLE {name} CONNECTION LIMIT 0")
    settings = Settings(database_url=worker_role.url, broker_url=redis_url)
    proc = subprocess.Popen([sys.executable, "-c", "from producer.cli import main; main()",
                             "serve", "--port", port], env=settings_env(settings),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        worker_role.sql(f"ALTER ROLE {name} CONNECTION LIMIT -1")


def test_readyz_names_the_cause_without_the_password(
        worker_role: WorkerRole, redis_url: str) -> None:
    """It said ``cannot read the results table: InsufficientPrivilege`` or
    ``unreachable: OperationalError``: now what to grant, or the server's reason, without
    the URL (its host or password)."""
    name, password = worker_role.name, sa.engine.make_url(worker_role.url).password
    settings = Settings(broker_url=redis_url, database_url=worker_role.url,
                        queue=f"bst-role-{uuid.uuid4().hex[:8]}")
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/readyz").json()["checks"]["database"] == "ok"
        worker_role.sql(f"REVOKE SELECT ON {RESULTS_TABLE} FROM {name}")
        refused = http.get("/readyz")
        worker_role.sql(f"GRANT SELECT ON {RESULTS_TABLE} TO {name}")
        with no_connect(worker_role):
            worker_role.terminate()
            no_login = http.get("/readyz")
        worker_role.sql(f"ALTER ROLE {name} CONNECTION LIMIT 0")
        worker_role.terminate()
        try:
            busy = http.get("/readyz")
        finally:
            worker_role.sql(f"ALTER ROLE {name} CONNECTION LIMIT -1")
        assert http.get("/readyz").json()["checks"]["database"] == "ok"
    assert refused.status_code == 503
    assert refused.json()["checks"]["database"] == (
        f"misconfigured: role {name} lacks privileges the API needs: "
        f"GRANT SELECT ON {RESULTS_TABLE} TO {name}")
    assert no_login.json()["checks"]["database"] == (
        f"misconfigured: role {name} may not connect to database {worker_role.database}: "
        f"GRANT CONNECT ON DATABASE {worker_role.database} TO {name}")
    assert busy.json()["checks"]["database"] == (
        f'unreachable: OperationalError: too many connections for role "{name}"')
    for answer in (refused, no_login, busy):
        assert password not in answer.text and "127.0.0.1" not in answer.text, answer.text


# -- bertstream db ----------------------------------------------------------------------------


def test_db_commands_exit_2_on_a_refusal_and_3_on_an_outage(
        worker_role: WorkerRole, redis_url: str) -> None:
    """`db delete --yes` by a role that may only read names the GRANT it needs, before
    deleting anything; a role without CONNECT is a setting too; too many connections is
    an outage."""
    name = worker_role.name
    worker_role.sql(f"REVOKE UPDATE, DELETE ON {RESULTS_TABLE}, {WINDOWS_TABLE} FROM {name}")
    out = bertstream(worker_role.url, redis_url, "db", "delete", "--older-than", "1d", "--yes")
    assert out.returncode == 2, out.stderr
    assert last_line(out) == (
        f"error: role {name} lacks privileges `db delete` needs: GRANT UPDATE, DELETE ON "
        f"{RESULTS_TABLE} TO {name}; GRANT DELETE ON {WINDOWS_TABLE} TO {name} "
        "(a setting to fix, not an outage)")
    dry = bertstream(worker_role.url, redis_url, "db", "delete", "--older-than", "1d")
    assert dry.returncode == 0, dry.stderr
    with no_connect(worker_role):
        out = bertstream(worker_role.url, redis_url, "db", "current")
    assert out.returncode == 2, out.stderr
    assert f"GRANT CONNECT ON DATABASE {worker_role.database} TO {name}" in last_line(out)
    worker_role.sql(f"ALTER ROLE {name} CONNECTION LIMIT 0")
    try:
        out = bertstream(worker_role.url, redis_url, "db", "current")
    finally:
        worker_role.sql(f"ALTER ROLE {name} CONNECTION LIMIT -1")
    assert out.returncode == 3, out.stderr
    assert "too many connections" in last_line(out)


def test_the_schema_check_needs_the_tables_it_checks(pg_url: str) -> None:
    """On an empty database nothing is checked (the tables are not there yet), and on
    SQLite there are no roles: check_privileges passes."""
    store = ResultStore.from_url(pg_url)
    try:
        migrate.check_privileges(store, migrate.WORKER_PRIVILEGES, "a worker")
    finally:
        store.close()


def test_submit_wait_on_a_role_that_may_not_read_exits_2(
        worker_role: WorkerRole, redis_url: str) -> None:
    """`submit --wait` sends, then reads the results: a role that may not read them is a
    setting to fix there too (exit 2, naming the GRANT), not an outage (exit 3)."""
    name = worker_role.name
    worker_role.sql(f"REVOKE SELECT ON {RESULTS_TABLE} FROM {name}")
    out = bertstream(worker_role.url, redis_url, "submit", "--wait",
                     "--timeout", "5", "a text to wait for")
    assert out.returncode == 2, out.stderr
    assert f"ON {RESULTS_TABLE} TO {name}" in last_line(out)
    assert "all 1 item(s) were sent" in last_line(out)


def test_a_reader_without_select_on_the_revision_table_is_told_to_grant_select(
        worker_role: WorkerRole, redis_url: str) -> None:
    """Readers check the schema's revision first: a role that may not read its table is
    told to grant SELECT there, all that any role but the migrating owner needs (it was
    told SELECT, INSERT, UPDATE, DELETE), and the message says the database refuses the
    client, not that it cannot be reached. The GRANT it names is enough."""
    name = worker_role.name
    worker_role.sql(f"REVOKE SELECT ON {MIGRATIONS_TABLE} FROM {name}")
    out = bertstream(worker_role.url, redis_url, "results", "--limit", "1")
    assert out.returncode == 2, out.stderr
    line = last_line(out)
    assert "refuses this client" in line and "cannot reach" not in line, line
    grant = f"GRANT SELECT ON {MIGRATIONS_TABLE} TO {name}"
    assert line.endswith(grant), line
    worker_role.sql(grant)
    out = bertstream(worker_role.url, redis_url, "results", "--limit", "1")
    assert out.returncode == 0, out.stderr
