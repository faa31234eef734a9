"""Dropping the HTTP API's id claims once a task's row is stored.

The API claims each id it accepts in Redis (``api/submit.py``): the claim
answers a resubmit ("duplicate" or "conflict") and a status read ("queued")
until the row exists. Once the row is committed the row answers both, so
the claim is only memory: kept for its whole TTL (a week by default), the
claims of a busy API filled Redis (about 260 bytes per task). After each
commit the worker drops the claims of the ids it stored, always after the
commit, so that a reader that misses the claim finds the row.

A claim is dropped only for this worker's model (its queue family); the
pointer a named model's claim leaves for reads without a model is dropped
only while it still points at this model. One script per commit; on a
Redis that refuses scripts, one WATCH/MULTI transaction that does the same.
A failure is a warning: the keys expire on their own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis

from contract.broker import ScriptSwitch, redis_client
from contract.claims import (
    DROP_CLAIMS,
    accepted_any_prefix,
    drop_claims_args,
    drop_claims_in_transaction,
)
from contract.constants import ACCEPTED_KEY_PREFIX
from contract.settings import Settings

log = logging.getLogger(__name__)


class ClaimDropper:
    """Drops the API's id claims of stored tasks for one model (nothing on memory://)."""

    def __init__(self, settings: Settings) -> None:
        self._redis: redis.Redis | None = redis_client(settings)
        self._claim_prefix = f"{ACCEPTED_KEY_PREFIX}{settings.family}:"
        self._any_prefix = accepted_any_prefix(settings.queue)
        self._family = settings.family
        self._script = self._redis.register_script(DROP_CLAIMS) if self._redis is not None else None
        self._scripts = ScriptSwitch(log, "the API's id claims of stored tasks are dropped "
                                     "with WATCH/MULTI transactions from here on")

    @property
    def scripted(self) -> bool:
        """False once Redis refused the script (the claims are then dropped in
        transactions)."""
        return self._scripts.scripted

    def drop(self, task_ids: Iterable[str]) -> None:
        """Drop the claims of ``task_ids`` (rows committed). Never raises."""
        ids = list({i for i in task_ids if isinstance(i, str) and i and "\0" not in i})
        if self._redis is None or not ids:
            return
        try:
            self._drop(ids)
        except Exception as exc:  # noqa: BLE001 - a clean-up: the claims expire on their own
            log.warning("could not drop the API's id claims of %d stored task(s) (they "
                        "expire on their own): %s", len(ids), exc)

    def _drop(self, ids: list[str]) -> None:
        client, script = self._redis, self._script
        assert client is not None and script is not None
        args = drop_claims_args(self._claim_prefix, self._any_prefix, self._family, ids)
        self._scripts.run(lambda: script(args=args),
                          lambda: drop_claims_in_transaction(client, args))

    def close(self) -> None:
        """Release the Redis connection."""
        if self._redis is not None:
            self._redis.close()
