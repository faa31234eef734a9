"""A Ctrl-C (or SIGTERM) that lands while a chunk is being published: the chunk is counted
as sent, so the report and the resume line match what is in Redis
(``producer.client.signals_held`` around :meth:`ChunkPublisher.flush`'s publish).

The signal is raised by the ``bertstream stream`` process itself right after its second
chunk's LPUSH, the instant that used to lose the count: the test does not race it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from producer.client import signals_held
from tests.producer_helpers import lane_messages

ROOT = Path(__file__).resolve().parent.parent

#: ``bertstream stream ARGS`` whose publish raises the signal ``argv[1]`` right after the
#: LPUSH of its second chunk.
SCRIPT = """
import signal, sys
import producer.client
from producer.cli import main

signum = int(sys.argv[1])
publish = producer.client.Client.publish
calls = []

def publish_then_signal(self, items, **kwargs):
    publish(self, items, **kwargs)
    calls.append(len(items))
    if len(calls) == 2:
        signal.raise_signal(signum)

producer.client.Client.publish = publish_then_signal
sys.argv = ["bertstream", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_right_after_a_chunk_reached_redis_counts_that_chunk(
        redis_url: str, sqlite_url: str, tmp_path: Path, signum: int) -> None:
    """Chunks of 2: the signal comes just after chunk 2 (lines 3-4) is in Redis. The run
    says 4 sent and resume from line 5, and the ids file lists lines 1-4, as the queue
    holds them. It said "2 item(s) were sent; resume from line 3": a resume sent lines 3-4
    twice."""
    queue = f"bst-sig-{uuid.uuid4().hex[:8]}"
    ids_file = tmp_path / "ids.jsonl"
    env = {**os.environ, "BERTSTREAM_BROKER_URL": redis_url,
           "BERTSTREAM_DATABASE_URL": sqlite_url, "BERTSTREAM_QUEUE": queue,
           "PYTHONPATH": str(ROOT)}
    lines = "".join(f"text {i}\n" for i in range(1, 7))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(int(signum)), "stream", "-", "--no-progress",
         "--chunk-size", "2", "--ids-out", str(ids_file)],
        input=lines, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)

    assert out.returncode == 130, out.stderr
    assert "4 item(s) were sent" in out.stderr and "resume from line 5" in out.stderr, \
        out.stderr
    assert "Traceback" not in out.stderr
    queued = [it for m in lane_messages(redis_url, f"{queue}.bulk") for it in m["items"]]
    assert [it["text"] for it in queued] == [f"text {i}" for i in range(1, 5)]
    written = [json.loads(x) for x in ids_file.read_text().splitlines()]
    assert [w["line"] for w in written] == [1, 2, 3, 4]
    assert [w["id"] for w in written] == [it["id"] for it in queued]


def test_a_held_signal_is_delivered_as_the_block_ends_and_a_second_at_once() -> None:
    steps: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            steps.append("after the first")
    assert steps == ["after the first"]
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            steps.append("after the second")
    assert steps == ["after the first"]
    with signals_held():  # no signal: nothing raised
        steps.append("quiet")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_held_signals_keep_their_handlers_and_ignored_ones_stay_ignored() -> None:
    got: list[int] = []
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with signals_held():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            signal.raise_signal(signal.SIGTERM)  # ignored, not held
        signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
        with signals_held():
            signal.raise_signal(signal.SIGTERM)
            assert got == []
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_signals_are_not_held_off_the_main_thread() -> None:
    """Only the main thread may set handlers (and Python runs them there): elsewhere the
    block runs as it is (the API publishes from its threads)."""
    seen: list[object] = []

    def publish() -> None:
        with signals_held():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=publish)
    thread.start()
    thread.join(10)
    assert seen == [signal.default_int_handler]
