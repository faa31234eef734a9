"""Time the results store's guarded operations on SQLite, alone and beside a busy thread.

    python -m bench.store_guard [--rounds 5]
    PYTHONPATH=/path/to/an/older/checkout python bench/store_guard.py   # the same, before

Every store operation runs under the store's guard, which stops a statement past its
time limit. Run this from two checkouts side by side (the second through PYTHONPATH,
e.g. ``git archive <rev> | tar -x -C /tmp/old``) to compare how each guards: it times
ten 1,024-row upserts, 2,000 one-id reads and a 30,000-row aggregate, best of
``--rounds``, with nothing else running and then beside a thread that spins in Python
(as the API's and a worker's threads keep the interpreter's lock busy). Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

if importlib.util.find_spec("contract") is None:  # PYTHONPATH names no other checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.results import DbTimeouts, ResultRecord, ResultStore  # noqa: E402


def _record(task_id: str, label: str) -> ResultRecord:
    text = f"text of {task_id}"
    return ResultRecord(id=task_id, text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                        text_chars=len(text), model="bench", status="done",
                        finished_at=dt.datetime.now(dt.timezone.utc), text=text,
                        label=label, score=0.9, scores={label: 0.9})


def _spin(stop: threading.Event) -> None:
    """Python bytecode until ``stop``: a thread that wants the interpreter's lock."""
    while not stop.is_set():
        pass


def _best(call: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - began)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    store = ResultStore.from_url(f"sqlite:///{tempfile.mkdtemp()}/guard.db",
                                 DbTimeouts(statement_s=30))
    store.create_schema()
    labels = ("positive", "negative", "neutral")
    batches = [[_record(f"g{b}-{i}", labels[i % 3]) for i in range(1024)] for b in range(10)]
    for start in range(0, 30_000, 5_000):
        store.upsert([_record(f"a{i}", labels[i % 3]) for i in range(start, start + 5_000)])
    work = {
        "10 upserts of 1,024 rows": lambda: [store.upsert(b) for b in batches],
        "2,000 one-id reads": lambda: [store.get_many([f"a{i}"]) for i in range(2_000)],
        "aggregate of 30,000 rows": lambda: store.aggregate(by="label"),
    }
    print(f"contract from {Path(sys.modules['contract.results'].__file__ or '').parent}")
    print("| operation | alone (s) | beside a busy thread (s) |\n|---|---:|---:|")
    for name, call in work.items():
        alone = _best(call, args.rounds)
        stop = threading.Event()
        spinner = threading.Thread(target=_spin, args=(stop,), daemon=True)
        spinner.start()
        try:
            busy = _best(call, args.rounds)
        finally:
            stop.set()
            spinner.join()
        print(f"| {name} | {alone:.3f} | {busy:.3f} |")
    store.close()


if __name__ == "__main__":
    main()
