"""The results store under faults: refused rows, silent servers, long statements, file modes.

Row errors (a value the column cannot hold) fail that row alone; outages
(nothing answers) raise StoreUnavailable within the configured timeouts.
Everything runs on a real SQLite file and a real PostgreSQL.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from contract.errors import ConfigError, StoreUnavailable
from contract.results import DbTimeouts, ResultStore
from contract.settings import Settings
from tests.tcpproxy import SilentListener, TcpProxy, proxied_pg
from tests.test_results_store import record


def test_refused_rows_fail_alone_and_the_rest_commit(store: ResultStore) -> None:
    """Too long for String(128), NUL, a lone surrogate: each refused alone, on both databases."""
    good = [record(f"good-{i}") for i in range(9)]
    bad = [record("x" * 150), record("nul\x00id"), record("sur\ud800"),
           record("ok-id", source="s" * 200)]
    refused = store.upsert(good[:3] + bad[:2] + good[3:6] + bad[2:] + good[6:])
    assert sorted(r.record.id for r in refused) == sorted(b.id for b in bad)
    assert all(r.reason for r in refused)
    assert store.count() == len(good)
    assert set(store.get_many([g.id for g in good])) == {g.id for g in good}


def test_unknown_ids_are_simply_absent(store: ResultStore) -> None:
    """Looking up an id no row can have (NUL, surrogate, too long) finds nothing, no error."""
    store.upsert([record("caf\u00e9")])
    assert set(store.get_many(["caf\udce9", "caf\u00e9", "a\x00b", "y" * 300])) == {"caf\u00e9"}


def test_a_setting_larger_than_its_column_is_refused() -> None:
    with pytest.raises(ConfigError, match="MAX_ID_CHARS"):
        Settings.from_env({"BERTSTREAM_MAX_ID_CHARS": "200"})


@pytest.mark.parametrize("name", ["db_connect_timeout_s", "db_statement_timeout_s",
                                  "redis_socket_timeout_s", "redis_connect_timeout_s"])
def test_timeouts_must_be_positive_and_finite(name: str) -> None:
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match=name.upper()):
            Settings.from_env({f"BERTSTREAM_{name.upper()}": bad})


def test_sqlite_file_is_private(tmp_path: Path) -> None:
    """The results file holds the texts: created 0600, and SQLite's WAL follows it."""
    path = tmp_path / "private.db"
    s = ResultStore.from_url(f"sqlite:///{path}")
    try:
        s.create_schema()
        s.upsert([record("a")])
        for f in (path, Path(f"{path}-wal")):
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    finally:
        s.close()


def _silent_url(pg_url: str, port: int) -> str:
    url = sa.engine.make_url(pg_url)
    return url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def _unavailable_within(seconds: float, call: Callable[[], object]) -> None:
    """``call()`` raises StoreUnavailable, and within ``seconds``: an outage or a stopped
    statement, not a hang."""
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        call()
    assert time.monotonic() - t0 < seconds


def test_a_silent_server_is_an_outage_not_a_hang(pg_url: str) -> None:
    """A listener that accepts TCP and never answers: connecting gives up after the timeout."""
    silent = SilentListener()
    store = ResultStore.from_url(_silent_url(pg_url, silent.port),
                                 DbTimeouts(connect_s=2, statement_s=2))
    try:
        _unavailable_within(10, store.count)
    finally:
        store.close()
        silent.close()


def test_a_connection_that_goes_silent_is_cut(pg_url: str) -> None:
    """The server stops answering mid-session: the client-side guard ends the wait."""
    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    direct.close()
    proxy, proxied = proxied_pg(pg_url)
    store = ResultStore.from_url(proxied, DbTimeouts(connect_s=2, statement_s=1))
    try:
        assert store.count() == 0  # a pooled connection, then the far side goes quiet
        proxy.freeze()
        _unavailable_within(8, store.count)
    finally:
        store.close()
        proxy.close()


def test_an_outage_ends_the_servers_session_even_mid_transaction(pg_url: str) -> None:
    """When the proxy goes down, the server's side ends too, so a session cut in
    the middle of a transaction does not keep holding its locks (the tables the
    next tests drop). The proxy's pipe thread sits in recv() on the server's
    socket while the server waits for the client; closing the descriptor alone
    left that socket, and the session, alive for good."""
    import contextlib
    import uuid

    direct = ResultStore.from_url(pg_url)
    direct.create_schema()
    direct.close()
    url = sa.engine.make_url(pg_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    name = f"outage-{uuid.uuid4().hex[:8]}"
    cut = sa.create_engine(url.set(port=proxy.port).update_query_dict({"application_name": name}))
    watcher = sa.create_engine(pg_url)

    def state() -> str | None:
        with watcher.connect() as w:
            return w.execute(sa.text("SELECT state FROM pg_stat_activity WHERE application_name = :n"),
                             {"n": name}).scalar()

    conn = cut.connect()
    try:
        conn.begin()
        conn.execute(sa.text("SELECT count(*) FROM bertstream_results")).scalar()
        assert state() == "idle in transaction"
        proxy.down()
        deadline = time.monotonic() + 10
        while state() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert state() is None, "the server still holds the cut session"
    finally:
        with contextlib.suppress(Exception):
            conn.invalidate()
        cut.dispose()
        watcher.dispose()
        proxy.close()


def test_a_long_statement_is_stopped(db_url: str) -> None:
    """A statement running past the statement timeout is stopped, on both databases."""
    s = ResultStore.from_url(db_url, DbTimeouts(statement_s=1))
    endless = ("SELECT pg_sleep(30)" if db_url.startswith("postgresql") else
               "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
               "SELECT count(*) FROM c")
    try:
        _unavailable_within(8, lambda: s._run(lambda conn: conn.exec_driver_sql(endless).all(),
                                              "endless"))
        s.create_schema()  # the store is still usable afterwards
        assert s.count() == 0
    finally:
        s.close()


def test_results_command_gives_up_on_a_silent_database(pg_url: str, redis_url: str) -> None:
    """`bertstream results` against a server that never answers exits 3, it does not hang."""
    silent = SilentListener()
    env = dict(os.environ, BERTSTREAM_DATABASE_URL=_silent_url(pg_url, silent.port),
               BERTSTREAM_BROKER_URL=redis_url, BERTSTREAM_DB_CONNECT_TIMEOUT_S="2")
    try:
        t0 = time.monotonic()
        proc = subprocess.run([str(Path(sys.executable).with_name("bertstream")), "results"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert time.monotonic() - t0 < 30
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        silent.close()


def test_the_guard_cuts_only_the_operation_past_its_deadline(tmp_path: Path) -> None:
    """SQLite: an endless statement in one thread is cut by the guard (the statement's own
    look at the clock) while hundreds of quick reads start and finish beside it, none of
    them cut; the guard then keeps serving (a second endless statement is cut too)."""
    import threading

    store = ResultStore.from_url(f"sqlite:///{tmp_path}/g.db", DbTimeouts(statement_s=1))
    store.create_schema()
    endless = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
               "SELECT count(*) FROM c")

    def run_endless(outcome: list[float]) -> None:
        t0 = time.monotonic()
        try:
            store._run(lambda conn: conn.exec_driver_sql(endless).all(), "endless")
        except StoreUnavailable:
            outcome.append(time.monotonic() - t0)

    for _ in range(2):
        outcome: list[float] = []
        thread = threading.Thread(target=run_endless, args=(outcome,))
        thread.start()
        quick = 0
        while thread.is_alive() and quick < 100_000:
            assert store.count() == 0  # registered and released beside the stuck one
            quick += 1
        thread.join(10)
        assert quick > 100 and len(outcome) == 1
        assert store.timeouts.guard_s - 0.5 < outcome[0] < store.timeouts.guard_s + 3
    store.close()


class _Driver:
    """A stand-in DBAPI connection the guard can cut (``interrupt``): the guard's watcher
    thread serves every driver but SQLite's own, and its timing is what is tested here."""

    def __init__(self, name: str = "conn", fails: bool = False) -> None:
        self.name, self.fails, self.cuts = name, fails, 0

    def interrupt(self) -> None:
        self.cuts += 1
        if self.fails:
            raise RuntimeError("the driver refused")

    def conn(self) -> sa.Connection:
        """This driver as the SQLAlchemy connection the guard is given."""
        from types import SimpleNamespace
        return SimpleNamespace(connection=SimpleNamespace(dbapi_connection=self))  # type: ignore[return-value]


def test_an_idle_guard_lets_its_watcher_go_and_starts_another(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A guard no longer used holds no thread; its next operation is guarded again."""
    import contract.results as results_module
    from contract.results import _Guard

    monkeypatch.setattr(results_module, "_GUARD_IDLE_S", 0.2)
    guard, driver = _Guard(0.3), _Driver()
    with guard(driver.conn()):
        pass
    first = guard._watcher
    assert first is not None and first.is_alive()
    first.join(0.3 + 0.2 + 3)  # it wakes at the last cut it planned, then idles
    assert not first.is_alive() and guard._watcher is None
    with guard(driver.conn()) as watched:
        time.sleep(0.8)
    assert watched.cut and driver.cuts == 1


def test_an_operation_that_starts_the_watcher_runs_once_it_waits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-fork server may fork from C right after an operation: a watcher thread still
    starting then (passing the interpreter's lock) hung the child. Here the new thread
    runs late, as on a loaded machine: the operation waits until the watcher waits."""
    import contract.results as results_module
    from contract.results import _Guard

    watch = results_module._Guard._watch

    def late(guard: _Guard) -> None:
        time.sleep(0.3)
        watch(guard)

    monkeypatch.setattr(results_module._Guard, "_watch", late)
    guard = _Guard(30)
    with guard(_Driver().conn()):
        watcher = guard._watcher
        assert watcher is not None and watcher.ident is not None
        frame = sys._current_frames()[watcher.ident]
        assert (frame.f_code.co_name, frame.f_back and frame.f_back.f_code.co_name) == (
            "wait", "_watch")  # in Condition.wait, called by the watcher's loop


def test_later_operations_leave_the_waiting_watcher_asleep() -> None:
    """Once the watcher sleeps until the first cut, operations with later cuts do not wake
    it (each wake passes the interpreter's lock, which a fork from C must not meet); an
    operation with an earlier cut (a deadline) does, and is cut on time."""
    import threading

    from contract.results import ResultStore, _Guard

    wakes: list[float] = []

    class Counted(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            if threading.current_thread().name == "bertstream-db-guard":
                wakes.append(time.monotonic())
            return super().wait(timeout)

    guard = _Guard(30)
    guard._cond = Counted()
    for _ in range(50):
        with guard(_Driver().conn()):
            time.sleep(0.002)  # room for a woken watcher to run
    assert len(wakes) == 1
    driver = _Driver()
    with ResultStore.until(time.monotonic() + 0.3), guard(driver.conn()) as watched:
        time.sleep(1.0)
    assert watched.cut and driver.cuts == 1 and len(wakes) == 3  # woken, then at the cut


def test_sqlite_statements_are_stopped_without_a_thread(tmp_path: Path) -> None:
    """SQLite: the statement itself looks at the clock (its progress handler), so no
    operation starts a thread; an endless one is still stopped, and the connection it
    ran on serves the next operation."""
    import threading

    before = set(threading.enumerate())  # other tests' guards may still idle
    store = ResultStore.from_url(f"sqlite:///{tmp_path}/g.db", DbTimeouts(statement_s=1))
    store.create_schema()
    store.upsert([record("a")])
    assert set(store.get_many(["a"])) == {"a"}
    endless = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
               "SELECT count(*) FROM c")
    _unavailable_within(store.timeouts.guard_s + 3,
                        lambda: store._run(lambda conn: conn.exec_driver_sql(endless).all(),
                                           "endless"))
    assert store.count() == 1
    assert set(threading.enumerate()) <= before and store._guard._watcher is None
    store.close()


def test_a_guarded_sqlite_scan_looks_at_the_clock_rarely(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The statement's look at the clock is Python: it takes the interpreter's lock, which
    a busy thread (the API's, the worker's) holds up to a switch interval each time.
    Looked at every ten thousand steps, an aggregate over 40 000 rows looked hundreds of
    times and ran several times slower beside a busy thread (bench: CHANGELOG); it looks
    a few times now, and an endless statement is still stopped."""
    import types

    import contract.results as results_module

    store = ResultStore.from_url(f"sqlite:///{tmp_path}/g.db", DbTimeouts(statement_s=30))
    store.create_schema()
    for start in range(0, 40_000, 5_000):
        store.upsert([record(f"r{i}", label=("positive", "negative", "neutral")[i % 3])
                      for i in range(start, start + 5_000)])
    looks = 0

    def monotonic() -> float:
        nonlocal looks
        looks += 1
        return time.monotonic()

    clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time)
                                     if not name.startswith("_")})
    clock.monotonic = monotonic
    monkeypatch.setattr(results_module, "time", clock)
    assert sum(g["count"] for g in store.aggregate(by="label")) == 40_000
    assert looks <= 10, looks  # the store's own few, and the statement's
    store.close()


def test_a_cut_that_fails_does_not_stop_the_guard() -> None:
    """One connection's cut raising (a driver error) leaves the watcher guarding the rest.
    A stand-in connection: the fault is the driver's, not one a real database gives on cue."""
    from contract.results import _Guard

    guard = _Guard(0.2)
    drivers = [_Driver("first", fails=True), _Driver("second")]
    for driver in drivers:
        with guard(driver.conn()):
            time.sleep(0.6)
    assert [d.cuts for d in drivers] == [1, 1]


def _wait_for_a_lock_wait(engine: sa.Engine, timeout: float = 20) -> None:
    """Until some session of this database waits on a lock (a fixed sleep races a loaded
    machine: the wrong session would wait first and be the one aborted)."""
    deadline = time.monotonic() + timeout
    with engine.connect() as watcher:
        while True:
            waiting = watcher.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")).scalar()
            watcher.rollback()
            if waiting:
                return
            assert time.monotonic() < deadline, "the store's transaction never waited for x"
            time.sleep(0.01)


@pytest.mark.parametrize("retries", [5, 0])
def test_a_deadlock_victim_runs_its_transaction_again(pg_url: str, retries: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: a store transaction locks y then waits for x, held by another session,
    which then waits for y: a real lock cycle. The store's transaction waited first, so the
    server aborts it; it runs again and succeeds. The control (no retries) fails as before,
    with the deadlock taken for an outage."""
    import threading

    import contract.results as results_module

    monkeypatch.setattr(results_module, "CONFLICT_RETRIES", retries)
    store = ResultStore.from_url(pg_url)
    store.create_schema()
    store.upsert([record("x"), record("y")])
    other = sa.create_engine(pg_url)
    held = threading.Event()
    update = sa.text("UPDATE bertstream_results SET score = :s WHERE id = :id")
    runs: list[int] = []

    def work(conn: sa.Connection) -> None:
        runs.append(1)
        conn.execute(update, {"s": 0.1, "id": "y"})
        if len(runs) == 1:
            assert held.wait(10)
        conn.execute(update, {"s": 0.1, "id": "x"})  # waits for the other session

    def other_session() -> None:
        with other.begin() as conn:
            conn.execute(update, {"s": 0.2, "id": "x"})
            held.set()
            _wait_for_a_lock_wait(other)  # the store's transaction is waiting for x
            conn.execute(update, {"s": 0.2, "id": "y"})

    thread = threading.Thread(target=other_session)
    thread.start()
    try:
        if retries:
            store._run(work, "swap scores", begin=True)
            assert len(runs) == 2
            assert {r.id: r.score for r in store.query()} == {"x": 0.1, "y": 0.1}
        else:
            with pytest.raises(StoreUnavailable, match="deadlock"):
                store._run(work, "swap scores", begin=True)
            assert len(runs) == 1
    finally:
        thread.join(30)
        other.dispose()
        store.close()
