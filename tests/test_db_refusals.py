"""PostgreSQL refusing writes for reasons other than a lost connection.

A database turned read-only (``default_transaction_read_only``, as after a
failover to a standby), a worker role that lost its INSERT and UPDATE
privileges, and a role over its connection limit: each is an outage, not a
row error. A real worker keeps every task (none failed, lost or done twice)
and resumes by itself once the cause is removed; a worker that meets one while
setting up an empty database says so in one line and exits 3 (2 when it is the role's
privilege on the schema: tests/test_db_role_refusals.py); the API's export
answers 503 as its other reads do. The worker connects as a role of its own
(``<database>_worker``, no superuser, owning nothing), so the test can refuse it
without refusing itself.
"""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from api.app import create_app
from contract import migrate
from contract.constants import MIGRATIONS_TABLE, RESULTS_TABLE, STATUS_DONE, WINDOWS_TABLE
from contract.errors import StoreUnavailable
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.polling import until
from tests.served_app import served
from worker.process import settings_env

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WorkerRole:
    """A login role for the worker, and a superuser session to refuse it things."""

    name: str
    url: str
    database: str
    admin: sa.Engine

    def sql(self, *statements: str) -> None:
        with self.admin.connect() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))

    def terminate(self) -> None:
        """End the role's sessions: its pool reconnects, into whatever the database is now."""
        self.sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 f"WHERE usename = '{self.name}'")


@pytest.fixture
def worker_role(pg_url: str) -> Iterator[WorkerRole]:
    """The results tables set up by the superuser, and a role allowed to read and write
    them (nothing else); the role, and any setting the test changed, undone after."""
    url = sa.engine.make_url(pg_url)
    database = str(url.database)
    name = f"{database}_worker"
    password = secrets.token_hex(8)
    # The admin session is never read-only, whatever the test makes of the database.
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT",
                             connect_args={"options": "-c default_transaction_read_only=off"})
    store = ResultStore.from_url(pg_url)
    try:
        migrate.upgrade(store)
    finally:
        store.close()
    role = WorkerRole(name, url.set(username=name, password=password)
                      .render_as_string(hide_password=False), database, admin)
    role.sql(f"DROP ROLE IF EXISTS {name}",
             f"CREATE ROLE {name} LOGIN NOSUPERUSER PASSWORD '{password}'",
             f"GRANT SELECT, INSERT, UPDATE, DELETE ON {RESULTS_TABLE}, {WINDOWS_TABLE} "
             f"TO {name}",
             f"GRANT SELECT ON {MIGRATIONS_TABLE} TO {name}")
    try:
        yield role
    finally:
        role.sql(f"ALTER DATABASE {database} RESET default_transaction_read_only")
        role.terminate()
        role.sql(f"DROP OWNED BY {name}", f"DROP ROLE {name}")
        admin.dispose()


def _settings(role: WorkerRole, redis_url: str, tiny_model_dir: Path,
              tmp_path: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=role.url,
                    queue=f"bst-refusals-{uuid.uuid4().hex[:8]}",
                    cache_dir=str(tmp_path / "cache"), model=str(tiny_model_dir),
                    max_wait_ms=20, flush_every=8, bulk_chunk_size=10)


def _outage_then_resume(role: WorkerRole, pg_url: str, settings: Settings, worker: Any,
                        refuse: list[str], says: str, allow: list[str]) -> None:
    """Twenty texts stored; ``refuse``; twenty more sent, which the worker cannot store
    (its log ``says`` why, as an outage); ``allow``; every text done once, at its first
    delivery, without restarting the worker."""
    texts = [f"the hotel room was very good {i}" for i in range(40)]
    direct = ResultStore.from_url(pg_url)
    try:
        with Client(settings.replace(database_url=pg_url)) as client:
            first = client.submit_many(texts[:20]).ids
            client.wait(first, timeout=60)
            role.sql(*refuse)
            second = client.submit_many(texts[20:]).ids
            until(lambda: "database unavailable, requeueing" in worker.log(), 30,
                  "the worker meets the refusal as an outage")
            assert says in worker.log()
            assert direct.count() == 20, "nothing can be written while refused"
            role.sql(*allow)
            rows = client.wait(first + second, timeout=30)
        assert worker.proc.poll() is None, "the worker must ride the refusal out"
        assert len(rows) == len(texts) == direct.count()
        assert {(r.status, r.attempts, r.error) for r in rows.values()} == {
            (STATUS_DONE, 1, None)}, "an outage fails no row and counts no delivery"
    finally:
        direct.close()


def test_a_store_writes_again_as_soon_as_a_read_only_database_takes_writes(
        worker_role: WorkerRole) -> None:
    """The store's sessions begun while the database was read-only stay read-only: the
    next write after the database took writes again must not need a restart."""
    store = ResultStore.from_url(worker_role.url)
    now = dt.datetime.now(dt.timezone.utc)
    records = [ResultRecord(id=f"ro-{i}", text_sha256="a" * 64, text_chars=1, model="m",
                            status=STATUS_DONE, finished_at=now) for i in range(3)]
    try:
        worker_role.sql(f"ALTER DATABASE {worker_role.database} "
                        "SET default_transaction_read_only = on")
        worker_role.terminate()
        with pytest.raises(StoreUnavailable, match="read-only transaction"):
            store.upsert(records[:2])
        assert store.count() == 0  # reads go on
        worker_role.sql(f"ALTER DATABASE {worker_role.database} "
                        "RESET default_transaction_read_only")
        assert not store.upsert(records)
        assert store.count() == 3
    finally:
        store.close()


@pytest.mark.slow
def test_a_worker_resumes_once_a_read_only_database_takes_writes_again(
        worker_role: WorkerRole, pg_url: str, redis_url: str, tiny_model_dir: Path,
        worker_factory: Any, tmp_path: Path) -> None:
    """The worker's sessions end while the database is read-only, so it reconnects into
    read-only sessions. A session keeps the read-only default it began with: the pooled
    connections refused every write after the database took writes again, and the worker
    requeued its flushes for ever. A write refused as read-only now ends its session."""
    settings = _settings(worker_role, redis_url, tiny_model_dir, tmp_path)
    worker = worker_factory(settings)
    db = worker_role.database
    _outage_then_resume(
        worker_role, pg_url, settings, worker,
        refuse=[f"ALTER DATABASE {db} SET default_transaction_read_only = on",
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE usename = '{worker_role.name}'"],
        says="cannot execute INSERT in a read-only transaction",
        allow=[f"ALTER DATABASE {db} RESET default_transaction_read_only"])


@pytest.mark.slow
def test_a_worker_rides_out_a_role_that_lost_its_write_privileges(
        worker_role: WorkerRole, pg_url: str, redis_url: str, tiny_model_dir: Path,
        worker_factory: Any, tmp_path: Path) -> None:
    """``permission denied`` is the role's, not the row's: an outage, every task kept."""
    settings = _settings(worker_role, redis_url, tiny_model_dir, tmp_path)
    worker = worker_factory(settings)
    tables = f"{RESULTS_TABLE}, {WINDOWS_TABLE}"
    _outage_then_resume(
        worker_role, pg_url, settings, worker,
        refuse=[f"REVOKE INSERT, UPDATE ON {tables} FROM {worker_role.name}"],
        says=f"permission denied for table {RESULTS_TABLE}",
        allow=[f"GRANT INSERT, UPDATE ON {tables} TO {worker_role.name}"])


@pytest.mark.slow
def test_a_worker_rides_out_a_role_over_its_connection_limit(
        worker_role: WorkerRole, pg_url: str, redis_url: str, tiny_model_dir: Path,
        worker_factory: Any, tmp_path: Path) -> None:
    """No connection for the role (its sessions ended, its limit 0) is an outage too."""
    settings = _settings(worker_role, redis_url, tiny_model_dir, tmp_path)
    worker = worker_factory(settings)
    _outage_then_resume(
        worker_role, pg_url, settings, worker,
        refuse=[f"ALTER ROLE {worker_role.name} CONNECTION LIMIT 0",
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE usename = '{worker_role.name}'"],
        says=f'too many connections for role "{worker_role.name}"',
        allow=[f"ALTER ROLE {worker_role.name} CONNECTION LIMIT -1"])


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_an_export_the_database_refuses_before_its_first_row_answers_503(
        worker_role: WorkerRole, redis_url: str, tmp_path: Path, fmt: str) -> None:
    """A role that may not read the results table: the export answered 200 and then broke
    its body off (the server logging a traceback), where every other read answers 503
    ``database_misconfigured``. Its first page is read before the response starts."""
    worker_role.sql(f"REVOKE SELECT ON {RESULTS_TABLE} FROM {worker_role.name}")
    settings = Settings(broker_url=redis_url, database_url=worker_role.url,
                        queue=f"bst-refusals-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        for params in ({}, {"format": fmt}):
            r = http.get("/v1/results", params=params)
            assert r.status_code == 503, (params, r.status_code, r.text[:300])
            assert r.json()["error"]["code"] == "database_misconfigured"
            assert "retry-after" not in r.headers  # a GRANT mends it, not a wait


def test_readyz_says_not_ready_when_the_role_cannot_read_the_results(
        worker_role: WorkerRole, redis_url: str, tmp_path: Path) -> None:
    """The schema revision table answering is not enough: a role without SELECT on the
    results table answered ``database: ok`` while every read was a 503."""
    settings = Settings(broker_url=redis_url, database_url=worker_role.url,
                        queue=f"bst-refusals-{uuid.uuid4().hex[:8]}",
                        cache_dir=str(tmp_path / "cache"))
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/readyz").json()["checks"]["database"] == "ok"
        worker_role.sql(f"REVOKE SELECT ON {RESULTS_TABLE} FROM {worker_role.name}")
        r = http.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["database"] == (
            f"misconfigured: role {worker_role.name} lacks privileges the API needs: "
            f"GRANT SELECT ON {RESULTS_TABLE} TO {worker_role.name}")
        worker_role.sql(f"GRANT SELECT ON {RESULTS_TABLE} TO {worker_role.name}")
        assert http.get("/readyz").json()["checks"]["database"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize(("refuse", "code", "says"), [
    ("ALTER DATABASE {db} SET default_transaction_read_only = on", 3,
     "error: cannot set up the schema: (psycopg.errors.ReadOnlySqlTransaction) cannot "
     "execute CREATE TABLE in a read-only transaction"),
    (None, 2,  # the role may not create tables in schema public (PostgreSQL 15's default)
     "error: cannot set up the schema: (psycopg.errors.InsufficientPrivilege) permission "
     "denied for schema public; a setting to fix, not an outage: role {role} lacks a "
     "privilege on schema public: GRANT USAGE, CREATE ON SCHEMA public TO {role}"),
    ("ALTER ROLE {role} CONNECTION LIMIT 0", 3,
     "error: cannot read the schema revision: (psycopg.OperationalError) connection failed: "),
], ids=["read-only", "no-create", "connection-limit"])
def test_a_worker_that_cannot_set_up_the_schema_says_so_in_one_line(
        worker_role: WorkerRole, redis_url: str, tiny_model_dir: Path, tmp_path: Path,
        refuse: str | None, code: int, says: str) -> None:
    """An empty database the worker's start-up migration cannot write: one error line
    naming the refusal, no traceback, and no table half made. A read-only database or no
    connection left is an outage (exit 3, as when unreachable); a role without CREATE on
    the schema is a setting: exit 2, naming the GRANT."""
    with worker_role.admin.connect() as conn:
        migrate.drop_all(conn)
        if refuse is None and conn.execute(sa.text(
                "SELECT has_schema_privilege(:role, 'public', 'CREATE')"),
                {"role": worker_role.name}).scalar_one():
            pytest.skip("every role may create tables in schema public on this server")
    if refuse is not None:
        worker_role.sql(refuse.format(db=worker_role.database, role=worker_role.name))
    settings = _settings(worker_role, redis_url, tiny_model_dir, tmp_path)
    out = subprocess.run([sys.executable, "-m", "worker", "--device", "cpu"],
                         env={**settings_env(settings.replace(torch_threads=1)),
                              "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == code, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(says.format(role=worker_role.name)), \
        out.stderr[-3000:]
    with worker_role.admin.connect() as conn:
        assert not {RESULTS_TABLE, MIGRATIONS_TABLE} & set(sa.inspect(conn).get_table_names())
