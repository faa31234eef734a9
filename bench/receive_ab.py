"""The worker's receive, atomic (Lua take + BLMOVE wait) against kombu's BRPOP, side by side.

    python -m bench.receive_ab [--rounds 3] [--single 4000] [--bulk 40000]

The null pipeline (``BERTSTREAM_MODEL=null``: no model, the broker and the
database are the cost), one text per message and bulk, with
``atomic_receive`` on and off in alternating rounds, so the machine's noise
hits both alike. Prints texts/s per round and the atomic/BRPOP ratio per
round. Uses Redis database 8 (emptied) and a temporary SQLite file.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.options import BenchOptions
from bench.pipeline import measure_null
from bench.run import STAGE_TIMEOUT_S, BenchRun
from contract.settings import Settings


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """Measure and print; gives {mode: {"atomic": [...], "brpop": [...]}} texts/s per round."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single", type=int, default=BenchOptions.null_single)
    ap.add_argument("--bulk", type=int, default=BenchOptions.null_bulk)
    args = ap.parse_args(argv)
    out: dict[str, dict[str, list[float]]] = {
        mode: {"atomic": [], "brpop": []} for mode in ("single", "bulk")}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-recv-") as tmp:
        run = BenchRun(Settings.from_env(), BenchOptions.build(), stack, Path(tmp))
        run._open_services()
        null = run.settings.replace(model="null")
        for k in range(args.rounds):
            order = ("atomic", "brpop") if k % 2 == 0 else ("brpop", "atomic")
            for mode, count in (("single", args.single), ("bulk", args.bulk)):
                texts = [run.texts[i % len(run.texts)] for i in range(count)]
                for name in order:
                    got: dict[str, Any] = measure_null(
                        null.replace(atomic_receive=name == "atomic"), run.probe,
                        run.start_worker, texts, run.prefix(f"{mode}-{name}-{k}"),
                        bulk=mode == "bulk", timeout=STAGE_TIMEOUT_S)
                    out[mode][name].append(got["texts_per_s"])
                    print(f"round {k + 1} {mode:6} {name:6} {got['texts_per_s']:9.0f} texts/s",
                          flush=True)
    for mode, rates in out.items():
        ratios = [a / b for a, b in zip(rates["atomic"], rates["brpop"], strict=True)]
        print(f"{mode}: atomic {[round(x) for x in rates['atomic']]}, "
              f"brpop {[round(x) for x in rates['brpop']]}, atomic/brpop per round "
              f"{[round(r, 3) for r in ratios]}, median {statistics.median(ratios):.3f}")
    return out


if __name__ == "__main__":
    main()
