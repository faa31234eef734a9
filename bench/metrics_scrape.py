"""What one scrape of the API's ``/metrics`` costs as kombu's bindings pile up.

    python -m bench.metrics_scrape [--families 10,1000,20000] [--repeat 7]
                                   [--broker redis://127.0.0.1:6379/8]
                                   [--no-before] [--other-keys 0]

kombu never removes a binding, so every model family ever published to stays in
the queue's binding set with its queues empty. For each count, binds that many
families of a fresh queue (both lanes, as a producer's publish does) and puts one
message in one of them, then times the API's queue collector (the whole
``bertstream_*`` queue and worker part of a scrape) and counts its Redis round
trips (one write of one command or a pipeline, then its replies), its commands,
the bytes it sent and its longest round trip (about the longest Redis spent on
one of its commands). Beside it, the same scrape reading every bound family's
lane lengths in one pipeline (what the collector did before). ``--other-keys``
stores that many keys like the API's id claims first (the heartbeat readers
once SCANned the whole database; they read an index now). Runs against the given Redis database (default: db 8, the
benchmarks' own), which it empties before and after.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
from kombu.transport.redis import Channel as RedisChannel
from prometheus_client import CollectorRegistry, generate_latest

from api.metrics import (
    MAX_EXAMINED_QUEUES,
    ApiMetrics,
    bound_families,
    family_depths,
    shown_depths,
)
from contract.broker import lane_keys
from contract.constants import ACCEPTED_KEY_PREFIX, LANE_BULK, LANE_INTERACTIVE, queue_name
from contract.liveness import family_workers
from contract.settings import Settings

LANES = (LANE_INTERACTIVE, LANE_BULK)


class Tally:
    """Round trips, commands and bytes sent by the connections of one pool, and the
    longest wait from a write to its last reply."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.trips = self.commands = self.sent = 0
        self.longest = self._at = 0.0


#: The commands a new connection sends before the caller's own (its handshake), told
#: apart by name.
HANDSHAKE = frozenset({b"HELLO", b"CLIENT", b"SELECT", b"AUTH"})


def _name(chunk: bytes | str | memoryview) -> bytes:
    """The command name at the head of a packed command (``*N\r\n$L\r\nNAME\r\n...``)."""
    raw = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
    return raw.split(b"\r\n")[2].upper()


def counting_client(url: str, tally: Tally, *, handshake: bool = True) -> redis.Redis:
    """A client on ``url`` whose connections count into ``tally``; with ``handshake``
    false, a new connection's :data:`HANDSHAKE` commands and their replies are left out
    (what the caller's own commands cost, however many connections they open)."""

    class Counting(redis.Connection):
        unread = 0  # replies still to come to handshake commands left out

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            chunks = [command] if isinstance(command, (bytes, str, memoryview)) else command
            if not handshake and _name(chunks[0]) in HANDSHAKE:
                self.unread += 1
            else:
                tally.trips += 1
                tally._at = time.perf_counter()
                tally.sent += sum(len(c) for c in chunks)
            super().send_packed_command(command, check_health)

        def disconnect(self, *args: Any, **kwargs: Any) -> None:
            self.unread = 0  # a handshake cut short: its replies never come
            super().disconnect(*args, **kwargs)

        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            if self.unread:
                self.unread -= 1
                return super().read_response(*args, **kwargs)
            tally.commands += 1
            try:
                return super().read_response(*args, **kwargs)
            finally:
                tally.longest = max(tally.longest, time.perf_counter() - tally._at)

    pool = redis.ConnectionPool.from_url(url, connection_class=Counting)
    return redis.Redis(connection_pool=pool)


def bind(client: redis.Redis, queue: str, families: list[str]) -> None:
    """Bind both lanes of each of ``families`` to ``queue``'s exchange as kombu does."""
    key = RedisChannel.keyprefix_queue % (queue,)
    members = [RedisChannel.sep.join([name, "", name])
               for family in families for name in (queue_name(family, lane) for lane in LANES)]
    for at in range(0, len(members), 10_000):
        client.sadd(key, *members[at:at + 10_000])


class EveryFamily:
    """The scrape as it was: every bound family's lane lengths read in one pipeline."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client, self.settings = client, settings

    def collect(self) -> None:
        own, queue = self.settings.family, self.settings.queue
        served = {own, *(w["family"] for w in family_workers(self.client, queue))}
        shown_depths(family_depths(self.client, served | bound_families(self.client, queue)),
                     served)


def claims(client: redis.Redis, count: int) -> None:
    """Store ``count`` keys like the API's id claims (a hash under a TTL)."""
    with client.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.set(f"{ACCEPTED_KEY_PREFIX}bench:{i:012d}", "0" * 64, ex=3600)
            if i % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()


def measure(scrape: Callable[[], Any], tally: Tally, repeat: int) -> dict[str, float]:
    """Median seconds of ``repeat`` scrapes, and the round trips, commands and bytes of
    the last."""
    took = []
    for _ in range(repeat):
        tally.reset()
        t0 = time.perf_counter()
        scrape()
        took.append(time.perf_counter() - t0)
    return {"ms": statistics.median(took) * 1000, "trips": tally.trips,
            "commands": tally.commands, "sent": tally.sent, "longest": tally.longest * 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default="10,1000,20000",
                        help="counts of stale families, comma-separated")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/8")
    parser.add_argument("--no-before", action="store_true",
                        help="time only the scrape as it is (every-family reads take long)")
    parser.add_argument("--other-keys", type=int, default=0,
                        help="also store this many id claims (the API's, one per item "
                             "accepted) in the database")
    args = parser.parse_args()
    tally = Tally()
    client = counting_client(args.broker, tally)
    client.flushdb()
    claims(client, args.other_keys)
    rows: list[tuple[int, str, dict[str, float], tuple[float | None, int] | None]] = []
    try:
        for count in (int(c) for c in args.families.split(",")):
            queue = f"bench-scrape-{uuid.uuid4().hex[:8]}"
            settings = Settings(broker_url=args.broker, queue=queue)
            bind(client, queue, [queue] + [f"{queue}-m{i}" for i in range(count)])
            waiting = f"{queue}-m{count // 2}"
            client.rpush(lane_keys(queue_name(waiting, LANE_BULK))[0], "x")
            metrics = ApiMetrics()
            metrics.watch(client, settings)
            registry: CollectorRegistry = metrics.registry
            found = 1  # scrapes until the walk went past that family's binding
            while f'family="{waiting}",lane="bulk"}} 1.0' not in generate_latest(
                    registry).decode():
                found += 1
                assert found <= 2 * count // MAX_EXAMINED_QUEUES + 2, "never reported"
            unexamined = registry.get_sample_value("bertstream_bound_queues_unexamined")
            rows.append((count, "now", measure(partial(generate_latest, registry), tally,
                                                args.repeat), (unexamined, found)))
            if not args.no_before:
                old = EveryFamily(client, settings)
                rows.append((count, "every family read", measure(old.collect, tally,
                                                                  args.repeat), None))
    finally:
        client.flushdb()
        client.close()
    print(f"median of {args.repeat} scrapes; one family of each count holds a message;"
          f" {args.other_keys:,} other keys")
    print("| stale families | scrape | ms | longest round trip ms | round trips | commands |"
          " bytes sent | unexamined | scrapes to find |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for count, how, m, walk in rows:
        left, scrapes = ("", "") if walk is None else (f"{walk[0]:,.0f}", str(walk[1]))
        print(f"| {count:,} | {how} | {m['ms']:.2f} | {m['longest']:.2f} | {m['trips']} |"
              f" {m['commands']:,} | {m['sent']:,} | {left} | {scrapes} |")


if __name__ == "__main__":
    main()
