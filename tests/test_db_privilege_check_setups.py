"""The start-up privilege check and ``/readyz`` on set-ups a DBA may choose.

A role given INSERT and UPDATE per column (every column the worker writes, no
table-wide grant) writes the results: the check refused it at start (exit 2)
because a table-wide privilege test says no to column grants. ``/readyz``
promises the database's reason without the host: a host name that does not
resolve was shown as psycopg words it, name and all. Real PostgreSQL roles on
the test database, a real resolver failure.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import sqlalchemy as sa

from api.app import create_app
from contract import migrate
from contract.constants import RESULTS_TABLE, WINDOWS_TABLE
from contract.errors import StoreRefused, StoreUnavailable, exit_code
from contract.results import ResultStore
from contract.settings import Settings
from tests import test_db_refusals
from tests.producer_helpers import record
from tests.served_app import served
from tests.test_db_refusals import WorkerRole

#: A login role of the worker's own, allowed to read and write the results tables only.
worker_role = test_db_refusals.worker_role


def test_a_role_with_column_privileges_on_every_column_may_run_a_worker(
        worker_role: WorkerRole) -> None:
    """INSERT and UPDATE granted column by column: the role writes a row, so the check a
    worker runs at start lets it through (it refused it, naming a GRANT it did not need)."""
    name = worker_role.name
    with worker_role.admin.connect() as conn:
        columns = [row[0] for row in conn.execute(sa.text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = :t "
            "AND table_schema = current_schema()"), {"t": RESULTS_TABLE})]
    listed = ", ".join(columns)
    worker_role.sql(f"REVOKE INSERT, UPDATE ON {RESULTS_TABLE} FROM {name}",
                    f"GRANT INSERT ({listed}), UPDATE ({listed}) ON {RESULTS_TABLE} TO {name}")
    store = ResultStore.from_url(worker_role.url)
    try:
        migrate.check_privileges(store, migrate.WORKER_PRIVILEGES, "a worker")
        migrate.ensure(store)
        store.upsert([record("col-1"), record("col-2", status="failed", error="e")])
        store.upsert([record("col-2")])  # a new attempt replaces the failed row: an UPDATE
        assert store.get("col-2") is not None and store.get("col-2").status == "done"
    finally:
        store.close()


def test_a_role_without_select_on_a_column_it_reads_is_still_refused(
        worker_role: WorkerRole) -> None:
    """The check stays a check: no privilege at all on the windows table, table-wide or per
    column, is still refused at start with its GRANT."""
    name = worker_role.name
    worker_role.sql(f"REVOKE ALL ON {WINDOWS_TABLE} FROM {name}")
    store = ResultStore.from_url(worker_role.url)
    try:
        try:
            migrate.check_privileges(store, migrate.WORKER_PRIVILEGES, "a worker")
        except Exception as exc:  # noqa: BLE001 - the type and text are asserted
            assert f"GRANT SELECT, INSERT, DELETE ON {WINDOWS_TABLE} TO {name}" in str(exc)
        else:
            raise AssertionError("a role with no privilege on the windows table passed")
    finally:
        store.close()


def test_readyz_does_not_show_a_database_host_that_does_not_resolve(redis_url: str) -> None:
    """psycopg names the host it cannot resolve ("failed to resolve host 'db.internal'"):
    /readyz gives the reason without it, as it does for a refused connection."""
    host = f"bertstream-{uuid.uuid4().hex[:8]}.invalid"
    settings = Settings(broker_url=redis_url,
                        database_url=f"postgresql+psycopg://app:s3cret@{host}:5432/results",
                        queue=f"bst-host-{uuid.uuid4().hex[:8]}")
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        answer = http.get("/readyz")
    assert answer.status_code == 503
    database = answer.json()["checks"]["database"]
    assert database.startswith("unreachable: OperationalError: failed to resolve"), database
    assert host not in answer.text and "s3cret" not in answer.text, answer.text


def _without_usage_on_public(role: WorkerRole,
                             run: Callable[[ResultStore], object]) -> StoreRefused:
    """The error ``run`` raises on the role's store while the role may not use schema
    public (USAGE given back after); fails unless it is a :class:`StoreRefused`."""
    role.sql("REVOKE USAGE ON SCHEMA public FROM PUBLIC")
    store = ResultStore.from_url(role.url)
    try:
        run(store)
    except StoreUnavailable as exc:
        error: StoreUnavailable = exc
    else:
        raise AssertionError(f"{run.__name__} passed without a usable schema")
    finally:
        store.close()
        role.sql("GRANT USAGE ON SCHEMA public TO PUBLIC")
    assert isinstance(error, StoreRefused), error
    return error


def test_a_role_without_usage_on_the_tables_schema_is_refused_with_the_grant(
        worker_role: WorkerRole) -> None:
    """Without USAGE on the schema of the search path that holds the tables, PostgreSQL
    hides them (its search path skips such a schema, and current_schema() with it): a
    worker tried to create them, met "no schema has been selected to create in" and
    exited 3, an outage, for a GRANT to run. It is refused naming that GRANT (exit 2)."""
    name = worker_role.name
    error = _without_usage_on_public(worker_role, migrate.ensure)
    assert exit_code(error) == 2
    assert error.problem == (f"role {name} lacks privileges a worker needs: "
                             f"GRANT USAGE ON SCHEMA public TO {name}")


def test_a_role_with_its_own_schema_first_in_the_path_passes(
        worker_role: WorkerRole, pg_url: str) -> None:
    """The tables in a schema of the role's own (first in its search path, as "$user" puts
    it) while another copy sits in public, which the role may not use: nothing to grant."""
    name = worker_role.name
    worker_role.sql(f"CREATE SCHEMA {name} AUTHORIZATION {name}",
                    "REVOKE USAGE ON SCHEMA public FROM PUBLIC")
    store = ResultStore.from_url(worker_role.url)
    try:
        migrate.ensure(store)  # creates the tables in the role's schema
        migrate.check_privileges(store, migrate.WORKER_PRIVILEGES, "a worker")
        store.upsert([record("own-1")])
        assert store.get("own-1") is not None
    finally:
        store.close()
        worker_role.sql("GRANT USAGE ON SCHEMA public TO PUBLIC",
                        f"DROP SCHEMA {name} CASCADE")


def test_db_upgrade_by_a_role_without_usage_on_the_schema_is_a_setting(
        worker_role: WorkerRole) -> None:
    """`db upgrade` by a role whose search path holds no schema it may use met "no schema
    has been selected to create in" (SQLSTATE 3F000) as an outage (exit 3): a setting,
    exit 2, naming the GRANT or the search_path to set."""
    name = worker_role.name
    error = _without_usage_on_public(worker_role, migrate.upgrade)
    assert exit_code(error) == 2
    assert f"GRANT USAGE, CREATE ON SCHEMA <the schema> TO {name}" in error.problem
    assert "no schema has been selected to create in" in error.problem
