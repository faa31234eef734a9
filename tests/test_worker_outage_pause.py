"""While a database outage lasts, a worker requeues its messages without running the model.

Every flush that met an outage used to look up done ids (in vain), run the
model on all its texts, spend the commit's retries and requeue: every worker
kept its device busy for nothing and cycled the queue through Redis for as
long as the outage lasted. Now, once an outage has requeued a flush, the next
flush first asks the database ``SELECT 1``: still unavailable, its messages
go back at once, unrun, after a pause that grows at each requeue (bounded,
and cut short by a shutdown); answered, the flush runs as any other and
stores its rows. Nothing is lost and no delivery is counted. The task runs in
process on a PostgreSQL reached through a TCP proxy the test cuts
(tests/outage_helpers.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from contract.constants import DELIVERY_KEY_PREFIX, STATUS_DONE
from tests.outage_helpers import InProcessOutage, in_process_outage
from tests.test_long_texts import _QueuedRequest

pytestmark = pytest.mark.slow


@pytest.fixture
def outage(pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[tuple[InProcessOutage, list[int]]]:
    """The in-process outage set-up, and the number of texts of each model run."""
    import worker.flush

    runs: list[int] = []
    real = worker.flush.infer_pipelined

    def counted(runner: Any, encoded: Any, *args: Any, **kw: Any) -> Any:
        runs.append(len(encoded))
        return real(runner, encoded, *args, **kw)

    monkeypatch.setattr(worker.flush, "infer_pipelined", counted)
    with in_process_outage(pg_url, redis_url) as o:
        yield o, runs


def _request(mid: str, n: int = 3) -> _QueuedRequest:
    return _QueuedRequest(mid, [{"id": f"{mid}-{i}", "text": f"the hotel is good {i}",
                                 "submitted_at": time.time()} for i in range(n)])


def test_a_known_outage_requeues_unrun_and_the_first_flush_after_it_stores(
        outage: tuple[InProcessOutage, list[int]], caplog: pytest.LogCaptureFixture) -> None:
    """The first flush of an outage runs the model and requeues (its cause unknown till
    the commit); the next ones requeue unrun, their deliveries not counted; once the
    database answers, the next flush runs the model and stores every row at attempt 1."""
    o, runs = outage
    caplog.set_level(logging.INFO)
    o.proxy.down()
    first = _request("p-first")
    o.task.flush([first])
    assert first.rejected is True and not first.acknowledged
    assert runs == [3], "the first flush of an outage still runs the model"
    later = [_request(f"p-later-{k}") for k in range(3)]
    for r in later:
        o.task.flush([r])
        assert r.rejected is True and not r.acknowledged
    assert runs == [3], f"texts run through the model while the outage was known: {runs}"
    # throttled (one line per kind a minute): the next summary of requeues names this cause
    latest = o.task.processor.outage._kinds["requeue"].cause
    assert "checked before running the model" in latest, latest
    for r in [first, *later]:
        assert o.redis.get(DELIVERY_KEY_PREFIX + r.id) in (None, b"0"), r.id
    assert o.direct.count() == 0
    o.proxy.up()
    again = [_request("p-first"), *(_request(r.id) for r in later)]
    o.task.flush(again)
    assert all(r.acknowledged for r in again)
    assert runs == [3, 12], "the first flush once the database answers runs the model"
    rows = o.direct.get_many([f"{r.id}-{i}" for r in again for i in range(3)])
    assert len(rows) == 12
    assert {(v.status, v.attempts) for v in rows.values()} == {(STATUS_DONE, 1)}
    assert "database available again" in caplog.text
    # over: the next flush runs as before, no check
    runs.clear()
    last = _request("p-after")
    o.task.flush([last])
    assert last.acknowledged and runs == [3]


def test_the_pause_grows_at_each_requeue_up_to_its_bound(
        outage: tuple[InProcessOutage, list[int]]) -> None:
    """The pause before each requeue of one outage doubles from ``requeue_pause_s`` up to
    ``requeue_pause_max_s``: the requeue loop of a long outage is not hot."""
    o, runs = outage
    o.task.requeue_pause_s, o.task.requeue_pause_max_s = 0.2, 0.8
    o.proxy.down()
    took = []
    for k in range(5):
        t0 = time.monotonic()
        o.task.flush([_request(f"g-{k}")])
        took.append(time.monotonic() - t0)
    assert runs == [3]
    # the first flush spends the commit's retries too; the others pause 0.4, 0.8, 0.8, 0.8
    assert took[1] >= 0.4 and took[2] >= 0.8 and took[3] >= 0.8 and took[4] >= 0.8, took
    assert o.task.processor.outage.flushes == 5


def test_a_shutdown_cuts_the_pause_short(
        outage: tuple[InProcessOutage, list[int]]) -> None:
    """A shutdown asked for during the pause ends it: the messages go back at once, so a
    warm shutdown during an outage does not wait out a long pause."""
    o, runs = outage
    o.task.requeue_pause_s = o.task.requeue_pause_max_s = 60.0
    o.proxy.down()
    stop_at = time.monotonic() + 0.5
    o.task.processor.stopping = lambda: time.monotonic() >= stop_at
    o.task.processor.outage.flushes = 3  # an outage already known: the check, then the pause
    o.task.processor.outage.began = time.monotonic()
    r = _request("s-0")
    t0 = time.monotonic()
    o.task.flush([r])
    assert r.rejected is True and not r.acknowledged
    assert runs == []
    assert time.monotonic() - t0 < 30, "the 60 s pause ran to its end despite the shutdown"


def test_held_deliveries_stay_renewed_during_the_pause(
        outage: tuple[InProcessOutage, list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A message held for its long text (scored in windows over several flushes) goes back
    with the flush that met the outage, after the pause; until then this worker still holds
    it unacked, so it is renewed in the unacked index during the pause as the flush's own
    messages are. Left unrenewed for the pause (up to ``requeue_pause_max_s``) on top of the
    commit's last attempt, another worker's visibility sweep could restore it meanwhile;
    the reject that follows would then take back the restored copy's record (they share a
    delivery tag) and the task would be delivered twice."""
    import worker.tasks

    o, _ = outage
    proc = o.task.processor
    proc.settings = proc.settings.replace(window_slice_ms=1)
    long_req = _QueuedRequest("h-long", [{"id": "h-long-0", "submitted_at": time.time(),
                                          "text": " ".join(["good"] * 3_000)}])
    long_req.message = cast(Any, "the held delivery")
    o.task.flush([long_req])
    assert proc.held() == {"h-long"} and o.task._held == {"h-long": [long_req]}

    renewed: list[float] = []
    rejected: list[float] = []
    real_keep = worker.tasks.keep_visible

    def keep(messages: list[Any]) -> None:
        if "the held delivery" in messages:
            renewed.append(time.monotonic())
        real_keep(messages)

    monkeypatch.setattr(worker.tasks, "keep_visible", keep)
    long_req.reject = lambda requeue=False: rejected.append(time.monotonic())  # type: ignore[method-assign]
    o.task.visibility_timeout_s = 0.4  # renewals due every 0.1 s
    o.task.requeue_pause_s = o.task.requeue_pause_max_s = 2.0
    o.proxy.down()
    o.task.flush([_request("h-other")])
    assert rejected, "the held delivery goes back with the flush that met the outage"
    assert o.task._held == {}
    last = max((t for t in renewed if t <= rejected[0]), default=float("-inf"))
    assert rejected[0] - last < 1.0, (
        f"the held delivery went {rejected[0] - last:.1f} s unrenewed before its requeue: "
        "not renewed during the pause")

