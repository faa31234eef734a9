"""A real worker through SIGTERM and through a Redis restart: nothing lost, nothing stuck."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from contract.broker import lane_queue
from contract.constants import STATUS_DONE
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.conftest import RedisServer
from tests.polling import until
from worker.process import die_with_parent, settings_env

pytestmark = pytest.mark.slow


def test_sigterm_puts_buffered_messages_back_at_once(settings: Settings, tiny_model_dir: Path,
                                                     worker_factory: Any) -> None:
    """Messages waiting in the worker's buffer go back to the queue on SIGTERM, not after
    the visibility timeout (an hour here)."""
    s = settings.replace(model=str(tiny_model_dir), max_wait_ms=600_000, flush_every=1000,
                         visibility_timeout_s=3600)
    worker = worker_factory(s)
    r = redis.Redis.from_url(s.broker_url)
    queue = lane_queue(s, bulk=False)
    try:
        with Client(s) as client:
            ids = [client.submit(f"buffered text {i}") for i in range(5)]
        until(lambda: r.llen(queue) == 0 and r.hlen("unacked") == 5, 30, "worker reserved all")
        t0 = time.monotonic()
        assert worker.stop(timeout=30) == 0
        assert r.llen(queue) == 5 and r.hlen("unacked") == 0
        assert time.monotonic() - t0 < 20
        # a new worker takes them at once
        worker_factory(s.replace(max_wait_ms=20))
        with Client(s) as client:
            rows = client.wait(ids, timeout=60)
    finally:
        r.close()
    assert all(row.status == STATUS_DONE and row.attempts == 1 for row in rows.values())


def test_sigterm_lets_the_running_flush_commit(settings: Settings, tiny_model_dir: Path,
                                               worker_factory: Any) -> None:
    """SIGTERM during a long flush: it finishes and commits; the worker then exits 0."""
    s = settings.replace(model=str(tiny_model_dir), bulk_chunk_size=3000, max_wait_ms=20,
                         token_budget=2048)
    worker = worker_factory(s)
    texts = [f"a long enough text about the hotel room number {i} " * 6 for i in range(3000)]
    store = ResultStore.from_url(s.database_url)
    try:
        with Client(s) as client:
            ids = client.submit_many(texts).ids
        until(lambda: store.count() > 0, 60, "the flush began committing")  # early commits
        assert worker.stop(timeout=120) == 0
        stored = store.count()
    finally:
        store.close()
    assert stored == len(ids), "the running flush must commit before the worker exits"
    r = redis.Redis.from_url(s.broker_url)
    try:
        assert r.hlen("unacked") == 0 and r.llen(lane_queue(s, bulk=True)) == 0
    finally:
        r.close()


def _stream_across_a_restart(redis_server: RedisServer, sqlite_url: str, model: Path,
                             tmp_path: Path, worker_factory: Any,
                             before_restart: Callable[[Client, list[str], ResultStore], object],
                             timeout: float) -> tuple[Any, list[str], dict[str, Any], int]:
    """A worker on ``redis_server`` takes 300 texts, ``before_restart(client, ids, store)``
    runs, Redis restarts, 300 more are sent and all are waited for. Gives the worker
    (checked alive), the ids, their rows and the count of rows stored."""
    s = Settings(broker_url=redis_server.url, database_url=sqlite_url, queue="bst-restart",
                 model=str(model), cache_dir=str(tmp_path / "cache"),
                 bulk_chunk_size=10, flush_every=4, visibility_timeout_s=5,
                 publish_retries=40, publish_retry_max_s=0.5)
    worker = worker_factory(s)
    store = ResultStore.from_url(sqlite_url)
    try:
        with Client(s) as client:
            ids = client.submit_many([f"before the restart {i}" for i in range(300)]).ids
            before_restart(client, ids, store)
            redis_server.stop()
            redis_server.start()
            ids += client.submit_many([f"after the restart {i}" for i in range(300)]).ids
            rows = client.wait(ids, timeout=timeout)
        worker.check_alive()
        stored = store.count()
    finally:
        store.close()
    return worker, ids, rows, stored


def test_worker_reconnects_after_a_redis_restart(redis_server: RedisServer, sqlite_url: str,
                                                 tiny_model_dir: Path, worker_factory: Any,
                                                 tmp_path: Path) -> None:
    """Redis restarts between two streams: the same worker reconnects by itself and the
    producer's publishes ride out the restart; every text ends with one row."""
    worker, ids, rows, stored = _stream_across_a_restart(
        redis_server, sqlite_url, tiny_model_dir, tmp_path, worker_factory,
        lambda client, ids, store: client.wait(ids, timeout=60), timeout=120)
    assert len(rows) == stored == len(ids) == 600  # sent 600, stored 600, lost 0, 0 duplicates
    assert all(row.status == STATUS_DONE for row in rows.values())
    assert "Connection to broker lost" in worker.log()


def test_worker_rides_out_a_redis_restart_mid_stream(redis_server: RedisServer,
                                                     sqlite_url: str, tiny_model_dir: Path,
                                                     worker_factory: Any,
                                                     tmp_path: Path) -> None:
    """Redis restarts while the worker is draining the queue: a message taken as Redis
    goes down is in the unacked index (recorded in the same step) and comes back."""
    _, ids, rows, _ = _stream_across_a_restart(
        redis_server, sqlite_url, tiny_model_dir, tmp_path, worker_factory,
        lambda client, ids, store: until(lambda: store.count() > 0, 60, "first rows"),
        timeout=60)
    assert len(rows) == len(ids) == 600


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's zombie waits for init)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


_PARENT = """
import subprocess, sys, time
from contract.settings import Settings
from worker.process import WorkerProc
worker = WorkerProc(Settings.from_env(), sys.argv[1], args=("--device", "cpu"),
                    name="orphan").wait_ready()
bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(worker.pid, bare.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_does_not_outlive_the_process_that_started_it(
        settings: Settings, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A test run or benchmark killed with -9 leaves no worker consuming its queues; a child
    started without ``die_with_parent`` (the control) does outlive it."""
    env = settings_env(settings.replace(model=str(tiny_model_dir)))
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path / "orphan.log")],
                              env=env, stdout=subprocess.PIPE, text=True)
    bare = 0
    try:
        assert parent.stdout is not None
        worker_pid, bare = (int(x) for x in parent.stdout.readline().split())
        assert _running(worker_pid) and _running(bare)
        parent.kill()
        parent.wait(timeout=10)
        until(lambda: not _running(worker_pid), 15, "the worker ends with its parent")
        time.sleep(0.5)
        assert _running(bare), "the control child outlives its parent"
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if parent.stdout is not None:
            parent.stdout.close()
        if bare and _running(bare):
            os.kill(bare, signal.SIGKILL)


def test_a_child_started_from_another_thread_outlives_that_thread() -> None:
    """The kernel ties the signal to the forking thread: a child that a timer thread starts
    (a server restarted mid-test) must not die when that thread ends."""
    started: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: started.append(subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], preexec_fn=die_with_parent())))
    thread.start()
    thread.join()
    try:
        time.sleep(1.0)
        assert started[0].poll() is None, "the child died with the thread that started it"
    finally:
        started[0].kill()
        started[0].wait(timeout=10)


_LAUNCHER = """
import sys

import worker.launcher as launcher
from contract.settings import Settings

CHILD = '''
import os, signal, sys, time
def term(*_):
    open(sys.argv[1], "w").write("TERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
os.write(1, f'{os.getpid()}\\\\n'.encode())  # one write: the two children share the pipe
time.sleep(300)
'''
launcher.child_commands = lambda *a, **k: [
    ([sys.executable, "-c", CHILD, f"{sys.argv[1]}.{i}"], None) for i in range(2)]
sys.exit(launcher.launch(["cpu"], Settings()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launcher_killed_outright_leaves_its_children_a_warm_shutdown(tmp_path: Path) -> None:
    """kill -9 of the per-GPU launcher (the OOM killer, say): each child gets SIGTERM, its
    warm shutdown, instead of running on unsupervised beside the launcher's restart."""
    marker = tmp_path / "term"
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(marker)],
                                stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert launcher.stdout is not None
        pids = [int(launcher.stdout.readline()) for _ in range(2)]
        assert all(_running(p) for p in pids)
        launcher.kill()
        launcher.wait(timeout=10)
        until(lambda: not any(_running(p) for p in pids), 15, "the children end with it")
        assert [(tmp_path / f"term.{i}").read_text() for i in range(2)] == ["TERM", "TERM"]
    finally:
        launcher.kill()
        launcher.wait(timeout=10)
        if launcher.stdout is not None:
            launcher.stdout.close()
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
