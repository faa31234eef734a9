"""The Redis server's clock: the one clock every host of a deployment shares.

Producers, API servers and workers run on hosts whose clocks drift apart. Where a
time written on one host is compared on another (worker heartbeats, kombu's
visibility timeout, a task's deadline), both sides read the server's ``TIME``
instead of their own clock. :func:`server_time` is one round trip;
:class:`ServerClock` keeps this host's offset to the server and refreshes it
every few seconds, for a path that reads the time often (a worker's flushes).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

log = logging.getLogger(__name__)

#: Seconds a :class:`ServerClock` offset is used before it is read again.
OFFSET_REFRESH_S = 5.0
#: Seconds between two warnings of a :class:`ServerClock` that cannot read the server.
WARN_EVERY_S = 60.0


def server_time(client: Any) -> float:
    """The Redis server's clock, in UNIX seconds: the one clock every host shares."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def server_offset(client: Any) -> float:
    """Seconds to add to this host's clock (``time.time``) to read the server's: one
    ``TIME``, taken against the middle of the round trip."""
    before = time.time()
    server = server_time(client)
    return server - (before + time.time()) / 2


class ServerClock:
    """The server's clock as this host's clock plus an offset refreshed every
    :data:`OFFSET_REFRESH_S` seconds, so a caller reading it per flush pays one ``TIME``
    per refresh, not per read.

    ``client`` None (a ``memory://`` broker: one process, one clock) reads the local
    clock. When the server cannot be read, the last offset stays in use (none yet: the
    local clock) and the next try waits for the next refresh; a warning is logged at
    most once a minute. Not thread-safe: one per thread that reads it.
    """

    def __init__(self, client: redis.Redis | None, refresh_s: float = OFFSET_REFRESH_S) -> None:
        self._client = client
        self._refresh_s = refresh_s
        self._offset = 0.0
        #: monotonic time of the last try (None: never tried)
        self._tried_at: float | None = None
        self._warned_at = float("-inf")

    @property
    def offset(self) -> float:
        """The offset in use (seconds the server is ahead of this host)."""
        return self._offset

    def now(self) -> float:
        """The server's time, in UNIX seconds (refreshing the offset when due)."""
        mono = time.monotonic()
        if self._client is not None and (self._tried_at is None
                                         or mono - self._tried_at >= self._refresh_s):
            self._tried_at = mono
            try:
                self._offset = server_offset(self._client)
            except redis.RedisError as exc:
                if mono - self._warned_at >= WARN_EVERY_S:
                    self._warned_at = mono
                    log.warning("cannot read the Redis server's clock (task deadlines are "
                                "compared with this host's clock%s): %s",
                                "" if self._offset == 0.0 else " and the last offset", exc)
        return time.time() + self._offset
