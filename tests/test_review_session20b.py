"""Review of the quiet sources change: an open async source of AsyncClient.submit_many
(a websocket with nothing to say) and aclose(); a submit_many that takes a pooled
producer per message, and Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

from producer import AsyncClient, Client, ClientClosed
from tests.producer_helpers import broker_settings, lane_messages


def _source_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bertstream-source")]


def _until(check: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def test_aclose_ends_an_open_quiet_async_source(redis_url: str, sqlite_url: str) -> None:
    """aclose() while a quiet async source is open (its socket waits for the user): the
    call ends with ClientClosed at once, as every call in flight does, and its thread
    ends; it no longer waits for the source's next items. The post sent before stays
    queued."""
    settings = broker_settings(redis_url, sqlite_url)
    out: dict[str, Any] = {}

    async def main() -> None:
        quiet = asyncio.Event()

        async def socket() -> Any:
            yield {"text": "first post", "id": "q-0"}
            await quiet.wait()  # the user says nothing more
            yield {"text": "second post", "id": "q-1"}

        client = AsyncClient(settings)
        submitting = asyncio.create_task(client.submit_many(socket(), linger_s=0.05))
        out["sent"] = await asyncio.to_thread(
            _until, lambda: lane_messages(redis_url, f"{settings.queue}.bulk"), 5)
        await client.aclose()
        try:
            await asyncio.wait_for(asyncio.shield(submitting), 5)
            out["ended"] = "returned"
        except TimeoutError:
            out["ended"] = "still open 5 s after aclose()"
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["ended"] = exc
        out["left"] = await asyncio.to_thread(_until, lambda: not _source_threads(), 5)
        quiet.set()
        submitting.cancel()
        await asyncio.gather(submitting, return_exceptions=True)

    asyncio.run(main())
    assert out["sent"], "the first post was not sent (linger)"
    assert isinstance(out["ended"], ClientClosed), out["ended"]
    assert out["left"], "the source's thread outlived aclose()"
    queued = [it["id"] for m in lane_messages(redis_url, f"{settings.queue}.bulk")
              for it in m["items"]]
    assert queued == ["q-0"]


def test_ctrl_c_stops_a_submit_many_waiting_for_a_pooled_producer(
        redis_url: str, sqlite_url: str) -> None:
    """Every pooled producer held (open chunk publishers of other threads): a Ctrl-C of
    a submit_many waiting for one in the main thread stops it then, and its chunk is not
    sent afterwards; the wait for a producer is no publish to finish first."""
    settings = broker_settings(redis_url, sqlite_url)
    release = threading.Event()
    out: dict[str, Any] = {}
    with Client(settings) as client:
        limit = client.app.conf.broker_pool_limit
        held = threading.Barrier(limit + 1)

        def hold() -> None:
            with client.chunk_publisher():
                held.wait(10)
                release.wait(20)

        holders = [threading.Thread(target=hold, daemon=True) for _ in range(limit)]
        for holder in holders:
            holder.start()
        held.wait(10)
        interrupt = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        freed = threading.Timer(10, release.set)  # the producers come back at last
        interrupt.start()
        freed.start()
        try:
            try:
                client.submit_many(["after ctrl-c"])
                out["ended"] = "returned"
            except KeyboardInterrupt:
                out["ended"] = "interrupted"
            out["held"] = not release.is_set()
        finally:
            interrupt.join()
            release.set()
            freed.cancel()
            for holder in holders:
                holder.join(10)
    assert out["ended"] == "interrupted"
    assert out["held"], "Ctrl-C was held until a producer came back"
    assert not lane_messages(redis_url, f"{settings.queue}.bulk"), "sent after Ctrl-C"
