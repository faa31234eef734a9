"""Counting deliveries, so a message that kills its worker cannot loop forever.

A message whose flush killed the worker (a segfault, the kernel's OOM
killer, kill -9) comes back after the visibility timeout. Each flush counts
the deliveries of its messages in Redis (one pipelined round trip). A
message seen before is processed alone, so a poison message takes no
batch-mates down with it again, and past ``max_attempts`` deliveries it is
dead-lettered: its items are stored as ``failed`` with the reason, and acked.

A delivery handed back by a warm shutdown (a message held for its long
text's windows) did not kill its worker: :meth:`DeliveryCounter.undo` takes
its count back, so rolling restarts never dead-letter it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import redis

from contract.broker import redis_client, watched
from contract.constants import DELIVERY_KEY_PREFIX
from contract.settings import Settings

#: Counters expire on their own, this long after the visibility timeout (a dead worker's
#: message comes back after it, then may wait in its queue): see :func:`counter_ttl`.
COUNTER_TTL_S = 86_400


def counter_ttl(settings: Settings) -> int:
    """Seconds a count lives after the delivery that set it: a day more than the visibility
    timeout, however long that is (with a fixed day, a timeout longer than a day brought a
    dead worker's message back uncounted, so a poison message was never dead-lettered)."""
    return COUNTER_TTL_S + settings.visibility_timeout_s


class DeliveryCounter:
    """Delivery counts per Celery message id, in Redis (or in memory for memory://)."""

    def __init__(self, settings: Settings) -> None:
        self._redis: redis.Redis | None = redis_client(settings)
        self._local: dict[str, int] = {}
        self._ttl = counter_ttl(settings)

    def incr(self, message_ids: Sequence[str]) -> list[int]:
        """Count one more delivery of each id; gives the new counts, in order."""
        if self._redis is None:
            out = []
            for mid in message_ids:
                self._local[mid] = self._local.get(mid, 0) + 1
                out.append(self._local[mid])
            return out
        pipe = self._redis.pipeline(transaction=False)
        for mid in message_ids:
            key = DELIVERY_KEY_PREFIX + mid
            pipe.incr(key)
            pipe.expire(key, self._ttl)
        replies = pipe.execute()
        return [int(n) for n in replies[::2]]

    def forget(self, message_ids: Sequence[str]) -> None:
        """Drop the counters of messages that are acked for good."""
        if self._redis is None:
            for mid in message_ids:
                self._local.pop(mid, None)
            return
        if message_ids:
            self._redis.delete(*[DELIVERY_KEY_PREFIX + mid for mid in message_ids])

    def undo(self, message_ids: Sequence[str]) -> None:
        """Take back one counted delivery per id (an id given twice, two): for deliveries
        whose flush ran to its end and that go back to the queue unacked (a warm shutdown),
        so they count as no death of their worker. A count that reaches zero is deleted, a
        missing one stays missing (never negative: a count of 0 or below would make the next
        delivery look like no first delivery at all), and each keeps its expiry.

        One atomic WATCH/MULTI transaction, no script: it works on a Redis that refuses
        scripts (an ACL user without ``+@scripting``, a server without Lua), where the
        worker runs with ``BERTSTREAM_ATOMIC_RECEIVE=false``. Raises
        :class:`redis.RedisError` when Redis fails, or :class:`redis.WatchError` when the
        counts kept changing through :data:`contract.broker.WATCH_TRIES` tries."""
        if self._redis is None:
            for mid in message_ids:
                n = self._local.get(mid, 0) - 1
                if n > 0:
                    self._local[mid] = n
                else:
                    self._local.pop(mid, None)
            return
        if not message_ids:
            return
        tally = Counter(DELIVERY_KEY_PREFIX + mid for mid in message_ids)
        keys = list(tally)

        def take_back(pipe: Any, counts: list[Any]) -> None:
            for key, held in zip(keys, counts, strict=True):
                if held is None:
                    continue
                if int(held) > tally[key]:
                    pipe.decrby(key, tally[key])  # keeps the key's expiry
                else:
                    pipe.delete(key)

        watched(self._redis, keys, take_back)

    def close(self) -> None:
        """Release the Redis connection."""
        if self._redis is not None:
            self._redis.close()
