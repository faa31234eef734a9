"""Fixtures on real services: Redis, PostgreSQL, SQLite, a tiny real BERT.

A missing service fails the test (it does not skip): CI must start them.
Fixtures flush before and after, and close what they open.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from bench.faults import RedisServer
from contract import migrate
from contract.results import ResultStore
from contract.settings import Settings
from tests.workers import WorkerProcess
from worker.process import ServeProc

# Test-only endpoints; db 9 keeps test traffic apart from a developer's queues.
REDIS_URL = os.environ.get("BERTSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
PG_URL = os.environ.get(
    "BERTSTREAM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
#: Where the default settings' SQLite database lands for a test's commands: a test that
#: leaves one behind ran something on the default database instead of its own.
STRAY_DATABASES = sorted({Path.cwd() / "bertstream.db",
                          Path(__file__).resolve().parent.parent / "bertstream.db"})


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal gives it, whatever started the run: a shell without job
    control starts a background command (`pytest &`, `nohup make test &`) with SIGINT
    ignored, which its children inherit, and then the tests of what SIGINT does (to
    `stream`, `submit --wait`, a publish) see nothing happen."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def no_stray_database() -> Iterator[None]:
    """Fail the test that creates ``./bertstream.db``: it read or wrote the default
    database, outside its temp dir, where other tests and runs would find its rows."""
    before = {p for p in STRAY_DATABASES if p.exists()}
    yield
    made = [str(p) for p in STRAY_DATABASES if p.exists() and p not in before]
    assert not made, (f"this test created {made}: it ran a command on the default "
                      "database URL; give it database_url (sqlite_url, pg_url)")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis database, flushed before and after."""
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # fails loudly when Redis is down
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def plain(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client on the test Redis database (to read its clock, its keys)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def r(plain: redis.Redis) -> redis.Redis:
    """:func:`plain` under the short name the stream tests use."""
    return plain


@pytest.fixture
def bsettings(redis_url: str, sqlite_url: str) -> Settings:
    """Settings for a producer: the test Redis database and an SQLite file (a module may
    override it with changes of its own)."""
    from tests.producer_helpers import broker_settings

    return broker_settings(redis_url, sqlite_url)


@contextlib.contextmanager
def kombu_broker(redis_url: str, visibility_timeout: float) -> Iterator[tuple[Any, redis.Redis]]:
    """A kombu connection to ``redis_url`` with bertstream's receive installed and
    ``visibility_timeout``, and a plain Redis client to look at the lists."""
    from kombu import Connection

    from worker import kombu_redis

    assert kombu_redis.install()
    conn = Connection(redis_url, transport_options={"visibility_timeout": visibility_timeout})
    r = redis.Redis.from_url(redis_url)
    try:
        yield conn, r
    finally:
        conn.release()
        r.close()


@pytest.fixture
def broker(redis_url: str) -> Iterator[tuple[Any, redis.Redis]]:
    """:func:`kombu_broker` on the test Redis with a short visibility timeout (1 s)."""
    with kombu_broker(redis_url, 1) as pair:
        yield pair


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The test PostgreSQL database with an empty results table."""
    engine = sa.create_engine(PG_URL)
    _drop_tables(engine)
    yield PG_URL
    _drop_tables(engine)
    engine.dispose()


def _drop_tables(engine: sa.Engine, lock_timeout: str = "20s") -> None:
    """Drop bertstream's tables; fail within seconds, naming the sessions that hold them.

    Without a lock timeout a leftover connection (a worker outliving an
    interrupted run, a shell in an open transaction) makes every later
    fixture wait until pytest's own timeout, test after test.
    """
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT set_config('lock_timeout', :t, true)"),
                         {"t": lock_timeout})
            migrate.drop_all(conn)
    except sa.exc.OperationalError as exc:
        with engine.connect() as conn:
            others = conn.execute(sa.text(
                "SELECT pid, application_name, state, backend_start, left(query, 100)"
                " FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()")).all()
        listing = "\n".join(f"  {tuple(row)}" for row in others) or "  (none now)"
        raise RuntimeError(f"could not drop the test tables; other sessions on this database:"
                           f"\n{listing}") from exc


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file in the test's temp dir."""
    return f"sqlite:///{tmp_path / 'results.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


def _open_store(url: str) -> Iterator[ResultStore]:
    """A results store on ``url`` with its schema created, closed at teardown."""
    s = ResultStore.from_url(url)
    s.create_schema()
    yield s
    s.close()


@pytest.fixture
def store(db_url: str) -> Iterator[ResultStore]:
    """A results store with its schema created, on each database."""
    yield from _open_store(db_url)


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[ResultStore]:
    """A results store with its schema created, on SQLite only."""
    yield from _open_store(sqlite_url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_store(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResultStore]:
    """One store per test module on each database, for property tests (hypothesis runs
    many examples in one test call; a function-scoped store would not be renewed)."""
    url = (f"sqlite:///{tmp_path_factory.mktemp('module') / 'm.db'}"
           if request.param == "sqlite" else PG_URL)
    store = ResultStore.from_url(url)
    with store.engine.begin() as conn:
        migrate.drop_all(conn)
    store.create_schema()
    yield store
    with store.engine.begin() as conn:
        migrate.drop_all(conn)
    store.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT classifier directory (2 layers, hidden 64)."""
    from tests.tinybert import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def settings(redis_url: str, db_url: str, tmp_path: Path) -> Settings:
    """Settings on the test Redis and database with a queue of its own."""
    return Settings(
        broker_url=redis_url,
        database_url=db_url,
        queue=f"bst-test-{uuid.uuid4().hex[:8]}",
        cache_dir=str(tmp_path / "cache"),
        max_wait_ms=20,
    )


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker subprocesses; every one still running is stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(settings: Settings, *, ready: bool = True, threads: int = 1) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log", threads=threads)
        started.append(w)
        return w.wait_ready() if ready else w

    yield start
    for w in started:
        w.stop(timeout=15)


@pytest.fixture(scope="session")
def poison_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT that raises on any text containing the word ``poisonpill``."""
    from tests.tinybert import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("poison-bert"), poison="poisonpill")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (free port, temp dir) the test can restart; stopped at teardown."""
    d = tmp_path / "redis"
    d.mkdir()
    server = RedisServer(d)
    yield server
    server.stop()


@pytest.fixture
def api_factory(tmp_path: Path) -> Iterator[Callable[..., ServeProc]]:
    """Start ``bertstream serve`` processes; all are stopped at teardown."""
    started: list[ServeProc] = []

    def start(settings: Settings, *args: str) -> ServeProc:
        server = ServeProc(settings, tmp_path / f"serve-{len(started)}.log", *args)
        started.append(server)
        return server.wait_ready()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def module_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProc]:
    """One ``bertstream serve`` for a test module, on the test Redis (flushed before and
    after) and a SQLite file of its own: for table-driven tests posting one request a
    case, where a server a case would start dozens. Its tests must not need a fresh one."""
    d = tmp_path_factory.mktemp("module-serve")
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # fails loudly when Redis is down
    client.flushdb()
    server = ServeProc(Settings(broker_url=REDIS_URL, database_url=f"sqlite:///{d / 'results.db'}"),
                       d / "serve.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()
        client.flushdb()
        client.close()
