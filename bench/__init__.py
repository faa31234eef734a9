"""``bertstream bench``: the pipeline measured against its limit and its peers in one run.

Measurements (bench/README.md explains each): the bare model in-process
(:mod:`.bare`), a naive one-text-per-task Celery peer (:mod:`.naive`),
bertstream end to end and with a null model (:mod:`.pipeline`), padding
waste (:mod:`.padding`) and latency under open-loop load (:mod:`.openloop`).
:mod:`.run` runs them in order; :mod:`.report` prints the table and writes
the JSON.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from redis.exceptions import RedisError

from contract.errors import BertstreamError
from contract.settings import Settings


def main(settings: Settings, **options: Any) -> int:
    """Run the benchmark with the CLI's ``options``; print the table, write the JSON.

    Gives the process exit code: 0 when the run completed (targets missed
    are reported, not failed), 1 when a stage could not run, 130 on Ctrl-C.
    """
    from bench.options import BenchOptions
    from bench.report import header, ratios, table, write_json
    from bench.run import run_bench

    command = options.pop("command", None) or "bertstream " + " ".join(sys.argv[1:])
    opts = BenchOptions.build(**options)

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run_bench(settings, opts, command=command,
                           log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True),
                           checkpoint=lambda doc: write_json({**doc, "ratios": ratios(doc)},
                                                             opts.out))
    except KeyboardInterrupt:
        print("bench: interrupted; every worker it started was stopped", file=sys.stderr)
        return 130
    # A stage that cannot run (service down, worker crashed, rows never came)
    # ends the run with its reason; the workers are already stopped.
    except (BertstreamError, RedisError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"bench: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    result["ratios"] = ratios(result)
    print(header(result))
    print()
    print(table(result))
    write_json(result, opts.out)
    print(f"\nJSON: {opts.out}")
    return 0
