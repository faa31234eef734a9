"""Redis URLs that tests derive from the test Redis's own URL."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis


def past_the_last_database(redis_url: str) -> str:
    """The test Redis's URL with a database index one past its last: a server that answers
    but refuses the index, for the checks that read it as a setting to fix, not an outage."""
    client = redis.Redis.from_url(redis_url)
    try:
        databases = client.config_get("databases")["databases"]
    finally:
        client.close()
    assert databases is not None, "the test Redis gave no `databases` setting"
    parts = urlsplit(redis_url)
    return f"{parts.scheme}://{parts.netloc}/{int(databases)}"
