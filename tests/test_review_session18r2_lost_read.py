"""A Redis Stream read whose reply was lost is made good by this reader, not left pending.

A read (``XREADGROUP ... >``) that Redis carried out but whose reply never came (the
connection broke in between: a restart, a failover) left its entries pending on this
consumer, unknown to it; the read was tried again for the next entries. They waited
for a claim scan, and with ``--claim-idle 0`` (no claims) they were never sent in the
run, which ended with ``--idle-exit`` as if all were done. After a read that had to
be tried again, the reader reads its own pending entries it does not hold and sends
them. The lost reply is the one fault here that cannot be caused at will.
"""

from __future__ import annotations

from typing import Any

import redis

from producer.redis_stream import RedisStreamSource


class _ReplyLostOnce(redis.Redis):
    """Carries out the first read of new entries that finds some, then loses its reply."""

    lost = False

    def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
        reply = super().xreadgroup(*args, **kwargs)
        if reply and not self.lost and ">" in args[2].values():
            self.lost = True
            raise redis.ConnectionError("Connection closed by server.")
        return reply


def test_entries_of_a_read_whose_reply_was_lost_are_sent_in_the_run(redis_url: str) -> None:
    r = _ReplyLostOnce.from_url(redis_url)
    key = "bst-18r2-lost:posts"
    try:
        r.delete(key)
        reader = RedisStreamSource(r, key, "g", "c1", claim_idle_s=None, idle_exit_s=0.5,
                                   block_ms=100, retry_max_s=0.05)
        reader.ensure_group()
        added = [r.xadd(key, {"text": f"t{i}"}).decode() for i in range(3)]
        try:
            got = [rec.ref for rec in reader.records()]
            assert r.lost
            assert got == added
            reader.ack([ref for ref in got if ref is not None])
        finally:
            reader.close()
        assert int(r.xpending(key, "g")["pending"]) == 0
    finally:
        r.delete(key)
        r.close()
