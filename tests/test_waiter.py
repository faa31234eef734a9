"""The API's long-poll loop (api/waiter.py) keeps serving after a failed read."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable

from api.waiter import Waiter
from contract.errors import StoreUnavailable
from contract.results import ResultRecord


def _record(task_id: str) -> ResultRecord:
    return ResultRecord(id=task_id, text_sha256="0" * 64, text_chars=1, model="m",
                        status="done", finished_at=dt.datetime.now(dt.UTC))


def test_a_failed_read_does_not_stop_the_loop() -> None:
    """An outage, then an unexpected error from the read: both are logged, the loop goes
    on, and a waiter still gets its row when the read works again. (The errors are
    injected: the loop must outlive any exception its read raises.)"""
    calls: list[list[str]] = []

    def fetch(ids: Iterable[str], model: str | None) -> dict[str, ResultRecord]:
        calls.append(list(ids))
        if len(calls) == 1:
            raise StoreUnavailable("injected outage")
        if len(calls) == 2:
            raise RuntimeError("injected: not an outage")
        return {i: _record(i) for i in ids}

    async def scenario() -> ResultRecord | None:
        waiter = Waiter(fetch, interval_s=0.01)
        loop = asyncio.create_task(waiter.run())
        try:
            return await waiter.wait("t1", timeout=5)
        finally:
            loop.cancel()

    got = asyncio.run(scenario())
    assert got is not None and got.id == "t1"
    assert len(calls) >= 3
