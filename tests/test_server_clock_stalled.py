"""A :class:`ServerClock` whose server stalls (connected, but no answer: a network cut
after connect, a server busy in a long script) reads it once per refresh, not once per
waiting thread.

A read then takes its socket timeout, which may be longer than the refresh interval
(10 s against 5 s by default). The interval was counted from the start of the read, so
each thread that had waited for the lock found the offset due again and read the server
again, holding the others back: the n-th publish of a busy producer waited n timeouts.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from contract.clock import ServerClock, server_time

#: The stalled server's socket timeout, and the refresh interval, shorter than it.
TIMEOUT_S = 1.0
REFRESH_S = 0.5
THREADS = 4


@pytest.fixture
def stalled() -> Iterator[redis.Redis]:
    """A Redis client on a server that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    client = redis.Redis(port=listener.getsockname()[1], socket_timeout=TIMEOUT_S,
                         socket_connect_timeout=TIMEOUT_S, retry=Retry(NoBackoff(), 0))
    yield client
    client.close()
    stop.set()
    acceptor.join()
    listener.close()
    for conn in held:
        conn.close()


def test_threads_waiting_for_a_stalled_read_do_not_read_again(stalled: redis.Redis) -> None:
    reads: list[int] = []

    def read() -> float:
        reads.append(1)
        return server_time(stalled)

    clock = ServerClock(read=read, refresh_s=REFRESH_S)
    start = threading.Barrier(THREADS)

    def publish() -> None:
        start.wait()
        clock.current_offset()

    threads = [threading.Thread(target=publish) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(reads) == 1
    assert clock.offset == 0.0  # none read: this host's clock
