"""Chaos: workers, a streaming producer and faults at random, then the delivery checks.

Several worker processes take one queue on a private redis-server (AOF, fsync on every
write) while a producer streams texts, a few of them bad (empty, invisible, oversized,
malformed items and whole malformed messages). Meanwhile a chaos loop, at random
intervals drawn from ``--seed``, kills a worker with SIGKILL or stops one with SIGTERM
(and starts a replacement), kills or stops redis-server and starts it again on its data,
and takes the database away: the workers' PostgreSQL sessions terminated or cut
through a proxy for a few seconds, SQLite locked for a few seconds.

Then the faults stop, the queues drain and it checks, printing PASS or FAIL for each:
every submitted id has exactly one row, and it is the latest; healthy items are done
(or failed with a dead-letter reason); bad items failed alone with their reason; nothing
is queued or unacked; every SIGTERM ended its worker within ``--stop-timeout``; no worker
died unasked; Redis keeps no key without a TTL beyond its structural ones. Exit 0 only
when every check passes. ``--lossy-restart`` adds one Redis restart that loses its data:
the producer reports the ids that never got a row, sends them again and the checks then
ask for all of them.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from bench.faults import RedisServer, TcpProxy
from contract.broker import lane_queue, make_celery
from contract.constants import MALFORMED_PREFIX, TASK_ANALYZE
from contract.errors import BertstreamError
from contract.messages import TaskItem
from contract.results import ResultStore, results
from contract.settings import Settings
from producer.client import Client
from worker.flush import derived_key
from worker.process import WorkerProc

#: Bad item kinds: (the item's text, its meta) and a piece of the reason its row must carry.
BAD_KINDS: dict[str, tuple[Any, Any, str]] = {
    "empty": ("", None, "empty or whitespace"),
    "invisible": ("\u200b\ufeff\u200b", None, "no visible characters"),
    "oversized": ("x" * 25_000, None, "over the limit"),
    "nul": ("a text with a \x00 in it", None, "NUL character"),
    "not-a-string": (12345, None, "must be a string"),
    "meta-list": ("a good text with a bad meta", [1, 2], "meta must be a JSON object"),
}
#: Words the healthy texts are drawn from.
WORDS = ("the hotel was good", "service was slow", "房间很干净", "电影很差", "great value",
         "would not return", "friendly staff", "noisy room", "早餐不错", "a fine stay")
#: Keys that may stay without a TTL: kombu's bindings and its (empty) unacked structures.
STRUCTURAL = ("_kombu.", "unacked", "unacked_index", "unacked_mutex")
#: The model name of the second model's workers (``--second-model``).
SECOND = "second"
#: What in a worker's log means it crashed or lost its event loop.
CRASH_MARKS = ("Unrecoverable error", "Error in timer", "Segmentation fault")


def now_s(t0: float) -> float:
    return round(time.monotonic() - t0, 1)


@dataclass
class Sent:
    """What the producer published: ids with their kind ('ok' or a bad kind)."""

    kinds: dict[str, str] = field(default_factory=dict)
    #: monotonic time of each id's (last) successful publish
    at: dict[str, float] = field(default_factory=dict)
    texts: dict[str, Any] = field(default_factory=dict)
    #: ids also sent to the second model (two rows, one of them latest)
    both: set[str] = field(default_factory=set)
    #: rows expected for whole malformed messages: their derived keys, to the message ids
    bad_messages: dict[str, str] = field(default_factory=dict)
    messages: int = 0
    publish_errors: Counter[str] = field(default_factory=Counter)
    republished: int = 0
    done: bool = False
    error: str | None = None


class Producer(threading.Thread):
    """Streams ``texts`` items in chunks at an even pace over ``duration`` seconds; a
    publish that fails is sent again (the same ids: at least once from here too)."""

    def __init__(self, settings: Settings, prefix: str, texts: int, duration: float,
                 chunk: int, bad_every: int, seed: int, second: Settings | None = None) -> None:
        super().__init__(name="chaos-producer", daemon=True)
        self.settings, self.prefix, self.texts, self.duration = settings, prefix, texts, duration
        self.second = second
        self.chunk, self.bad_every = chunk, bad_every
        self.rng = random.Random(seed + 1)
        self.sent = Sent()
        self.stop_event = threading.Event()
        self._lock = threading.Lock()

    def items(self) -> list[tuple[str, str, Any, Any]]:
        """Every (id, kind, text, meta) the run sends, drawn from the seed."""
        out = []
        kinds = list(BAD_KINDS)
        for n in range(self.texts):
            task_id = f"{self.prefix}{n}"
            if self.bad_every and n % self.bad_every == self.bad_every // 2:
                kind = kinds[(n // self.bad_every) % len(kinds)]
                text, meta, _ = BAD_KINDS[kind]
                out.append((task_id, kind, text, meta))
            else:
                text = f"{self.rng.choice(WORDS)} {self.rng.choice(WORDS)} #{n}"
                out.append((task_id, "ok", text, None))
        return out

    def publish(self, client: Client, items: list[tuple[str, str, Any, Any]],
                bulk: bool, *, also: bool = False) -> None:
        wire = [TaskItem(id=i, text=t, meta=m, source="chaos") for i, _, t, m in items]
        while not self.stop_event.is_set():
            try:
                client.publish(wire, bulk=bulk)
                break
            except BertstreamError as exc:
                with self._lock:
                    self.sent.publish_errors[type(exc).__name__] += 1
                time.sleep(0.5)  # Redis is down or full: send the same chunk again
        else:
            return
        t = time.monotonic()
        with self._lock:
            self.sent.messages += 1
            for i, kind, text, _ in items:
                if also:
                    self.sent.both.add(i)
                    continue
                self.sent.kinds[i] = kind
                self.sent.at[i] = t
                self.sent.texts[i] = text

    def bad_message(self, task_id: str) -> None:
        """A message whose body is no list of items: one failed row under its derived key."""
        while not self.stop_event.is_set():
            app = make_celery(self.settings)
            try:
                app.send_task(TASK_ANALYZE, args=["not a list of items"],
                              queue=lane_queue(self.settings, bulk=True), task_id=task_id)
                with self._lock:
                    self.sent.bad_messages[derived_key(task_id, 0)] = task_id
                    self.sent.at[derived_key(task_id, 0)] = time.monotonic()
                return
            except Exception as exc:  # noqa: BLE001 - kombu's errors during a restart
                with self._lock:
                    self.sent.publish_errors[type(exc).__name__] += 1
                time.sleep(0.5)
            finally:
                app.close()

    def run(self) -> None:
        try:
            items = self.items()
            chunks = [items[i:i + self.chunk] for i in range(0, len(items), self.chunk)]
            pace = self.duration / max(len(chunks), 1)
            t0 = time.monotonic()
            with Client(self.settings) as client, ExitStack() as stack:
                other = stack.enter_context(Client(self.second)) if self.second else None
                for n, chunk in enumerate(chunks):
                    if self.stop_event.is_set():
                        break
                    wait = t0 + n * pace - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    self.publish(client, chunk, bulk=n % 10 != 9)
                    if other is not None and n % 4 == 0:
                        self.publish(other, chunk, bulk=True, also=True)
                    if self.bad_every and n % 50 == 25:
                        self.bad_message(f"{self.prefix}badmsg-{n}")
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            self.sent.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.sent.done = True

    def resend(self, missing: list[str]) -> None:
        """Publish the ``missing`` rows' tasks again with their texts (after a restart that
        lost them): ``<id>`` to the default model, ``<id>@second`` to the second."""
        for key in missing:
            if key in self.sent.bad_messages:
                self.bad_message(self.sent.bad_messages[key])
        missing = [m for m in missing if m not in self.sent.bad_messages]
        for settings, suffix in ((self.settings, ""), (self.second, "@" + SECOND)):
            ids = [m.removesuffix(suffix) for m in missing
                   if (m.endswith(suffix) if suffix else "@" not in m)]
            if settings is None or not ids:
                continue
            with Client(settings) as client:
                for at in range(0, len(ids), self.chunk):
                    part = ids[at:at + self.chunk]
                    self.publish(client, [(i, self.sent.kinds[i], self.sent.texts[i],
                                           BAD_KINDS[self.sent.kinds[i]][1]
                                           if self.sent.kinds[i] != "ok" else None)
                                          for i in part], bulk=True, also=bool(suffix))
                    self.sent.republished += len(part)

    def expected(self) -> set[str]:
        """The rows the run must end with: ``<id>`` (default model), ``<id>@second``."""
        with self._lock:
            return set(self.sent.kinds) | set(self.sent.bad_messages) \
                | {f"{i}@{SECOND}" for i in self.sent.both}


class Fleet:
    """The worker processes: start, kill -9, SIGTERM, replace, and notice deaths."""

    def __init__(self, groups: list[tuple[Settings, int]], workdir: Path, stop_timeout: float,
                 t0: float) -> None:
        #: (settings, how many workers run with them): one group per model
        self.groups, self.workdir = groups, workdir
        self.stop_timeout = stop_timeout
        self.t0 = t0
        self.live: list[WorkerProc] = []
        self.all: list[WorkerProc] = []
        self.ready: set[int] = set()
        self.stops: list[float] = []
        self.stuck: list[str] = []
        self.crashes: list[dict[str, Any]] = []
        self.refused_starts = 0
        self.term_while_starting = 0

    def start(self, settings: Settings) -> WorkerProc:
        w = WorkerProc(settings, self.workdir / f"worker-{len(self.all)}.log",
                       args=("--device", "cpu"), name="chaos")
        self.live.append(w)
        self.all.append(w)
        return w

    def fill(self) -> None:
        """Notice workers that exited unasked (a crash; exit 3 before ready: a start
        refused by a database outage, started again) and keep each group's number running."""
        for w in list(self.live):
            if w.ready_path is not None and w.ready_path.exists():
                self.ready.add(w.pid)
            code = w.proc.poll()
            if code is None:
                continue
            self.live.remove(w)
            if code == 3 and w.pid not in self.ready:
                self.refused_starts += 1
            else:
                self.crashes.append({"t": now_s(self.t0), "pid": w.pid, "code": code,
                                     "log": w.tail(3000)})
            w.stop()
        for settings, size in self.groups:
            while sum(w.settings is settings for w in self.live) < size:
                self.start(settings)

    def pick(self, rng: random.Random) -> WorkerProc | None:
        self.fill()
        return rng.choice(self.live) if self.live else None

    def kill9(self, rng: random.Random) -> str:
        w = self.pick(rng)
        if w is None:
            return "no worker"
        self.live.remove(w)
        w.kill()
        self.fill()
        return f"pid {w.pid}"

    def term(self, w: WorkerProc, *, sent: float | None = None) -> tuple[float, int | None]:
        """SIGTERM ``w`` (unless it was sent at ``sent``); its seconds to exit and code
        (None: stuck, killed)."""
        self.live.remove(w)
        if w.ready_path is not None and w.ready_path.exists():
            self.ready.add(w.pid)
        start = sent if sent is not None else time.monotonic()
        if sent is None:
            w.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = w.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            code = None
            self.stuck.append(f"pid {w.pid}: no exit {self.stop_timeout:.0f} s after "
                              f"SIGTERM:\n{w.tail(3000)}")
            w.kill()
        took = time.monotonic() - start
        self.stops.append(took)
        w.stop()
        if code == -signal.SIGTERM and w.pid not in self.ready:
            # still starting: Celery's handler (installed before it consumes) was not yet
            # there, so the default action ended it, holding nothing
            self.term_while_starting += 1
            code = 0
        if code not in (0, None):
            self.crashes.append({"t": now_s(self.t0), "pid": w.pid, "code": code,
                                 "log": w.tail(3000), "on": "SIGTERM"})
        return took, code

    def freeze(self, ws: list[WorkerProc], seconds: float,
               during: Callable[[], None] | None = None) -> None:
        """SIGSTOP ``ws`` for ``seconds`` (a paused VM, a long GC), run ``during`` at the
        end, then SIGCONT."""
        for w in ws:
            w.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
            if during is not None:
                during()
        finally:
            for w in ws:
                if w.proc.poll() is None:
                    w.proc.send_signal(signal.SIGCONT)

    def freeze_one(self, rng: random.Random, seconds: float) -> str:
        w = self.pick(rng)
        if w is None:
            return "no worker"
        self.freeze([w], seconds)
        return f"pid {w.pid} stopped for {seconds:.1f} s"

    def term_one(self, rng: random.Random) -> str:
        w = self.pick(rng)
        if w is None:
            return "no worker"
        took, code = self.term(w)
        self.fill()
        return f"pid {w.pid} exited {code} after {took:.1f} s"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.fill()
            if all(w.ready_path is not None and w.ready_path.exists() for w in self.live):
                return
            time.sleep(0.2)
        raise TimeoutError("workers not ready:\n" + "\n".join(w.tail(2000) for w in self.live))

    def stop_all(self) -> list[tuple[float, int | None]]:
        """SIGTERM every worker at once; each one's seconds to exit and code."""
        self.fill()
        sent = time.monotonic()
        for w in self.live:
            w.proc.send_signal(signal.SIGTERM)
        return [self.term(w, sent=sent) for w in list(self.live)]

    def logs_crash_marks(self) -> list[str]:
        found = []
        for w in self.all:
            text = w.log_path.read_text(errors="replace") if w.log_path.exists() else ""
            found += [f"{w.log_path.name}: {m}" for m in CRASH_MARKS if m in text]
        return found

    def close(self) -> None:
        for w in self.all:
            w.stop(timeout=10)


class Database:
    """The results database: the checker's direct engine and the faults it can take."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sa_url = sa.engine.make_url(url)
        self.pg = self.sa_url.get_backend_name() == "postgresql"
        self.proxy: TcpProxy | None = None
        self.worker_url = url
        if self.pg:
            self.proxy = TcpProxy(self.sa_url.host or "127.0.0.1", self.sa_url.port or 5432)
            self.worker_url = self.sa_url.set(host="127.0.0.1", port=self.proxy.port) \
                .render_as_string(hide_password=False)
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)

    def terminate_backends(self) -> str:
        """End the workers' sessions (those through the proxy), as a server restart or an
        administrator would: no one else's on the same database."""
        assert self.proxy is not None
        ports = self.proxy.upstream_ports()
        if not ports:
            return "no worker session open"
        with self.engine.begin() as conn:
            n = conn.execute(sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND client_port = ANY(:ports)"),
                {"ports": ports}).scalar_one()
        return f"{n} of the workers' {len(ports)} session(s) terminated"

    def cut(self, seconds: float) -> str:
        assert self.proxy is not None
        self.proxy.down()
        time.sleep(seconds)
        self.proxy.up()
        return f"connections cut for {seconds:.1f} s"

    def lock(self, seconds: float) -> str:
        """SQLite: hold the write lock for ``seconds`` (writers see 'database is locked')."""
        path = self.sa_url.database or ""
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            time.sleep(seconds)
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return f"write lock held for {seconds:.1f} s"

    @staticmethod
    def _run_rows(prefix: str, *columns: Any) -> Any:
        """The run's rows (its ids, and the derived keys of its malformed messages)."""
        return sa.select(*columns).where(sa.or_(
            results.c.id.like(prefix + "%"), results.c.id.like(f"{MALFORMED_PREFIX}{prefix}%")))

    def rows(self, prefix: str) -> list[Any]:
        c = results.c
        with self.engine.connect() as conn:
            return list(conn.execute(self._run_rows(prefix, c.id, c.model, c.status, c.error,
                                                    c.latest, c.attempts)))

    def stored(self, prefix: str) -> set[str]:
        """The run's rows: ``<id>`` for a default model's, ``<id>@second`` for the second's."""
        with self.engine.connect() as conn:
            return {f"{i}@{SECOND}" if m == SECOND else i for i, m in conn.execute(
                self._run_rows(prefix, results.c.id, results.c.model))}

    def close(self) -> None:
        self.engine.dispose()
        if self.proxy is not None:
            self.proxy.down()


def broker_state(client: redis.Redis, lanes: list[str]) -> dict[str, int]:
    return {"queued": sum(int(client.llen(q)) for q in lanes),
            "unacked": int(client.hlen("unacked")),
            "unacked_index": int(client.zcard("unacked_index"))}


def redis_keys(client: redis.Redis) -> tuple[dict[str, int], dict[str, int]]:
    """The keys left, by family: those that never expire (outside kombu's structural
    ones), and those that expire (delivery counts, heartbeats: gone after their TTL)."""
    never: Counter[str] = Counter()
    expiring: Counter[str] = Counter()
    for key in client.scan_iter(count=1000):
        name = key.decode(errors="replace")
        family = ":".join(name.split(":")[:2]) if name.startswith("bertstream:") else name
        if client.ttl(key) != -1:
            expiring[family] += 1
        elif not any(name.startswith(s) for s in STRUCTURAL):
            never[family] += 1
    return dict(never), dict(expiring)


class Chaos:
    """One run: set up, stream with faults, drain, check."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seed = args.seed if args.seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.t0 = time.monotonic()
        self.faults: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}
        self.lossy_at: float | None = None

    def say(self, line: str) -> None:
        if not self.args.quiet:
            print(f"[{now_s(self.t0):7.1f}] {line}", flush=True)

    def fault(self, kind: str, detail: str) -> None:
        self.faults.append({"t": now_s(self.t0), "kind": kind, "detail": detail})
        self.say(f"fault {kind}: {detail}")

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})

    def kinds(self) -> list[str]:
        wanted = [k.strip() for k in self.args.faults.split(",") if k.strip()]
        unknown = set(wanted) - {"kill", "term", "freeze", "redis", "db"}
        if unknown:
            raise SystemExit(f"unknown fault kinds: {sorted(unknown)}")
        return wanted

    def inject(self, kind: str, fleet: Fleet, server: RedisServer, db: Database) -> None:
        rng = self.rng
        if kind == "kill":
            self.fault("kill -9 worker", fleet.kill9(rng))
        elif kind == "term":
            self.fault("SIGTERM worker", fleet.term_one(rng))
        elif kind == "freeze":
            # past the visibility timeout at times: its messages then go to another worker
            # while it still holds them
            seconds = rng.uniform(2.0, 1.5 * self.args.visibility_timeout)
            self.fault("SIGSTOP worker", fleet.freeze_one(rng, seconds))
        elif kind in ("redis", "redis-lossy"):
            lossy = kind == "redis-lossy"
            hard = lossy or rng.random() < 0.5
            down = rng.uniform(0.5, 4.0)
            if lossy:
                # the workers paused meanwhile, so that messages wait in the queue to be lost
                fleet.fill()
                fleet.freeze(list(fleet.live), 3.0,
                             during=lambda: server.stop(kill=True, lose_data=True))
                self.lossy_at = time.monotonic()
            else:
                server.stop(kill=hard)
            time.sleep(down)
            server.start()
            self.fault("redis restart" + (" losing its data" if lossy else ""),
                       f"{'SIGKILL' if hard else 'SIGTERM'}, down {down:.1f} s")
        elif kind == "db":
            if db.pg and rng.random() < 0.5:
                self.fault("pg sessions terminated", db.terminate_backends())
            elif db.pg:
                self.fault("pg connections cut", db.cut(rng.uniform(2.0, 8.0)))
            else:
                self.fault("sqlite locked", db.lock(rng.uniform(2.0, 8.0)))

    def run(self) -> dict[str, Any]:
        a = self.args
        kinds = self.kinds()
        workdir = Path(a.workdir or tempfile.mkdtemp(prefix="bertstream-chaos-"))
        workdir.mkdir(parents=True, exist_ok=True)
        prefix = f"chaos-{uuid.uuid4().hex[:8]}-"
        self.say(f"seed {self.seed}; workdir {workdir}; ids {prefix}*")
        model = a.model
        if model == "tiny":
            from worker.tinybert import write_tiny_bert

            model = str(write_tiny_bert(workdir / "tiny-bert"))
        with ExitStack() as stack:
            rdir = workdir / "redis"
            rdir.mkdir(exist_ok=True)
            server = RedisServer(rdir)
            stack.callback(server.stop)
            db = Database(a.database_url or f"sqlite:///{workdir / 'chaos.db'}")
            stack.callback(db.close)
            settings = Settings.from_env().replace(
                broker_url=server.url, database_url=db.worker_url,
                queue=f"chaos_{uuid.uuid4().hex[:8]}", model=model, max_wait_ms=a.max_wait_ms,
                torch_threads=1, visibility_timeout_s=a.visibility_timeout,
                cache_dir=str(workdir / "cache"))
            store = ResultStore.from_url(db.url)
            try:
                store.create_schema()
            finally:
                store.close()
            groups = [(settings, a.workers)]
            second = settings.replace(model_name=SECOND) if a.second_model else None
            if second is not None:
                groups.append((second, 1))
            fleet = Fleet(groups, workdir, a.stop_timeout, self.t0)
            stack.callback(fleet.close)
            fleet.fill()
            fleet.wait_ready(180)
            self.say(f"{a.workers} workers ready; producing {a.texts} texts over "
                     f"{a.duration:.0f} s")
            producer = Producer(settings.replace(database_url=db.url), prefix, a.texts,
                                a.duration, a.chunk, a.bad_every, self.seed,
                                second.replace(database_url=db.url) if second else None)
            stack.callback(producer.stop_event.set)
            t_start = time.monotonic()
            producer.start()
            next_fault = time.monotonic() + self.rng.uniform(*a.fault_interval)
            # each kind once first, in an order drawn from the seed, so that a short run
            # has them all (past --duration if need be); then at random
            first = self.rng.sample(kinds, len(kinds))
            while time.monotonic() - t_start < a.duration or not producer.sent.done or first:
                fleet.fill()
                elapsed = time.monotonic() - t_start
                if elapsed >= a.duration and not first:
                    time.sleep(0.1)  # the faults are over; the producer is finishing
                    continue
                if a.lossy_restart and self.lossy_at is None and elapsed > a.duration / 2:
                    self.inject("redis-lossy", fleet, server, db)
                elif kinds and time.monotonic() >= next_fault:
                    self.inject(first.pop(0) if first else self.rng.choice(kinds),
                                fleet, server, db)
                    next_fault = time.monotonic() + self.rng.uniform(*a.fault_interval)
                time.sleep(0.1)
            producer.join()
            produced_s = time.monotonic() - t_start
            self.say(f"faults over; producer sent {len(producer.sent.kinds)} ids in "
                     f"{producer.sent.messages} messages in {produced_s:.1f} s; draining")
            fleet.fill()
            admin = redis.Redis.from_url(server.url)
            stack.callback(admin.close)
            lanes = [lane_queue(s, bulk) for s, _ in groups for bulk in (True, False)]
            lost, drain_s = self.drain(db, admin, lanes, fleet, producer, prefix)
            if self.lossy_at is not None:
                lossy_at = self.lossy_at
                lost_early = [i for i in lost if producer.sent.at[i.split("@")[0]] <= lossy_at]
                self.check("losses only from the lossy restart", len(lost_early) == len(lost),
                           f"{len(lost)} ids without a row were reported by the producer; "
                           f"{len(lost) - len(lost_early)} of them sent after the restart")
                self.figures["lost_reported_then_resent"] = len(lost)
            if lost and self.lossy_at is not None:
                producer.resend(sorted(lost))
                self.say(f"sent the {len(lost)} lost ids again")
                lost_again, more_s = self.drain(db, admin, lanes, fleet, producer, prefix)
                drain_s += more_s
                lost = lost_again
            total_s = time.monotonic() - t_start
            state = broker_state(admin, lanes)
            stops = fleet.stop_all()
            after_stop = broker_state(admin, lanes)
            no_ttl, expiring = redis_keys(admin)
            self.figures["redis_keys_expiring"] = expiring
            undeliverable = sum(int(admin.llen(q + ".undeliverable")) for q in lanes)
            self.checks_on(db, producer, prefix, lost, state, after_stop, stops, fleet,
                           no_ttl, undeliverable)
            sent = len(producer.sent.kinds)
            self.figures.update(
                seed=self.seed, texts=sent, messages=producer.sent.messages,
                bad_items=sum(k != "ok" for k in producer.sent.kinds.values()),
                bad_messages=len(producer.sent.bad_messages), workers=a.workers,
                second_model_ids=len(producer.sent.both),
                workers_started=len(fleet.all), refused_starts=fleet.refused_starts,
                sigterm_while_starting=fleet.term_while_starting,
                database=db.sa_url.get_backend_name(), produce_s=round(produced_s, 1),
                drain_s=round(drain_s, 1), total_s=round(total_s, 1),
                stored_per_s=round(sent / total_s, 1) if total_s else None,
                publish_retries=dict(producer.sent.publish_errors),
                sigterm_exit_s_max=round(max(fleet.stops), 2) if fleet.stops else None,
                faults=dict(Counter(f["kind"] for f in self.faults)))
        ok = all(c["ok"] for c in self.checks)
        if ok and a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            self.figures["workdir"] = str(workdir)
        return {"ok": ok, "figures": self.figures, "checks": self.checks,
                "faults": self.faults}

    def drain(self, db: Database, admin: redis.Redis, lanes: list[str], fleet: Fleet,
              producer: Producer, prefix: str) -> tuple[set[str], float]:
        """Wait until every sent id has a row and the broker is idle (nothing queued or
        unacked); gives the ids still without a row when the broker has stayed idle for
        ``--idle`` seconds (or ``--drain-timeout`` passed)."""
        start = time.monotonic()
        idle_since: float | None = None
        while True:
            fleet.fill()
            missing = producer.expected() - db.stored(prefix)
            try:
                state = broker_state(admin, lanes)
            except redis.RedisError:
                state = {"queued": -1}
            busy = any(state.values())
            idle_since = None if busy else (idle_since or time.monotonic())
            if not missing and idle_since is not None \
                    and time.monotonic() - idle_since >= self.args.settle:
                # every row there, and nothing queued or unacked (a message a killed worker
                # had committed but not acked comes back after the visibility timeout)
                return set(), time.monotonic() - start
            if idle_since is not None and time.monotonic() - idle_since > self.args.idle:
                self.say(f"{len(missing)} ids without a row, the broker idle for "
                         f"{self.args.idle:.0f} s")
                return missing, time.monotonic() - start
            if time.monotonic() - start > self.args.drain_timeout:
                self.say(f"{len(missing)} ids without a row after {self.args.drain_timeout:.0f}"
                         f" s of draining ({state})")
                return missing, time.monotonic() - start
            time.sleep(0.5)

    def checks_on(self, db: Database, producer: Producer, prefix: str, lost: set[str],
                  state: dict[str, int], after_stop: dict[str, int],
                  stops: list[tuple[float, int | None]], fleet: Fleet,
                  no_ttl: dict[str, int], undeliverable: int) -> None:
        sent = producer.sent
        rows = db.rows(prefix)
        by_id: dict[str, list[Any]] = {}
        for r in rows:
            by_id.setdefault(r.id, []).append(r)
        self.check("producer ran to the end", sent.error is None and
                   len(sent.kinds) == self.args.texts, sent.error or f"{len(sent.kinds)} ids")
        self.check("no task lost", not lost,
                   f"{len(lost)} ids without a row" + (f", e.g. {sorted(lost)[:5]}" if lost
                                                       else ""))
        # one row per (id, model) by the table's key: a second row of an id is the second
        # model's, and only ids sent to both may have one
        dup = {i: len(rs) for i, rs in by_id.items()
               if len(rs) > (2 if i in sent.both else 1)}
        latest_bad = {i: sum(bool(r.latest) for r in rs) for i, rs in by_id.items()
                      if sum(bool(r.latest) for r in rs) != 1}
        self.check("one row per id and model, exactly one flagged latest",
                   not dup and not latest_bad,
                   f"{len(rows)} rows for {len(by_id)} ids ({len(sent.both)} sent to two "
                   f"models); {len(dup)} ids with more rows than models, "
                   f"{len(latest_bad)} without exactly one latest"
                   + (f", e.g. {list(latest_bad.items())[:3]}" if latest_bad else ""))
        expected = set(sent.kinds) | set(sent.bad_messages)
        extra = sorted(set(by_id) - expected)
        self.check("no unexpected rows", not extra,
                   f"{len(extra)} rows for ids never sent" + (f", e.g. {extra[:5]}" if extra
                                                              else ""))
        healthy_failed: Counter[str] = Counter()
        dead_lettered = 0
        for i, kind in sent.kinds.items():
            for r in by_id.get(i, []) if kind == "ok" else []:
                if r.status == "done":
                    continue
                if r.status == "failed" and "dead-lettered" in (r.error or ""):
                    dead_lettered += 1
                else:
                    healthy_failed[f"{r.status}: {(r.error or '')[:80]}"] += 1
        self.check("healthy items done (or dead-lettered with the reason)",
                   not healthy_failed, f"{dead_lettered} dead-lettered after repeated kills; "
                   f"other failures: {dict(healthy_failed)}")
        self.figures["healthy_dead_lettered"] = dead_lettered
        wrong: list[str] = []
        for i, kind in sent.kinds.items():
            for r in by_id.get(i, []) if kind != "ok" else []:
                if r.status != "failed" or BAD_KINDS[kind][2] not in (r.error or ""):
                    wrong.append(f"{i} ({kind}, {r.model}): {r.status} "
                                 f"{(r.error or '')[:80]!r}")
        for key in sent.bad_messages:
            r = by_id.get(key, [None])[0]
            if r is not None and (r.status != "failed" or not r.error):
                wrong.append(f"{key}: {r.status} {r.error!r}")
        self.check("bad items failed alone with their reason", not wrong,
                   f"{sum(k != 'ok' for k in sent.kinds.values())} bad items, "
                   f"{len(sent.bad_messages)} bad messages; wrong: {wrong[:5]}")
        attempts = Counter(int(r.attempts) for r in rows)
        self.figures["attempts"] = {str(k): v for k, v in sorted(attempts.items())}
        self.check("nothing queued or unacked", not any(state.values())
                   and not any(after_stop.values()),
                   f"drained: {state}; after the workers stopped: {after_stop}")
        slow = [s for s in stops if s[1] is None] + fleet.stuck
        bad_codes = [c for _, c in stops if c not in (0, None)]
        self.check(f"every SIGTERM ended its worker within {self.args.stop_timeout:g} s",
                   not fleet.stuck and not bad_codes,
                   f"{len(fleet.stops)} SIGTERMs, slowest exit "
                   f"{max(fleet.stops, default=0):.1f} s; stuck: {len(slow)}; "
                   f"exit codes other than 0: {bad_codes}")
        marks = fleet.logs_crash_marks()
        self.check("no worker crashed", not fleet.crashes and not marks,
                   f"{len(fleet.crashes)} died unasked"
                   + (f" (first: code {fleet.crashes[0]['code']}, log:\n"
                      f"{fleet.crashes[0]['log']})" if fleet.crashes else "")
                   + f"; crash lines in logs: {marks[:5]}")
        self.check("no Redis key without a TTL beyond kombu's", not no_ttl and not undeliverable,
                   f"families without a TTL: {no_ttl}; undeliverable messages: {undeliverable}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.chaos",
                                description=__doc__.split("\n")[0],
                                epilog="Exit 0 when every check passes, 1 otherwise.")
    p.add_argument("--duration", type=float, default=120.0,
                   help="seconds of producing under faults (default 120)")
    p.add_argument("--texts", type=int, default=30_000, help="texts to send (default 30000)")
    p.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    p.add_argument("--seed", type=int, default=None,
                   help="the faults' and texts' random seed (default: drawn and printed)")
    p.add_argument("--database-url", default=None,
                   help="results database (default: a temporary SQLite file); PostgreSQL is "
                        "reached through a proxy the run can cut; its backends on that "
                        "database are terminated now and then (only the workers' sessions)")
    p.add_argument("--model", default="null",
                   help="'null' (no model, default), 'tiny' (a small random BERT) or a "
                        "model directory")
    p.add_argument("--faults", default="kill,term,redis,db",
                   help="fault kinds to draw from (default kill,term,redis,db; '' for none)")
    p.add_argument("--fault-interval", type=float, nargs=2, default=(3.0, 12.0),
                   metavar=("MIN", "MAX"), help="seconds between faults (default 3 12)")
    p.add_argument("--lossy-restart", action="store_true",
                   help="one Redis restart (at half the duration) loses its data: the lost "
                        "ids must be reported by the producer, then they are sent again")
    p.add_argument("--second-model", action="store_true",
                   help=f"one more worker serving the same model as '{SECOND}'; every fourth "
                        "message goes to both models (two rows per id, one flagged latest)")
    p.add_argument("--chunk", type=int, default=50, help="items per message (default 50)")
    p.add_argument("--bad-every", type=int, default=500,
                   help="one bad item in this many (default 500; 0: none)")
    p.add_argument("--visibility-timeout", type=int, default=20,
                   help="the workers' visibility timeout, s (default 20)")
    p.add_argument("--max-wait-ms", type=int, default=50, help="the workers' max wait")
    p.add_argument("--stop-timeout", type=float, default=30.0,
                   help="seconds a SIGTERMed worker may take to exit (default 30)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds to wait for the last rows (default 300)")
    p.add_argument("--idle", type=float, default=30.0,
                   help="seconds of an idle broker with rows missing that end the wait")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds the broker must stay idle, every row stored, to end the wait")
    p.add_argument("--workdir", default=None,
                   help="logs and Redis data (default: a temporary dir, removed on success)")
    p.add_argument("--out", default=None, help="write faults, checks and figures as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    chaos = Chaos(args)
    try:
        result = chaos.run()
    except KeyboardInterrupt:
        return 130
    for c in result["checks"]:
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}")
    print(json.dumps(result["figures"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
