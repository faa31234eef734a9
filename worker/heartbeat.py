"""The worker's heartbeat: a daemon thread refreshing its liveness key and that key's
place in its queues' indexes (contract.liveness)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from contract.broker import redis_client, redis_full
from contract.clock import server_time
from contract.errors import ConfigError
from contract.liveness import HEARTBEAT_EVERY_S, announce, withdraw, worker_key
from contract.settings import Settings, mask_url

log = logging.getLogger(__name__)


def node_name(spec: str) -> str:
    """``worker --hostname`` as Celery expands it: ``NAME@HOST``, ``%h`` (this host),
    ``%n`` (its first label) and ``%d`` (its domain) filled in; a bare ``HOST`` is
    ``celery@HOST``. The heartbeat, the rows and Celery's node name all use this."""
    from celery.utils.nodenames import default_nodename, host_format

    return str(host_format(default_nodename(spec)))


class Heartbeat:
    """Refreshes ``worker_key(queue, hostname)`` and its index members every few seconds
    until :meth:`stop` (:func:`contract.liveness.announce`: the Redis server's clock, then
    one transaction).

    The key's value holds the worker's pid, ``started_at`` and ``facts``; ``started_at`` is
    on the Redis server's clock (see :meth:`_value`), as the ``now`` readers list it with.
    A Redis outage is logged once and retried; the key is deleted on a clean stop.
    The client has the broker's timeouts and health checks (``redis_*`` settings).
    ``on_beat`` is told after each beat whether it reached Redis (the worker's
    ``bertstream_worker_up``); it must not raise.
    Raises :class:`ConfigError` for a broker that is not Redis (``memory://``).
    """

    def __init__(self, settings: Settings, hostname: str, facts: dict[str, Any],
                 on_beat: Callable[[bool], None] | None = None) -> None:
        self.family, self.hostname = settings.family, hostname
        self.key = worker_key(settings.family, hostname)
        self._pid, self._facts = os.getpid(), dict(facts)
        self._made_at = time.monotonic()
        self._on_beat = on_beat
        #: the key's value, built at the first beat that reaches Redis (:meth:`_value`)
        self.value: str | None = None
        client = redis_client(settings)
        if client is None:
            raise ConfigError(f"the heartbeat needs a Redis broker, not "
                              f"{mask_url(settings.broker_url)!r}")
        self.client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bertstream-heartbeat",
                                        daemon=True)

    def start(self) -> Heartbeat:
        """Write the key now and keep it fresh from a daemon thread."""
        self._thread.start()
        return self

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                announce(self.client, self.family, self.hostname, self._value())
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    what = ("Redis is full (maxmemory) and refuses it" if redis_full(exc)
                            else "cannot reach Redis")
                    log.warning("heartbeat: %s (%s); retrying", what, exc)
                failing = True
            if self._on_beat is not None:
                self._on_beat(not failing)
            self._stop.wait(HEARTBEAT_EVERY_S)

    def _value(self) -> str:
        """The key's value. ``started_at`` is when this heartbeat was made on the Redis
        server's clock (its ``TIME`` at the first beat that reaches it, less the monotonic
        seconds since), not on this host's: ``/v1/live`` lists it next to the server's
        ``now``, and their difference is the worker's uptime only on one clock."""
        if self.value is None:
            started = server_time(self.client) - (time.monotonic() - self._made_at)
            self.value = json.dumps({"pid": self._pid, "started_at": started,
                                     **self._facts})
        return self.value

    def stop(self) -> None:
        """Stop refreshing and remove the key and its index members (a stopped worker is
        not alive)."""
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_EVERY_S + 1)
        if self._on_beat is not None:
            self._on_beat(False)
        try:
            withdraw(self.client, self.family, self.hostname)
        except redis.RedisError:
            pass  # it expires by itself
        self.client.close()
