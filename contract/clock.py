"""The Redis server's clock: the one clock every host of a deployment shares.

Producers, API servers and workers run on hosts whose clocks drift apart. Where a
time written on one host is compared on another (worker heartbeats, kombu's
visibility timeout, a task's deadline), both sides read the server's ``TIME``
instead of their own clock, and the times stored in result rows are stamped on
it. :func:`server_time` is one round trip; :class:`ServerClock` keeps this host's
offset to the server and refreshes it every few seconds, for a path that reads the
time often (a worker's flushes, a producer's messages).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis

from contract.errors import BrokerUnavailable

log = logging.getLogger(__name__)

#: Seconds a :class:`ServerClock` offset is used before it is read again.
OFFSET_REFRESH_S = 5.0
#: Seconds between two warnings of a :class:`ServerClock` that cannot read the server.
WARN_EVERY_S = 60.0
#: Seconds this host's clock may move against its monotonic clock between two reads
#: before a :class:`ServerClock` takes it for a step and reads the server again (NTP
#: slewing moves it by milliseconds over a refresh).
STEP_S = 0.5


def server_time(client: Any) -> float:
    """The Redis server's clock, in UNIX seconds: the one clock every host shares."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def _offset(read: Callable[[], float]) -> float:
    """Seconds to add to this host's clock (``time.time``) to read the one ``read`` gives
    (one ``TIME``), taken against the middle of the round trip."""
    before = time.time()
    server = read()
    return server - (before + time.time()) / 2


class ServerClock:
    """The server's clock as this host's clock plus an offset refreshed every
    :data:`OFFSET_REFRESH_S` seconds, so a caller reading it per flush or per message pays
    one ``TIME`` per refresh, not per read.

    The server is read with ``client``'s ``TIME``, or by ``read`` (one ``TIME``, giving the
    server's time in UNIX seconds: a producer's client reads through its own error
    handling). Neither (a ``memory://`` broker: one process, one clock): the local
    clock. A step of this host's clock (its time moved against the monotonic clock, an
    NTP step) reads the server again at once: the old offset would carry the step.

    When the server cannot be read (a Redis error, :class:`BrokerUnavailable`), the last
    offset stays in use (none yet: the local clock) and the next try waits for the next
    refresh; a warning is logged at most once a minute. Other errors propagate (a closed
    client, a URL Redis refuses). Thread-safe: a read of the server holds the other
    readers back, which would otherwise stamp the offset it replaces.
    """

    def __init__(self, client: redis.Redis | None = None,
                 refresh_s: float = OFFSET_REFRESH_S, *,
                 read: Callable[[], float] | None = None) -> None:
        if read is None and client is not None:
            read = partial(server_time, client)
        self._read = read
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._offset = 0.0
        #: monotonic time of the last try (None: never tried)
        self._tried_at: float | None = None
        #: this host's clock less the monotonic clock at the last try: a step moves it
        self._wall_less_mono = 0.0
        self._warned_at = float("-inf")

    @property
    def offset(self) -> float:
        """The offset in use (seconds the server is ahead of this host)."""
        return self._offset

    def now(self) -> float:
        """The server's time, in UNIX seconds (refreshing the offset when due). This
        host's clock is read after the offset, so a slow read of the server (or a wait for
        another thread's) does not make the time returned that much late."""
        offset = self.current_offset()
        return time.time() + offset

    def current_offset(self) -> float:
        """Seconds to add to this host's clock to read the server's, now (refreshing the
        offset when due): for a caller that moves times already read off this host's
        clock onto the server's."""
        if self._read is None:
            return 0.0
        with self._lock:
            mono = time.monotonic()
            wall = time.time()
            if (self._tried_at is None or mono - self._tried_at >= self._refresh_s
                    or abs(wall - mono - self._wall_less_mono) > STEP_S):
                self._refresh(mono, wall)
            return self._offset

    def _refresh(self, mono: float, wall: float) -> None:
        """Read the offset again (under the lock)."""
        self._tried_at = mono
        self._wall_less_mono = wall - mono
        assert self._read is not None
        try:
            self._offset = _offset(self._read)
        except (redis.RedisError, BrokerUnavailable) as exc:
            if mono - self._warned_at >= WARN_EVERY_S:
                self._warned_at = mono
                # Redis out of reach: whatever uses it next meets the same outage and says
                # so (a CLI's error line, a worker's reconnects), so this is a note. Redis
                # answering but refusing TIME (an ACL) lasts until fixed: a warning.
                gone = isinstance(exc, (BrokerUnavailable, redis.ConnectionError,
                                        redis.TimeoutError))
                log.log(logging.INFO if gone else logging.WARNING,
                        "cannot read the Redis server's clock: task deadlines and row "
                        "times keep this host's clock%s: %s",
                        "" if self._offset == 0.0 else " and the last offset to it", exc)
        finally:
            # The next refresh counts from the end of this try: a read that took longer
            # than the interval (a stalled server, its socket timeout) is not due again
            # for each thread that waited for the lock meanwhile.
            self._tried_at = time.monotonic()
