"""Review of submit_many's linger thread: a Ctrl-C that lands while the call stops the
thread (the source ended during the thread's publish) must not leave that thread behind,
still holding the publisher's producer after the call gave it back."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer import AsyncClient, Client
from tests.conftest import RedisServer
from tests.producer_helpers import broker_settings, lane_messages


def _linger_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bertstream-linger"]


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="SIGINT is handled on the main thread")
def test_a_ctrl_c_while_the_call_stops_its_linger_thread_leaves_no_thread(
        redis_server: RedisServer, sqlite_url: str) -> None:
    """One item, then the source ends while the linger thread publishes it to a Redis
    that answers slowly (CLIENT PAUSE): the call waits for that publish in Flusher.stop,
    where one Ctrl-C lands. KeyboardInterrupt propagates, and once the publish ends the
    thread ends too, rather than waiting for ever on an empty buffer."""
    settings = broker_settings(redis_server.url, sqlite_url)
    admin = redis.Redis.from_url(redis_server.url)
    client = Client(settings)
    try:
        client.submit_many([{"text": "warm", "id": "w-0"}])  # the connection is open

        def source() -> Iterator[dict[str, str]]:
            yield {"text": "one", "id": "c-0"}
            time.sleep(0.3)  # ends while the thread's publish (at 0.2 s) waits on Redis

        threading.Timer(0.05, lambda: admin.execute_command("CLIENT", "PAUSE", 1500)).start()
        threading.Timer(0.8, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            client.submit_many(source(), linger_s=0.2)
        deadline = time.monotonic() + 5
        while _linger_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _linger_threads(), "the linger thread was left behind by a Ctrl-C"
        assert admin.llen(f"{settings.queue}.bulk") == 2  # its publish itself went through
    finally:
        client.close()
        admin.close()


def test_a_linger_too_long_for_a_lock_timeout_does_not_kill_the_thread(
        redis_url: str, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finite linger_s is accepted however large (a way to say "only full chunks, and
    the rest at the end"); the thread's sleep must not raise OverflowError, which ended
    it with a traceback on stderr."""
    raised: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))

    def source() -> Iterator[str]:
        yield "the first text"
        time.sleep(0.2)
        yield "the second text"

    with Client(broker_settings(redis_url, sqlite_url)) as client:
        report = client.submit_many(source(), linger_s=1e12)
    assert len(report.ids) == 2 and report.messages == 1
    assert raised == []


def test_a_cancelled_async_submit_ends_its_thread_when_the_loop_stops_after(
        redis_url: str, sqlite_url: str) -> None:
    """wait_for times out an async submit_many whose async generator is quiet, and the
    loop is not run again (run_until_complete, then sync work): the call's thread must
    end, its item sent, rather than wait for ever on a loop that no longer runs (its
    linger thread with it, and the interpreter's exit joining them)."""
    settings = broker_settings(redis_url, sqlite_url)

    async def socket() -> Any:
        yield {"text": "the first post", "id": "q-0"}
        await asyncio.sleep(3600)
        yield {"text": "never", "id": "q-1"}

    loop = asyncio.new_event_loop()
    client = AsyncClient(settings)
    try:
        with pytest.raises(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(client.submit_many(socket()), 0.5))
        deadline = time.monotonic() + 5
        while _linger_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _linger_threads()
        queued = [i["id"] for m in lane_messages(redis_url, f"{settings.queue}.bulk")
                  for i in m["items"]]
    finally:
        loop.run_until_complete(asyncio.sleep(0.3))  # lets a stuck call end
        loop.run_until_complete(client.aclose())
        loop.close()
    assert not left, "the call's thread waits for ever on a loop that no longer runs"
    assert queued == ["q-0"]
