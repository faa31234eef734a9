"""``bertstream bench``: the benchmark's command (the bench extra)."""

from __future__ import annotations

import logging
import sys

import click

from worker.cli import settings_from


@click.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes: about 100 s on 2 CPU cores.")
@click.option("--texts", type=int, default=None,
              help="Texts in the workload (default 600; 200 with --quick).")
@click.option("--model", default="default", show_default=True,
              help="'default' (bundled model), 'tiny' (4-layer random BERT) or a directory.")
@click.option("--out", default="bench/results/latest.json", show_default=True,
              help="Where to write the JSON results.")
@click.option("--skip", multiple=True,
              help="Stages to skip (repeat or comma-separate): "
                   "padding, bare, pipeline, openloop, long, naive, null, http.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--threads", type=int, default=None,
              help="Torch threads for every stage (default: CPU count, at most 8).")
@click.option("--rounds", type=int, default=None,
              help="Rounds of bare model / bertstream, alternated; medians reported "
                   "(default 3; 1 with --quick).")
@click.option("--procs-per-gpu", "procs", default="1", show_default=True,
              help="Worker processes for the end-to-end stage, one run per count: e.g. 1,2 "
                   "(what `worker --gpus 0 --procs-per-gpu N` starts on one device).")
@click.pass_context
def bench_command(ctx: click.Context, quick: bool, texts: int | None, model: str, out: str,
                  skip: tuple[str, ...], device: str,
                  threads: int | None, rounds: int | None, procs: str) -> None:
    """Benchmark the pipeline against the bare model and a naive Celery task, side by side.

    WARNING: it empties Redis database 8 on BERTSTREAM_BROKER_URL's host
    (FLUSHDB) at the start and again at exit; keep nothing of yours there.

    The results go to a temporary SQLite file unless --database-url is given on
    the command line (BERTSTREAM_DATABASE_URL is not used: a benchmark never
    writes into the results database unasked).
    """
    from bench import main as bench_main

    # --database-url is the group's option (accepted after the command too).
    database_url = ctx.find_root().params.get("database_url")

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = bench_main(settings_from(ctx), quick=quick, texts=texts, model=model, out=out,
                          database_url=database_url, skip=skip, device=device, threads=threads,
                          rounds=rounds, procs=procs)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    sys.exit(code)
