"""Two fixes to kombu's Redis transport that halve the broker cost per message.

Profiling the worker draining single-text messages (bench/README.md, "Where
the time goes") showed most of its time in kombu's Redis transport, not in
Celery or bertstream:

1. ``Channel.conn_or_acquire()`` builds a new ``redis.Redis`` client object
   for every publish, every receive bookkeeping step and every ack. With
   redis-py 6+ a client's constructor copies ~200 response callbacks into a
   case-insensitive dict: ~0.17 ms, twice per message. Here a channel keeps
   one client per connection pool (clients are thread-safe; connections
   still come from the pool per command, as before).
2. ``QoS.ack()`` runs one MULTI/EXEC round trip per message to drop it from
   the unacked index. :func:`deferred_acks` lets the worker ack a whole flush
   and send those removals in one pipeline. Acks still happen only after the
   commit; a crash between the bookkeeping and the pipeline leaves entries
   that kombu redelivers after the visibility timeout, which the results
   store absorbs (a done row is final), so the at-least-once guarantee is
   unchanged.

:func:`install` applies both, once, only when kombu's internals look as
expected (otherwise kombu is left alone and a debug line says why).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_INSTALLED = False
_DEFERRED = "_bertstream_deferred_acks"


def install() -> bool:
    """Patch kombu's Redis Channel and QoS (idempotent); True when patched."""
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        from kombu.transport import redis as kredis
        from kombu.transport import virtual
    except ImportError as exc:  # redis extra missing: nothing to speed up
        log.debug("kombu redis speed-ups not installed: %s", exc)
        return False
    channel, qos = kredis.Channel, kredis.QoS
    needed = [(channel, "_create_client"), (channel, "conn_or_acquire"),
              (qos, "ack"), (qos, "_remove_from_indices"), (virtual.QoS, "ack")]
    missing = [f"{cls.__name__}.{name}" for cls, name in needed if not hasattr(cls, name)]
    if missing:
        log.debug("kombu redis speed-ups not installed: kombu lacks %s", missing)
        return False

    original_ack = qos.ack

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_bertstream_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, self._create_client())
            self.__dict__["_bertstream_client"] = cached
        yield cached[1]

    def ack(self: Any, delivery_tag: Any) -> None:
        pending = self.__dict__.get(_DEFERRED)
        if pending is None:
            original_ack(self, delivery_tag)
            return
        pending.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # in-process bookkeeping only

    channel.conn_or_acquire = conn_or_acquire  # type: ignore[method-assign]
    qos.ack = ack  # type: ignore[method-assign]
    _INSTALLED = True
    return True


@contextmanager
def deferred_acks(channels: list[Any]) -> Iterator[None]:
    """Within the block, acks on these channels' Redis QoS are sent in one pipeline at exit.

    Channels of other transports (memory://) are left as they are. The
    pipeline runs even when the block raises, for the acks made before.
    """
    qoses = []
    for ch in {id(c): c for c in channels if c is not None}.values():
        qos = getattr(ch, "qos", None)
        if qos is not None and hasattr(qos, "_remove_from_indices") and _INSTALLED:
            qos.__dict__[_DEFERRED] = []
            qoses.append(qos)
    try:
        yield
    finally:
        for qos in qoses:
            tags = qos.__dict__.pop(_DEFERRED, [])
            if not tags:
                continue
            with qos.channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                for tag in tags:
                    qos._remove_from_indices(tag, pipe)
                pipe.execute()
