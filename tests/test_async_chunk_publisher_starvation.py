"""An AsyncClient's chunk publishers hold a producer of the client's pool for their whole
block, but no thread. Calls that wait for a producer (a submit, another publisher's
start) wait in the client's threads: as many of them as it has threads, while every
producer is held by an open publisher, took every thread, and the open publishers' own
calls (an add, the end of the block that gives the producer back) then waited for a
thread for ever: the application hung.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from contract.messages import make_item
from contract.settings import Settings
from producer import AsyncClient
from producer.aclient import MAX_THREADS
from tests.producer_helpers import broker_settings


@pytest.fixture
def rsettings(redis_url: str, sqlite_url: str) -> Settings:
    return broker_settings(redis_url, sqlite_url)


def test_open_publishers_go_on_while_every_thread_waits_for_a_producer(
        rsettings: Settings) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncClient(rsettings) as client:
            limit = client.sync.app.conf.broker_pool_limit
            publishers = []
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(limit):  # every producer of the pool held
                    publishers.append(await stack.enter_async_context(client.chunk_publisher()))
                # as many submits as there are threads, each waiting for a producer
                waiting = [asyncio.create_task(client.submit_many([f"queued {n}"]))
                           for n in range(MAX_THREADS)]
                await asyncio.sleep(0.3)
                assert not any(w.done() for w in waiting)
                try:
                    # an open publisher still adds, and its block ends (its producer back)
                    await asyncio.wait_for(
                        publishers[0].add(make_item("added", rsettings)), timeout=10)
                    await asyncio.wait_for(stack.aclose(), timeout=10)
                finally:
                    # unstick the threads whatever happened: the producers go back
                    for publisher in publishers:
                        with contextlib.suppress(Exception):
                            publisher._manager.__exit__(None, None, None)
                done = await asyncio.wait_for(asyncio.gather(*waiting), timeout=10)
            return len(done), publishers[0].published

    assert asyncio.run(main()) == (MAX_THREADS, 1)
