"""Reading the schema revision (every ``/readyz``, every start) must not fill the
engine's compiled-statement cache: alembic builds a new version Table per read, so each
read's statement is new to the cache, and each entry held a compiled statement until the
cache's size bound pushed it out."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from contract import migrate
from contract.results import ResultStore


def test_revision_reads_leave_the_compiled_cache_alone(tmp_path: Path) -> None:
    cache: dict[object, object] = {}
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'r.db'}")
    store = ResultStore(engine.execution_options(compiled_cache=cache))
    try:
        migrate.upgrade(store)
        migrate.state(store)
        before = len(cache)
        for _ in range(50):
            assert migrate.state(store).problem() is None
        assert len(cache) == before
    finally:
        store.close()
        engine.dispose()
