"""``/readyz`` when the API's role loses USAGE on the schema that holds the results.

PostgreSQL leaves a schema the role may not use out of its search path, so the
tables look missing: the readiness check read that as "ok: no schema yet" and
answered ready while every task read 404 and every listing came back empty. It now
says what to grant, as it does for a lost SELECT on the table.
"""

from __future__ import annotations

import uuid

import httpx

from api.app import create_app
from contract.settings import Settings
from tests import test_db_refusals
from tests.served_app import served
from tests.test_db_refusals import WorkerRole

#: A login role allowed to read and write the results tables only.
worker_role = test_db_refusals.worker_role


def test_readyz_is_not_ready_when_the_role_may_not_use_the_schema(
        worker_role: WorkerRole, redis_url: str) -> None:
    name = worker_role.name
    settings = Settings(broker_url=redis_url, database_url=worker_role.url,
                        queue=f"bst-usage-{uuid.uuid4().hex[:8]}")
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/readyz").json()["checks"]["database"] == "ok"
        worker_role.sql("REVOKE USAGE ON SCHEMA public FROM PUBLIC")
        try:
            refused = http.get("/readyz")
        finally:
            worker_role.sql("GRANT USAGE ON SCHEMA public TO PUBLIC")
        back = http.get("/readyz")
    assert refused.status_code == 503
    assert refused.json()["checks"]["database"] == (
        f"misconfigured: role {name} lacks privileges the API needs: "
        f"GRANT USAGE ON SCHEMA public TO {name}")
    assert back.json()["checks"]["database"] == "ok"
