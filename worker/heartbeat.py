"""The worker's heartbeat: a daemon thread refreshing its liveness key and that key's
place in its queues' indexes (contract.liveness)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import redis

from contract.broker import redis_client
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

    A Redis outage is logged once and retried; the key is deleted on a clean stop.
    The client has the broker's timeouts and health checks (``redis_*`` settings).
    Raises :class:`ConfigError` for a broker that is not Redis (``memory://``).
    """

    def __init__(self, settings: Settings, hostname: str, facts: dict[str, Any]) -> None:
        self.family, self.hostname = settings.family, hostname
        self.key = worker_key(settings.family, hostname)
        self.value = json.dumps({"pid": os.getpid(), "started_at": time.time(), **facts})
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
                announce(self.client, self.family, self.hostname, self.value)
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("heartbeat: cannot reach Redis (%s); retrying", exc)
                failing = True
            self._stop.wait(HEARTBEAT_EVERY_S)

    def stop(self) -> None:
        """Stop refreshing and remove the key and its index members (a stopped worker is
        not alive)."""
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_EVERY_S + 1)
        try:
            withdraw(self.client, self.family, self.hostname)
        except redis.RedisError:
            pass  # it expires by itself
        self.client.close()
