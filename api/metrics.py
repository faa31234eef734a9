"""The API's Prometheus metrics: requests, submitted items, coalescing, queue depth, workers.

One registry per app (tests build several). Queue depth per lane (of this
server's queue family, and of every family of its queue) and live workers are
read from Redis when Prometheus scrapes, not polled; whether that read worked
is ``bertstream_redis_up``, and whether a failed read was Redis refusing the broker URL
(a setting, not an outage) is ``bertstream_broker_misconfigured``. That read runs in a
thread of its own, one at a time, and a scrape waits for it a couple of seconds at most
(:data:`REDIS_READ_WAIT_S`), so a Redis that does not answer (paused, partitioned) reads
as down instead of holding every scrape for the Redis socket timeout. Whether the results
database answers is ``bertstream_database_up``, from a ``SELECT 1`` at most every few
seconds that a scrape waits for only briefly (:class:`DatabaseProbe`). Depths are read
by a script run in Redis per chunk of kombu's bindings (:class:`BindingWalk`), never by
a command per family bound; a Redis that refuses scripts (an ACL user without
``+@scripting``, a server without Lua) gets the same walk from the client instead, a few
pipelined round trips per chunk.

Under ``serve --workers N`` the processes share their counts through
prometheus_client's multiprocess mode (:func:`multiprocess_dir`), so that any
process's ``/metrics`` gives the sum over all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import redis
from kombu.transport.redis import Channel as RedisChannel
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from contract.broker import ScriptSwitch, broker_error, lane_keys
from contract.constants import LANE_BULK, LANE_INTERACTIVE, MULTIPROC_ENV, queue_name
from contract.errors import BrokerMisconfigured, ConfigError
from contract.liveness import family_workers, is_family_of
from contract.results import ping
from contract.settings import Settings
from contract.sharedread import SharedRead

log = logging.getLogger(__name__)

LANES = (LANE_INTERACTIVE, LANE_BULK)

#: Queue families ``bertstream_family_queue_depth`` has a label for at most; the
#: shallowest of the rest are summed under ``other`` (clients may name made-up models).
MAX_DEPTH_FAMILIES = 100


def by_family(workers: list[dict[str, Any]]) -> dict[str, int]:
    """Live workers per queue family, in name order."""
    return dict(sorted(Tally(w["family"] for w in workers).items()))


def bound_families(client: redis.Redis, queue: str) -> set[str]:
    """The queue families of ``queue`` whose lanes kombu has bound: every family's lanes
    are bound to one exchange named after ``queue`` (:func:`contract.broker.make_celery`)
    by whoever declared them, a producer publishing or a worker consuming.

    kombu delivers a message only to a queue bound to its exchange, so every family with
    messages waiting is among them, whether or not a worker serves it; the set is read
    without walking the keyspace. Bindings outlive their queues: a family found here
    may be empty.
    """
    out = set()
    for member in client.smembers(RedisChannel.keyprefix_queue % (queue,)):
        text = member.decode("utf-8", "replace") if isinstance(member, bytes) else str(member)
        family, _, lane = text.rpartition(RedisChannel.sep)[2].rpartition(".")
        if lane in LANES and is_family_of(family, queue):
            out.add(family)
    return out


def family_depths(client: redis.Redis, families: Iterable[str]) -> dict[str, dict[str, int]]:
    """Messages waiting per lane of each of ``families``, read in one round trip."""
    lists = [(family, lane, lane_keys(queue_name(family, lane)))
             for family in sorted(set(families)) for lane in LANES]
    with client.pipeline(transaction=False) as pipe:
        for _, _, keys in lists:
            for key in keys:
                pipe.llen(key)
        sizes = iter(pipe.execute())
    out: dict[str, dict[str, int]] = {}
    for family, lane, keys in lists:
        out.setdefault(family, {})[lane] = sum(int(next(sizes)) for _ in keys)
    return out


#: Bound queues (lanes of families) one scrape reads at most; past it the walk over the
#: bindings goes on at the next scrape (``bertstream_bound_queues_unexamined``).
MAX_EXAMINED_QUEUES = 100_000
#: Bound queues one script run reads, so that Redis is never held long by one scrape.
EXAMINE_CHUNK = 1_000

#: Lua, one step of the walk over the binding set KEYS[1]: the messages waiting in each
#: queue named in ARGV from ARGV[6 + ARGV[5]] on (even when empty), then, unless ARGV[3]
#: is empty, SSCAN from cursor ARGV[3] (COUNT ARGV[4]) and the messages waiting in each
#: queue found there that is named ``<queue>.*`` or ``<queue>-*`` (ARGV[2]) and holds
#: any. A binding member ends with its queue after kombu's separator (ARGV[1]); a queue
#: is its list and one per priority step (the suffixes ARGV[6..5 + ARGV[5]]), and one
#: EXISTS tells an empty queue (Redis drops an empty list) from one to count. Gives the
#: next cursor, the members seen, the set's size and a flat list of (queue, count).
_WALK = """
local sep, queue, steps = ARGV[1], ARGV[2], tonumber(ARGV[5])
local suffix, keys = {}, {}
for i = 1, steps do suffix[i] = ARGV[5 + i] end
local function depth(name)
  keys[1] = name
  for i = 1, steps do keys[i + 1] = name .. suffix[i] end
  if redis.call('EXISTS', unpack(keys)) == 0 then return 0 end
  local n = 0
  for _, key in ipairs(keys) do n = n + redis.call('LLEN', key) end
  return n
end
local out = {}
for i = 6 + steps, #ARGV do
  out[#out + 1] = ARGV[i]
  out[#out + 1] = depth(ARGV[i])
end
if ARGV[3] == '' then
  return {'0', 0, redis.call('SCARD', KEYS[1]), out}
end
local page = redis.call('SSCAN', KEYS[1], ARGV[3], 'COUNT', ARGV[4])
local head = string.len(queue)
local last = '^.*' .. sep .. '(.*)$'
for _, member in ipairs(page[2]) do
  local name = string.match(member, last) or member
  local after = string.sub(name, head + 1, head + 1)
  if string.sub(name, 1, head) == queue and (after == '.' or after == '-') then
    local n = depth(name)
    if n > 0 then
      out[#out + 1] = name
      out[#out + 1] = n
    end
  end
end
return {page[1], #page[2], redis.call('SCARD', KEYS[1]), out}
"""


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def walk_step(client: redis.Redis, key: str, sep: str, queue: str, cursor: int | str,
              count: int, suffixes: list[str], names: list[str]) -> list[Any]:
    """:data:`_WALK`'s step done from the client, for a Redis that runs no script: the
    same reply from SSCAN, SCARD, then EXISTS per queue and LLEN only of the lists of
    the queues that exist (most bound queues are empty), each a pipelined round trip.
    Not atomic, which a gauge read at scrape time does not need."""
    walking = cursor != ""
    with client.pipeline(transaction=False) as pipe:
        if walking:
            pipe.sscan(key, int(cursor), count=count)
        pipe.scard(key)
        replies = pipe.execute()
    page = replies[0] if walking else (0, [])
    size = int(replies[-1])
    head, marker = _as_bytes(queue), _as_bytes(sep)
    found = []
    for member in page[1]:
        name = _as_bytes(member).rpartition(marker)[2]
        if name[:len(head)] == head and name[len(head):len(head) + 1] in (b".", b"-"):
            found.append(name)
    queues = [(_as_bytes(n), True) for n in names] + [(n, False) for n in found]
    ends = [_as_bytes(s) for s in suffixes]
    with client.pipeline(transaction=False) as pipe:
        for name, _ in queues:
            pipe.exists(name, *(name + end for end in ends))
        present = pipe.execute()
    held = [q for q, there in zip(queues, present, strict=True) if int(there)]
    with client.pipeline(transaction=False) as pipe:
        for name, _ in held:
            for lane_key in (name, *(name + end for end in ends)):
                pipe.llen(lane_key)
        lengths = iter(pipe.execute())
    depth = {name: sum(int(next(lengths)) for _ in range(len(ends) + 1)) for name, _ in held}
    out: list[Any] = []
    for name, always in queues:
        n = depth.get(name, 0)
        if always or n > 0:
            out += [name, n]
    return [page[0], len(page[1]), size, out]


class BindingWalk:
    """The depth of the families of ``queue`` that hold messages, found by walking
    kombu's bindings in Redis (:func:`bound_families`' set) a chunk per script run.

    Bindings are never removed, so the set only grows, mostly with empty families. Redis
    reads each bound queue and sends back only those holding messages: a scrape sends a
    command per chunk, never one per family. A scrape reads at most ``limit`` bound
    queues; past that the walk goes on where it stopped at the next scrape, and
    :attr:`unexamined` says how many this one did not get to. A family once found
    holding messages is read at every scrape until it is empty, so it never drops out
    for the walk's sake. The families read by name go a chunk per script run as well.
    The first time Redis refuses the script (:func:`contract.broker.refuses_scripts`) the walk says so
    in the log, once, and from then on does each step from the client
    (:func:`walk_step`), so that the depths stay reported. One walk per client (the
    API's collector holds one). Thread-safe (concurrent scrapes take turns).
    """

    def __init__(self, queue: str, *, limit: int | None = None,
                 chunk: int | None = None) -> None:
        self.queue = queue
        self.limit = MAX_EXAMINED_QUEUES if limit is None else limit
        self.chunk = EXAMINE_CHUNK if chunk is None else chunk
        self.bound = self.unexamined = 0
        self._cursor = 0
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self._scripts = ScriptSwitch(
            log, f"queue depths for the metrics are read from here on with plain commands "
            f"(SSCAN, EXISTS, LLEN), a few round trips per {self.chunk} bound queues instead "
            f"of one")

    @property
    def scripted(self) -> bool:
        """False once Redis refused the script: each step is then done from the client."""
        return self._scripts.scripted

    def _step(self, client: redis.Redis, script: Any, key: str, args: list[Any]) -> Any:
        """One step of the walk: the script, or :func:`walk_step` once Redis refused it."""
        steps = int(args[4])
        return self._scripts.run(
            lambda: script(keys=[key], args=args),
            lambda: walk_step(client, key, args[0], args[1], args[2], int(args[3]),
                              list(args[5:5 + steps]), list(args[5 + steps:])))

    def depths(self, client: redis.Redis, always: Iterable[str]) -> dict[str, dict[str, int]]:
        """Messages waiting per lane of each of ``always`` (even when empty), of each
        family found holding messages before, and of every other family with messages
        among the bound queues this step of the walk reads."""
        always = set(always)
        with self._lock:
            fixed = sorted(always | self._waiting)
            out: dict[str, dict[str, int]] = {f: dict.fromkeys(LANES, 0) for f in fixed}
            names = [queue_name(family, lane) for family in fixed for lane in LANES]
            suffixes = lane_keys("")[1:]
            script = client.register_script(_WALK) if self.scripted else None
            key = RedisChannel.keyprefix_queue % (self.queue,)
            start = cursor = self._cursor
            examined, walking = 0, True
            while True:
                batch, names = names[:self.chunk], names[self.chunk:]
                reply = self._step(client, script, key,
                                   [RedisChannel.sep, self.queue, cursor if walking else "",
                                    self.chunk, len(suffixes), *suffixes, *batch])
                self._count(out, reply[3])
                if walking:
                    cursor, examined = int(reply[0]), examined + int(reply[1])
                    walking = cursor != 0 and examined < self.limit
                if not walking and not names:
                    break
            self._cursor, self.bound = cursor, int(reply[2])
            whole = start == 0 and cursor == 0
            self.unexamined = 0 if whole else max(self.bound - examined, 0)
            self._waiting = {f for f, lanes in out.items()
                             if f not in always and any(lanes.values())}
        return out

    def _count(self, out: dict[str, dict[str, int]], pairs: list[Any]) -> None:
        for name, count in zip(pairs[::2], pairs[1::2], strict=True):
            text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            family, _, lane = text.rpartition(".")
            if lane in LANES and (family in out or is_family_of(family, self.queue)):
                out.setdefault(family, dict.fromkeys(LANES, 0))[lane] = int(count)


def shown_depths(depths: dict[str, dict[str, int]], always: Iterable[str],
                 limit: int = MAX_DEPTH_FAMILIES) -> dict[str, dict[str, int]]:
    """The families ``bertstream_family_queue_depth`` reports: those in ``always`` (this
    server's own, those with live workers) even when empty, and every other one with
    messages waiting (an empty family without workers is a leftover binding). Past
    ``limit`` families the shallowest are summed under ``other``, so that the total
    stays right."""
    total = {family: sum(lanes.values()) for family, lanes in depths.items()}
    keep = sorted(f for f in set(always) if f in depths)
    rest = sorted((f for f in depths if f not in keep and total[f]),
                  key=lambda f: (-total[f], f))
    room = max(limit - len(keep), 0)
    out = {f: depths[f] for f in keep + rest[:room]}
    if rest[room:]:
        out["other"] = {lane: sum(depths[f][lane] for f in rest[room:]) for lane in LANES}
    return out


def writer_pid(path: Path) -> int | None:
    """The process that writes the counts file ``path``, read from prometheus_client's
    naming of them (``<type>_<pid>.db``: not a documented interface, tested); None for a
    name not of that form."""
    tail = path.stem.rpartition("_")[2]
    return int(tail) if tail.isascii() and tail.isdigit() and int(tail) > 0 else None


def _running(pid: int, written: float | None = None) -> bool:
    """Whether process ``pid`` runs, other than this one (which writes no counts before
    its server processes start, so a file of its pid is a previous run's). A process of
    another pid namespace (another container) is not seen. ``written``: the file's mtime;
    a process started after it is another program given a dead writer's pid (the kernel
    reuses them), not its writer."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    started = _started_at(pid) if written is not None else None
    # A second's slack: the boot time this is counted from is read to the clock tick.
    return started is None or written is None or started <= written + 1


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started (Unix time), from Linux's ``/proc``; None elsewhere or
    when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # Field 22, starttime: clock ticks since boot, counted after the ")" of the name.
            ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def multiprocess_dir(workers: int) -> Iterator[Path | None]:
    """The directory the ``workers`` server processes share their counts in, set as
    ``PROMETHEUS_MULTIPROC_DIR`` for them to inherit; None for one process without it.

    The operator's ``PROMETHEUS_MULTIPROC_DIR`` is honoured (created when missing), else
    a fresh temporary directory is made. The ``*.db`` files of processes no longer
    running are removed first: a previous run's would add its old counts. Those of a
    running process are kept (a process sharing the directory, such as a worker of an
    earlier version given the same environment, still writes them), and said in the log.
    A directory made here is removed at exit. Files of this run's processes that end
    stay: their counts are part of the totals.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if not given and workers <= 1:
        yield None
        return
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="bertstream-metrics-"))
    made = not given or not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        kept = set()
        for counts in path.glob("*.db"):
            pid = writer_pid(counts)
            try:
                written = counts.stat().st_mtime
            except FileNotFoundError:  # removed meanwhile
                continue
            if pid is not None and _running(pid, written):
                kept.add(pid)
            else:
                counts.unlink(missing_ok=True)
        # each process writes its counts there: one that cannot failed every request
        tempfile.NamedTemporaryFile(dir=path, suffix=".probe").close()
    except OSError as exc:
        raise ConfigError(f"cannot use {MULTIPROC_ENV}={path} for the metrics of the "
                          f"server processes: {exc.strerror or exc}") from exc
    if kept:
        log.warning("%s=%s holds the counts of running processes (pids %s): "
                    "kept (each serve needs a directory of its own, a worker none)", MULTIPROC_ENV, path,
                    ", ".join(map(str, sorted(kept))))
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if given is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = given
        if made:
            shutil.rmtree(path, ignore_errors=True)


class _ApiCounts(Collector):
    """The API's counters and histograms summed over the files of every server process.

    Only its own families (``bertstream_api_*``): another process given the same
    ``PROMETHEUS_MULTIPROC_DIR`` (a worker of an earlier version, which kept its counts
    there too and served them itself) may write files there."""

    def __init__(self) -> None:
        self._all = MultiProcessCollector(None)

    def collect(self) -> Iterator[Any]:
        return (family for family in self._all.collect()
                if family.name.startswith("bertstream_api_"))


class ApiMetrics:
    """The counters and histograms the routes update; :attr:`registry` is what
    ``/metrics`` serves.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (``serve --workers N``) the counts go to files
    there and :attr:`registry` sums every process's (``MultiProcessCollector``); else
    they live in :attr:`registry` itself (one registry per app: tests build several).
    No gauge is kept in those files (the gauges are read from Redis at scrape time), so
    a process uvicorn replaces needs no ``mark_process_dead``: its counts stay summed.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        shared = bool(os.environ.get(MULTIPROC_ENV))
        if shared:
            # prometheus_client picks its value class once, when first imported (an
            # undocumented attribute, read only where it exists; tested).
            if getattr(values, "ValueClass", None) is getattr(values, "MutexValue", ""):
                raise RuntimeError(f"{MULTIPROC_ENV} was set after prometheus_client was "
                                   f"imported: this process's counts would not be shared")
            self.registry.register(_ApiCounts())
        own = None if shared else self.registry
        self.requests = Counter(
            "bertstream_api_requests", "HTTP requests by route and status code",
            ["route", "status"], registry=own)
        self.items = Counter(
            "bertstream_api_items", "Submitted items by lane and outcome "
            "(accepted, duplicate, conflict, invalid)", ["lane", "outcome"],
            registry=own)
        self.message_items = Histogram(
            "bertstream_api_message_items", "Items per broker message published (coalesced "
            "single submits and bulks) by lane", ["lane"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=own)
        self.latency = Histogram(
            "bertstream_api_request_seconds", "Request handling time by route", ["route"],
            registry=own)

    def published(self, lane: str, items: int) -> None:
        """One broker message of ``items`` items was published on ``lane``."""
        self.message_items.labels(lane).observe(items)

    def watch(self, redis_client: Any, settings: Settings,
              store_of: Callable[[], Any] | None = None) -> None:
        """Also report queue depth per lane and live workers, read at scrape time (by the
        process scraped, once: they are read from Redis, not summed over processes), and,
        given ``store_of`` (what gives the results store), whether the database answers
        (:class:`DatabaseProbe`)."""
        self.registry.register(_QueueCollector(redis_client, settings))
        if store_of is not None:
            self.registry.register(DatabaseProbe(store_of))


#: Seconds a scrape waits for the database probe it started (or found running); a probe
#: running longer (a silent database) reads as down, and the scrape answers meanwhile.
DATABASE_PROBE_WAIT_S = 2.0
#: Seconds a probe's answer serves the scrapes that follow it.
DATABASE_PROBE_EVERY_S = 5.0



class DatabaseProbe(Collector):
    """``bertstream_database_up``: 1 when the latest ``SELECT 1`` on the results store
    answered, 0 when it failed or has been running for over ``wait_s``.

    A scrape never runs a query of its own: it starts one (in a daemon thread, bounded by
    the store's connect and statement timeouts) only when none runs and the last answer
    is over ``every_s`` old, and waits for it ``wait_s`` at most, so a silent database
    costs a scrape ``wait_s``, never a connection per scrape nor a hung scrape. Schema
    and privileges are ``/readyz``'s checks, not this gauge's. Thread-safe."""

    def __init__(self, store_of: Callable[[], Any], *, wait_s: float = DATABASE_PROBE_WAIT_S,
                 every_s: float = DATABASE_PROBE_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store_of, self.wait_s, self.every_s, self.clock = store_of, wait_s, every_s, clock
        self._lock = threading.Lock()
        self._ok = False
        self._answered_at: float | None = None
        #: The probe running (its end) and when it started; None when none runs.
        self._running: threading.Event | None = None
        self._started = 0.0

    def up(self) -> bool:
        """The gauge's value now, after starting a probe when one is due."""
        with self._lock:
            now = self.clock()
            due = self._answered_at is None or now - self._answered_at >= self.every_s
            if self._running is None and due:
                self._running, self._started = threading.Event(), now
                threading.Thread(target=self._probe, args=(self._running,), daemon=True,
                                 name="bertstream-database-probe").start()
            running, started = self._running, self._started
        if running is not None:
            running.wait(max(self.wait_s - (self.clock() - started), 0.0))
        with self._lock:
            if self._running is not None and self.clock() - self._started >= self.wait_s:
                return False
            return self._ok

    def _probe(self, done: threading.Event) -> None:
        try:
            self.store_of().run(ping, "cannot reach the results database")
            ok = True
        except Exception:  # noqa: BLE001 - any failure reads as down
            ok = False
        with self._lock:
            self._ok, self._answered_at, self._running = ok, self.clock(), None
        done.set()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "bertstream_database_up", "1 when the results database answered this server's "
            "latest SELECT 1 (run at most every few seconds), 0 when it failed or has not "
            "answered within a scrape's short wait", value=int(self.up()))


#: Seconds a scrape waits for the Redis read of the queues and heartbeats
#: (:class:`_QueueCollector`) at most: well under Prometheus's default scrape timeout
#: (10 s), which a read hanging for the configured Redis socket timeout (10 s by default)
#: on a paused Redis used to reach, so that the whole scrape went missing.
REDIS_READ_WAIT_S = 2.0


class _QueueReading:
    """What one read of Redis gave the gauges: live workers, depths per family, and the
    binding walk's counts."""

    def __init__(self, alive: list[dict[str, Any]], depths: dict[str, dict[str, int]],
                 bound: int, unexamined: int) -> None:
        self.alive, self.depths, self.bound, self.unexamined = alive, depths, bound, unexamined


class _QueueCollector(Collector):
    """The gauges read from Redis at scrape time (:meth:`collect`).

    The read is a :class:`contract.sharedread.SharedRead`: it runs in a daemon thread,
    one at a time: a scrape while one is under way waits for that one rather than starting another, ``wait_s`` at most, so scrapes of a
    Redis that does not answer (SIGSTOP, ``DEBUG SLEEP``, a partition that leaves TCP
    open) neither pile up threads or connections nor outlast Prometheus's scrape timeout.
    The thread ends with the read, by the configured socket timeout per command at the
    latest. A read that did not answer in time reads as ``bertstream_redis_up`` 0, unless
    the read before it answered after its own scrape stopped waiting: that reading serves
    this scrape (once), so a Redis slower than ``wait_s`` that answers every read does not
    read as down at every scrape."""

    def __init__(self, redis_client: Any, settings: Settings, *,
                 wait_s: float = REDIS_READ_WAIT_S) -> None:
        self.redis, self.settings, self.wait_s = redis_client, settings, wait_s
        self.walk = BindingWalk(settings.queue)
        self._read: SharedRead[_QueueReading] = SharedRead(self._reading, wait_s,
                                                           "bertstream-redis-gauges")

    def _reading(self) -> _QueueReading:
        """Live workers, depths and the walk's counts, read from Redis (in
        :class:`SharedRead`'s thread)."""
        alive = family_workers(self.redis, self.settings.queue)
        served = {self.settings.family, *(w["family"] for w in alive)}
        depths = self.walk.depths(self.redis, served)
        return _QueueReading(alive, depths, self.walk.bound, self.walk.unexamined)

    def _misconfigured(self, error: Exception | None) -> bool:
        """Whether the read failed because Redis refused what the broker URL asks."""
        if error is None:
            return False
        try:
            return isinstance(broker_error(self.settings, error), BrokerMisconfigured)
        except Exception:  # noqa: BLE001 - down all the same
            log.debug("classifying a Redis read's failure failed", exc_info=True)
            return False

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Queue depth and live workers when Redis answers (no made-up 0 when it does not),
        and ``bertstream_redis_up`` always: an alert on no live workers goes quiet while
        Redis is down, so that outage needs its own signal; a Redis that has not answered
        within ``wait_s`` reads as down. ``bertstream_broker_misconfigured``
        always too: 1 when the read failed because Redis refused what the broker URL asks
        (:func:`contract.broker.broker_error`: a database index it lacks, credentials it
        does not take), so an alert can send a setting to fix apart from a server down.

        Queue depth per family covers this server's own family, every family with live
        workers and every family with messages waiting (:class:`BindingWalk`): tasks
        sent to a model no worker serves show up there."""
        _, reading, error = self._read.get()
        depth = GaugeMetricFamily("bertstream_queue_depth", "Messages waiting in Redis per "
                                  "lane of this server's queue family", labels=["lane"])
        per_family_depth = GaugeMetricFamily(
            "bertstream_family_queue_depth", "Messages waiting in Redis per queue family "
            "(<queue>, or <queue>-<name> for a named model) and lane: this server's own "
            "family and every family with live workers always, any other while it holds "
            "messages", labels=["family", "lane"])
        workers = GaugeMetricFamily("bertstream_workers_alive",
                                    "Workers of every model whose heartbeat has not expired")
        per_family = GaugeMetricFamily(
            "bertstream_family_workers_alive", "Workers whose heartbeat has not expired per "
            "queue family (<queue>, or <queue>-<name> for a named model; this server's own "
            "family always, 0 while it has none)", labels=["family"])
        bound = GaugeMetricFamily(
            "bertstream_bound_queues", "Queues bound in Redis to the exchange of this "
            "server's queue: two lanes per model family ever published to (kombu keeps a "
            "binding after its queue empties)")
        unexamined = GaugeMetricFamily(
            "bertstream_bound_queues_unexamined", "Bound queues this scrape did not read "
            "for bertstream_family_queue_depth: past a limit per scrape the rest are read "
            "by the next ones; a family seen holding messages is read at every scrape")
        own = self.settings.family
        if reading is not None:
            alive, depths = reading.alive, reading.depths
            served = {own, *(w["family"] for w in alive)}
            bound.add_metric([], reading.bound)
            unexamined.add_metric([], reading.unexamined)
            for lane in LANES:
                depth.add_metric([lane], depths[own][lane])
            for family, lanes in sorted(shown_depths(depths, served).items()):
                for lane in LANES:
                    per_family_depth.add_metric([family, lane], lanes[lane])
            workers.add_metric([], len(alive))
            counts = {own: 0, **by_family(alive)}
            for family, count in sorted(counts.items()):
                per_family.add_metric([family], count)
        up = int(reading is not None)
        misconfigured = int(self._misconfigured(error))
        yield GaugeMetricFamily("bertstream_redis_up", "1 when this scrape could read the "
                                "queues and worker heartbeats from Redis, else 0", value=up)
        yield GaugeMetricFamily(
            "bertstream_broker_misconfigured", "1 when this scrape's Redis read failed "
            "because Redis refused what the broker URL asks (a database index it lacks, "
            "credentials it does not take: a setting to fix, not an outage), else 0",
            value=misconfigured)
        if up:
            yield depth
            yield per_family_depth
            yield bound
            yield unexamined
            yield workers
            yield per_family
