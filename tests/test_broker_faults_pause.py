"""A Redis that takes connections but does not answer (``CLIENT PAUSE``, a long script,
an overloaded server), on a private redis-server paused for real.

The error said "cannot reach Redis ... start it with `redis-server`" of a server that
runs: an operator who followed it restarted a Redis that was only busy (without
persistence, its queue gone with it). Now it says that Redis did not answer in time,
and to retry; a refused connection keeps the hint to start it.
"""

from __future__ import annotations

import pytest
import redis

from bench.faults import RedisServer
from contract.errors import BrokerUnavailable, exit_code
from contract.settings import Settings
from producer.client import Client


def test_a_paused_redis_is_not_told_to_be_started(redis_server: RedisServer,
                                                   sqlite_url: str) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    settings = Settings(broker_url=redis_server.url, database_url=sqlite_url,
                        redis_socket_timeout_s=1, publish_retries=0)
    with Client(settings) as client:
        client.submit("warm up")  # connected before the pause
        # longer than the socket timeout; it ends on its own (an UNPAUSE waits for it)
        admin.execute_command("CLIENT", "PAUSE", "4000", "ALL")
        admin.close()
        with pytest.raises(BrokerUnavailable) as caught:
            client.submit("hello")
    message = str(caught.value)
    assert "start it with" not in message, message
    assert "did not answer" in message, message
    assert exit_code(caught.value) == 3
