"""Dropping the HTTP API's id claims (``api/submit.py`` writes them).

One script serves both who drop claims: a worker once it has stored the rows
(``worker/claims.py``), and the API when a claim it just made is not needed
(a stored row answered the submit, or nothing was published).
"""

from __future__ import annotations

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
