"""The results store across a pre-fork web server's fork, however the fork is made.

uWSGI's default pre-fork (no ``lazy-apps``, no ``py-call-osafterfork``) forks its
workers from C: Python's ``os.register_at_fork`` hooks never run there, so the
client's own after-fork reset does not either. A store used without a client (an
app reading ``ResultStore`` itself) has no hook at all. Either way the workers and
the master shared the master's pooled database connections and read one another's
replies: another id's row, or "result object does not return rows". The engine now
checks on every checkout that a pooled connection was opened by this process.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from contract.results import ResultStore
from tests.producer_helpers import record

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

ROOT = Path(__file__).resolve().parents[1]
ROWS = 50
READS = 200


@pytest.fixture
def rows(store: ResultStore) -> ResultStore:
    """``store`` (SQLite and PostgreSQL) holding rows r0..r49."""
    store.upsert([record(f"r{i}", text=f"text {i}") for i in range(ROWS)])
    return store


def _c_fork() -> int:
    """fork(2) called from C, as uWSGI forks its workers: no at-fork hook of Python runs.
    Through PyDLL, so the GIL stays held across the call (the child owns it)."""
    return int(ctypes.PyDLL(None).fork())


def _wrong_reads(read: Callable[[str], list[str]]) -> int:
    """How many of :data:`READS` reads gave anything but the one id asked for."""
    bad = 0
    for j in range(READS):
        want = f"r{j % ROWS}"
        try:
            bad += read(want) != [want]
        except Exception:  # noqa: BLE001 - counted: the parent asserts on it
            bad += 1
    return bad


def _in_children(fork: Callable[[], int], read: Callable[[str], list[str]],
                 children: int = 3) -> Iterator[int]:
    """Fork ``children`` processes that each read concurrently with this one; yield this
    process's wrong reads, then each child's exit code (0: every read right)."""
    pids = []
    for _ in range(children):
        pid = fork()
        assert pid >= 0, "fork failed"
        if pid == 0:  # pragma: no cover - the child's exit code is asserted
            code = 1
            try:
                code = 1 if _wrong_reads(read) else 0
            finally:
                os._exit(code)
        pids.append(pid)
    yield _wrong_reads(read)
    for pid in pids:
        yield os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


#: The forking process, a process of its own: fork(2) copies only the forking thread,
#: so a lock another thread of the test process held then (the suite leaves daemon
#: threads behind) would stay locked in the children for ever. A fresh process holds
#: only the client's own threads, as a web server's master does. ``client``: a Client
#: forked from C (uWSGI); ``store``: a bare ResultStore across os.fork.
MASTER = """
import json, os, sys
from contract.results import ResultStore
from producer import Client
from tests.producer_helpers import broker_settings
from tests.test_webapp_client_fork import _c_fork, _in_children

redis_url, db_url, kind = sys.argv[1:4]
if kind == "client":
    with Client(broker_settings(redis_url, db_url)) as client:
        assert client.get("r1") is not None  # a pooled connection open before the fork
        results = list(_in_children(_c_fork, lambda want: sorted(client.get_many([want]))))
        results.append(client.get("r2") is not None)
else:
    store = ResultStore.from_url(db_url)
    assert store.get_many(["r1"])  # a pooled connection open before the fork
    results = list(_in_children(os.fork, lambda want: sorted(store.get_many([want]))))
    results.append(bool(store.get_many(["r2"])))
    store.close()
print(json.dumps(results))
"""


def _forked_reads(redis_url: str, db_url: str, kind: str, timeout: float = 240) -> list[object]:
    """:data:`MASTER`'s results: its wrong reads, each child's exit code, a read after."""
    proc = subprocess.Popen([sys.executable, "-c", MASTER, redis_url, db_url, kind], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)  # the hung children too, not only the master
        proc.communicate()
        pytest.fail(f"a forked reader hung ({kind}, {timeout:.0f} s)")
    assert proc.returncode == 0, stderr
    return list(json.loads(stdout))


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s children, then ``pid``."""
    import signal
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                              check=False).stdout.split()
    for one in [*map(int, children), pid]:
        try:
            os.kill(one, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_client_forked_from_c_reads_its_own_rows(rows: ResultStore, redis_url: str,
                                                   db_url: str) -> None:
    """uWSGI's pre-fork: the client built and used in the master at import, its workers
    forked from C. Each worker reads its own answers, and so does the master."""
    assert _forked_reads(redis_url, db_url, "client") == [0, 0, 0, 0, True]


def test_a_bare_store_survives_os_fork(rows: ResultStore, redis_url: str, db_url: str) -> None:
    """A store used without a client (no at-fork hook of its own) across ``os.fork``:
    each process reads over connections it opened itself."""
    assert _forked_reads(redis_url, db_url, "store") == [0, 0, 0, 0, True]


def test_a_client_forked_from_c_on_a_busy_machine(rows: ResultStore, redis_url: str,
                                                  db_url: str) -> None:
    """The same with every core busy, several times over: a thread of the client still
    passing the interpreter's lock at the fork (the database guard's watcher, starting
    or woken by a read) left the child's copy of that lock broken, and the child hung
    at its first read (1 run in 20 on a loaded two-core machine)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(2 * (os.cpu_count() or 1))]
    try:
        for _ in range(6):
            assert _forked_reads(redis_url, db_url, "client", timeout=90) == [0, 0, 0, 0, True]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
