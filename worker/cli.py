"""Click commands implemented by the worker package (imported lazily by producer.cli)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from contract.errors import BertstreamError
from contract.settings import Settings


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """The Settings the top-level group built, with command-line overrides applied."""
    obj = ctx.find_root().obj
    base = obj if isinstance(obj, Settings) else Settings.from_env()
    changes = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**changes) if changes else base


@click.command("worker")
@click.option("--device", default=None, help="cpu, cuda:N or auto (BERTSTREAM_DEVICE).")
@click.option("--gpus", default=None, help="Start one worker process per GPU, e.g. 0,1.")
@click.option("--model", default=None, help="Model directory or 'default' (BERTSTREAM_MODEL).")
@click.option("--max-wait-ms", type=int, default=None, help="Micro-batch max wait.")
@click.option("--token-budget", type=int, default=None, help="Tokens per model batch.")
@click.option("--torch-threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--hostname", default=None, help="Celery node name.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.pass_context
def worker_command(ctx: click.Context, device: str | None, gpus: str | None, model: str | None,
                   max_wait_ms: int | None, token_budget: int | None,
                   torch_threads: int | None, hostname: str | None, loglevel: str) -> None:
    """Run a micro-batching worker (one process; --gpus starts one per GPU)."""
    settings = settings_from(ctx, model=model, max_wait_ms=max_wait_ms,
                             token_budget=token_budget, torch_threads=torch_threads)
    if gpus:
        from worker.launcher import launch, parse_gpus

        sys.exit(launch(parse_gpus(gpus), settings, loglevel=loglevel))
    if device:
        settings = settings.replace(device=device)
    logging.basicConfig(level=loglevel.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from worker.app import build_runner, build_worker_app, run_worker

    try:
        runner = build_runner(settings)
        wapp = build_worker_app(settings, runner, hostname=hostname)
    except BertstreamError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    run_worker(wapp, hostname=hostname, loglevel=loglevel)


@click.command("demo")
@click.pass_context
def demo_command(ctx: click.Context) -> None:
    """Run the end-to-end demo on embedded defaults."""
    from worker.demo import run_demo

    sys.exit(run_demo(settings_from(ctx)))


@click.group("model")
def model_group() -> None:
    """Train and evaluate the bundled sentiment model."""


@click.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes: about one minute on 2 CPU cores.")
@click.option("--texts", type=int, default=None,
              help="Texts in the workload (default 600; 200 with --quick).")
@click.option("--model", default="default", show_default=True,
              help="'default' (bundled model), 'tiny' (4-layer random BERT) or a directory.")
@click.option("--out", default="bench/results/latest.json", show_default=True,
              help="Where to write the JSON results.")
@click.option("--database-url", default=None,
              help="Results database (default: a temporary SQLite file).")
@click.option("--skip", multiple=True,
              help="Stages to skip (repeat or comma-separate): "
                   "padding, bare, pipeline, openloop, naive, null.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--threads", type=int, default=None,
              help="Torch threads for every stage (default: CPU count, at most 8).")
@click.pass_context
def bench_command(ctx: click.Context, quick: bool, texts: int | None, model: str, out: str,
                  database_url: str | None, skip: tuple[str, ...], device: str,
                  threads: int | None) -> None:
    """Benchmark the pipeline against the bare model and a naive Celery task, side by side."""
    from worker.benchmark import main as bench_main

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = bench_main(settings_from(ctx), quick=quick, texts=texts, model=model, out=out,
                          database_url=database_url, skip=skip, device=device, threads=threads)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    sys.exit(code)
