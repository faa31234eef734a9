"""Soak: a worker (and optionally the HTTP API) under steady load, watched for growth.

Tasks go in chunks to a queue of the run's own, through the Python client or, with
``--api``, through ``bertstream serve`` (bulk submits, status reads and ``/v1/live``),
kept a few chunks ahead of the worker. Every ``--interval`` seconds it samples the
worker's (and the API's) resident memory and open file descriptors, the Redis
database's keys, the keys of them without a TTL, Redis's ``used_memory`` and, on
PostgreSQL, the connections to the results database. A deployment that runs for days
must show flat figures once warm: a count that climbs with the tasks is a leak.

At the end it waits for every task's row, takes a last sample, prints the table, lists
the key families left without a TTL, writes the JSON (``--out``) and removes the keys of
its queue (not with ``--keep-keys``). Nothing is flushed: keys of others in the same
Redis database count in the figures, so give it a database of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from contract.broker import lane_queue
from contract.settings import Settings
from producer.client import Client
from worker.process import ServeProc, WorkerProc

#: Chunks a producer keeps queued ahead of the worker (so memory is not the backlog's).
AHEAD_CHUNKS = 4


def proc_figures(pid: int | None) -> dict[str, int | None]:
    """Resident memory (KiB) and open file descriptors of process ``pid`` (None: gone)."""
    if pid is None:
        return {"rss_kib": None, "fds": None}
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss = next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), None)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {"rss_kib": None, "fds": None}
    return {"rss_kib": rss, "fds": fds}


def key_family(key: str) -> str:
    """The family of a Redis key: ``bertstream:<kind>`` for bertstream's own keys, the
    key with its queue replaced by ``<queue>`` for kombu's, else the key itself."""
    if key.startswith("bertstream:"):
        return ":".join(key.split(":")[:2])
    return key


def keys_without_ttl(client: redis.Redis) -> Counter[str]:
    """Key families of the database with keys that never expire, and how many keys each."""
    found: Counter[str] = Counter()
    batch: list[bytes] = []

    def check(keys: list[bytes]) -> None:
        with client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.ttl(k)
            for k, ttl in zip(keys, pipe.execute(), strict=True):
                if ttl == -1:
                    found[key_family(k.decode(errors="replace"))] += 1

    for key in client.scan_iter(count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            check(batch)
            batch = []
    if batch:
        check(batch)
    return found


def sqlite_path(database_url: str) -> str | None:
    """The file of an SQLite database URL (None: another database, or in memory)."""
    url = sa.engine.make_url(database_url)
    return url.database if url.get_backend_name() == "sqlite" and url.database else None


def file_kib(path: Path) -> int:
    """Size of ``path`` in KiB (0 when it does not exist): an SQLite write-ahead log that
    grows without bound means a reader never lets a checkpoint reset it."""
    try:
        return path.stat().st_size // 1024
    except FileNotFoundError:
        return 0


def pg_connections(engine: sa.Engine | None) -> int | None:
    """Connections to the results database other than this probe's (None: not PostgreSQL)."""
    if engine is None:
        return None
    with engine.connect() as conn:
        return int(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")).scalar_one())


class Sampler:
    """Takes the samples: the processes' figures, Redis's and PostgreSQL's."""

    def __init__(self, settings: Settings, redis_client: redis.Redis) -> None:
        self.redis = redis_client
        self.sqlite_file = sqlite_path(settings.database_url)
        self.engine = (sa.create_engine(settings.database_url, poolclass=sa.pool.NullPool)
                       if settings.database_url.startswith("postgresql") else None)
        self.t0 = time.monotonic()

    def sample(self, stored: int, submitted: int, pids: dict[str, int | None],
               *, no_ttl: bool = False) -> dict[str, Any]:
        row: dict[str, Any] = {"t_s": round(time.monotonic() - self.t0, 1),
                               "submitted": submitted, "stored": stored}
        for name, pid in pids.items():
            for k, v in proc_figures(pid).items():
                row[f"{name}_{k}"] = v
        row["redis_keys"] = int(self.redis.dbsize())
        row["redis_used_memory"] = int(self.redis.info("memory")["used_memory"])
        if no_ttl:
            row["redis_keys_no_ttl"] = sum(keys_without_ttl(self.redis).values())
        row["pg_connections"] = pg_connections(self.engine)
        if self.sqlite_file is not None:
            row["sqlite_wal_kib"] = file_kib(Path(f"{self.sqlite_file}-wal"))
        return row

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


class ApiLoad:
    """Submits and reads through ``bertstream serve``: bulk posts, a status read per
    chunk and ``/v1/live``, as a web app and a dashboard would."""

    def __init__(self, server: ServeProc) -> None:
        self.url = server.url

    def _call(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
        return data if raw else json.loads(data)

    def submit(self, texts: list[str], ids: list[str], source: str) -> None:
        answer = self._call("POST", "/v1/tasks", {
            "items": [{"text": t, "id": i} for t, i in zip(texts, ids, strict=True)],
            "source": source})
        if answer.get("errors"):
            raise RuntimeError(f"the API refused items: {answer['errors'][:3]}")
        self._call("GET", f"/v1/tasks/{ids[0]}")
        self._call("GET", "/v1/live")
        self._call("GET", "/readyz", raw=True)
        self._call("GET", "/metrics", raw=True)


def table(rows: list[dict[str, Any]]) -> str:
    """The samples as an aligned text table."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def remove_queue_keys(client: redis.Redis, queue: str) -> int:
    """Delete what the run left under its own queue: its lanes, kombu's bindings of it and
    the API's id claims and retry markers for it. Gives how many keys went."""
    patterns = [f"{queue}.*", f"{queue}-*", f"_kombu.binding*.{queue}",
                f"bertstream:*:{queue}:*", f"bertstream:*:{queue}-*"]
    gone = 0
    for pattern in patterns:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for at in range(0, len(keys), 1000):
            gone += int(client.delete(*keys[at:at + 1000]))
    return gone


class Soak:
    """One run's services, producer and samples (:func:`run` drives it)."""

    def __init__(self, args: argparse.Namespace, settings: Settings, workdir: Path) -> None:
        self.args, self.settings, self.workdir = args, settings, workdir
        self.source = f"soak-{uuid.uuid4().hex[:8]}"
        self.rows: list[dict[str, Any]] = []
        self.submitted = 0
        self.pids: dict[str, int | None] = {}
        self.api: ApiLoad | None = None

    def start(self, stack: ExitStack) -> None:
        """Start the worker (and the API), each stopped by ``stack``; open the probes."""
        self.admin = redis.Redis.from_url(self.settings.broker_url)
        stack.callback(self.admin.close)
        if not self.args.keep_keys:
            stack.callback(remove_queue_keys, self.admin, self.settings.queue)
        self.worker = WorkerProc(self.settings, self.workdir / "worker.log",
                                 args=("--device", "cpu"), name="soak")
        stack.callback(self.worker.stop)
        self.worker.wait_ready()
        self.pids["worker"] = self.worker.pid
        if self.args.api:
            server = ServeProc(self.settings, self.workdir / "serve.log")
            stack.callback(server.stop)
            server.wait_ready()
            self.api = ApiLoad(server)
            self.pids["api"] = server.proc.pid
        self.client = stack.enter_context(Client(self.settings))
        self.sampler = Sampler(self.settings, self.admin)
        stack.callback(self.sampler.close)

    def stored(self) -> int:
        return self.client.count(source=self.source)

    def take(self, final: bool = False) -> None:
        row = self.sampler.sample(self.stored(), self.submitted, self.pids, no_ttl=final)
        self.rows.append(row)
        if not self.args.quiet:
            print(json.dumps(row), file=sys.stderr, flush=True)

    def send(self) -> None:
        """One chunk, through the API or the client."""
        args, n = self.args, self.args.chunk
        if args.tasks:
            n = min(n, args.tasks - self.submitted)
        texts = [f"soak text {self.submitted + i} of a long run" for i in range(n)]
        if self.api is not None:
            ids = [f"{self.source}-{self.submitted + i}" for i in range(n)]
            self.api.submit(texts, ids, self.source)
        else:
            self.client.submit_many(texts, source=self.source, chunk_size=n)
        self.submitted += n

    def produce(self) -> float:
        """Send until ``--tasks`` or ``--duration``, a sample every ``--interval``; gives
        the seconds it sent for."""
        args = self.args
        lanes = [lane_queue(self.settings, bulk) for bulk in (True, False)]
        t0 = next_sample = time.monotonic()
        next_sample += args.interval
        while (args.tasks == 0 or self.submitted < args.tasks) \
                and time.monotonic() - t0 < args.duration:
            self.worker.check_alive()
            if sum(int(self.admin.llen(lane)) for lane in lanes) >= AHEAD_CHUNKS:
                time.sleep(0.01)  # the worker is behind: wait for it, do not pile up
            elif args.rate and self.submitted >= args.rate * (time.monotonic() - t0):
                time.sleep(0.01)  # pacing to --rate
            else:
                self.send()
            if time.monotonic() >= next_sample:
                self.take()
                next_sample += args.interval
        return time.monotonic() - t0

    def drain(self) -> None:
        """Wait until every task sent has its row."""
        deadline = time.monotonic() + self.args.drain_timeout
        while self.stored() < self.submitted:
            self.worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.stored()} of {self.submitted} tasks stored after "
                                   f"{self.args.drain_timeout:.0f} s of draining")
            time.sleep(0.2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One soak run; gives its figures (also printed and, with ``--out``, written)."""
    queue = args.queue or f"bertstream_soak_{uuid.uuid4().hex[:8]}"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bertstream-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model == "tiny":
        from worker.tinybert import write_tiny_bert

        model = str(write_tiny_bert(workdir / "tiny-bert"))
    database_url = args.database_url or f"sqlite:///{workdir / 'soak.db'}"
    settings = Settings.from_env().replace(
        broker_url=args.broker_url, database_url=database_url, queue=queue, model=model,
        max_wait_ms=args.max_wait_ms, torch_threads=args.threads)
    soak = Soak(args, settings, workdir)
    out: dict[str, Any] = {"queue": queue, "database": database_url.split("@")[-1],
                           "broker": args.broker_url.split("@")[-1], "model": args.model,
                           "via": "api" if args.api else "client", "samples": soak.rows}
    with ExitStack() as stack:
        soak.start(stack)
        soak.take()
        t0 = time.monotonic()
        run_s = soak.produce()
        soak.drain()
        drained_s = time.monotonic() - t0
        time.sleep(args.settle)  # acks, counters and heartbeats settle
        soak.take(final=True)
        out["no_ttl_families"] = dict(keys_without_ttl(soak.admin))
        out.update(tasks=soak.submitted, run_s=round(run_s, 1), drained_s=round(drained_s, 1),
                   tasks_per_s=round(soak.submitted / drained_s, 1) if drained_s else None,
                   start=soak.rows[0], end=soak.rows[-1])
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)  # its database and logs: kept on failure
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=0,
                   help="tasks to send (0: as many as --duration allows)")
    p.add_argument("--duration", type=float, default=600.0,
                   help="seconds to send for at most (default 600)")
    p.add_argument("--broker-url", default=os.environ.get("BERTSTREAM_BROKER_URL",
                                                          "redis://localhost:6379/0"),
                   help="Redis, a database of the run's own (default: BERTSTREAM_BROKER_URL)")
    p.add_argument("--database-url", default=None,
                   help="results database (default: a temporary SQLite file)")
    p.add_argument("--model", default="null",
                   help="worker model: 'null' (no model: the pipeline alone), 'tiny' (a small "
                        "random BERT) or a model directory")
    p.add_argument("--api", action="store_true",
                   help="send through `bertstream serve` (bulk posts, status and live reads)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="tasks per second to send at most (0: as fast as the worker takes them)")
    p.add_argument("--chunk", type=int, default=500, help="tasks per submit (default 500)")
    p.add_argument("--interval", type=float, default=30.0,
                   help="seconds between samples (default 30)")
    p.add_argument("--max-wait-ms", type=int, default=50, help="the worker's max wait")
    p.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    p.add_argument("--queue", default=None, help="queue (default: bertstream_soak_<hex>)")
    p.add_argument("--workdir", default=None, help="logs (and the default SQLite file)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds to wait for the last rows")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds between the last row and the last sample")
    p.add_argument("--keep-keys", action="store_true",
                   help="leave the run's queue keys in Redis")
    p.add_argument("--quiet", action="store_true", help="no sample lines on stderr")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run(args)
    print(table(result["samples"]))
    print(f"tasks {result['tasks']} in {result['drained_s']} s: {result['tasks_per_s']} "
          f"tasks/s; key families without a TTL at the end: {result['no_ttl_families']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
