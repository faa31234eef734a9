""":meth:`ServerClock.now` is the server's time when it returns, also when reading the
server's clock took a while (a slow ``TIME``, one timing out while Redis is away) or the
call waited for another thread's read: a deadline compared with it, and a row's
``started_at``, are not set back by that wait."""

from __future__ import annotations

import threading
import time

from contract.clock import ServerClock

#: How long the fake server read takes: far beyond the tolerance below.
READ_S = 0.6


def _slow_read() -> float:
    """A server whose clock is this host's, answering in :data:`READ_S` (its time taken in
    the middle of the round trip, as the offset assumes)."""
    time.sleep(READ_S / 2)
    now = time.time()
    time.sleep(READ_S / 2)
    return now


def test_now_is_read_after_a_slow_server_read() -> None:
    clock = ServerClock(read=_slow_read)
    got = clock.now()
    assert abs(time.time() - got) < READ_S / 3


def test_now_is_read_after_waiting_for_another_threads_read() -> None:
    clock = ServerClock(read=_slow_read, refresh_s=0.0)
    reading = threading.Thread(target=clock.now)
    reading.start()
    time.sleep(READ_S / 6)  # the other thread holds the clock's lock, reading the server
    got = clock.now()
    reading.join()
    assert abs(time.time() - got) < READ_S / 3
