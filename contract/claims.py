"""Dropping the HTTP API's id claims (``api/submit.py`` writes them).

One script serves both who drop claims: a worker once it has stored the rows
(``worker/claims.py``), and the API when a claim it just made is not needed
(a stored row answered the submit, or nothing was published). On a Redis
that refuses scripts both drop them with :func:`drop_claims_in_transaction`.
"""

from __future__ import annotations

from typing import Any

import redis

from contract.broker import watched
from contract.constants import ACCEPTED_ANY_KEY_PREFIX

#: ``DEL <claim prefix><id>`` for each id, and the pointer ``<any prefix><id>`` (written
#: for reads without a model by a named model's claim) while it names this model's
#: family. ARGV: the claim prefix, the pointer prefix, the family, the ids NUL-separated
#: in one argument (ids never hold NUL). Standalone Redis: the keys are not declared up
#: front, as a cluster needs.
DROP_CLAIMS = """
local claim, any, family = ARGV[1], ARGV[2], ARGV[3]
for id in string.gmatch(ARGV[4], "[^%z]+") do
  redis.call('DEL', claim .. id)
  if redis.call('GET', any .. id) == family then
    redis.call('DEL', any .. id)
  end
end
return {}
"""


def accepted_any_prefix(queue: str) -> str:
    """The prefix of the pointers ``<prefix><id>`` to the named model family a task of
    ``queue`` was last accepted for (a status asked without a model reads them)."""
    return f"{ACCEPTED_ANY_KEY_PREFIX}{queue}:"


def drop_claims_args(claim_prefix: str, any_prefix: str, family: str,
                     task_ids: list[str]) -> list[str]:
    """The arguments of :data:`DROP_CLAIMS` (and of :func:`drop_claims_in_transaction`)."""
    return [claim_prefix, any_prefix, family, "\0".join(task_ids)]


def drop_claims_in_transaction(client: redis.Redis, args: list[str]) -> list[Any]:
    """What :data:`DROP_CLAIMS` does, with the same arguments, in a WATCH/MULTI transaction
    (:func:`contract.broker.watched`) for a Redis that refuses scripts: the pointers are
    dropped only if they named this family as the transaction read them. Raises
    :class:`redis.WatchError` when the pointers kept changing."""
    prefix, any_prefix, family, ids = args
    # the script's "[^%z]+": no empty id (an empty list joins to "")
    task_ids = [i for i in dict.fromkeys(ids.split("\0")) if i]
    if not task_ids:
        return []
    pointers = [any_prefix + task_id for task_id in task_ids]

    def drop(pipe: Any, held: list[Any]) -> list[Any]:
        pipe.delete(*[prefix + task_id for task_id in task_ids])
        mine = [k for k, v in zip(pointers, held, strict=True) if v == family.encode()]
        if mine:
            pipe.delete(*mine)
        return []

    return watched(client, pointers, drop)
