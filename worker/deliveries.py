"""Counting deliveries, so a message that kills its worker cannot loop forever.

A message whose flush killed the worker (a segfault, the kernel's OOM
killer, kill -9) comes back after the visibility timeout. Each flush counts
the deliveries of its messages in Redis (one pipelined round trip). A
message seen before is processed alone, so a poison message takes no
batch-mates down with it again, and past ``max_attempts`` deliveries it is
dead-lettered: its items are stored as ``failed`` with the reason, and acked.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from contract.broker import redis_client
from contract.constants import DELIVERY_KEY_PREFIX
from contract.settings import Settings

#: Counters expire on their own; a day is longer than any redelivery chain.
COUNTER_TTL_S = 86_400


class DeliveryCounter:
    """Delivery counts per Celery message id, in Redis (or in memory for memory://)."""

    def __init__(self, settings: Settings) -> None:
        self._redis: redis.Redis | None = redis_client(settings)
        self._local: dict[str, int] = {}

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
            pipe.expire(key, COUNTER_TTL_S)
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

    def close(self) -> None:
        """Release the Redis connection."""
        if self._redis is not None:
            self._redis.close()
