"""``bertstream serve``: run the HTTP API under uvicorn (the ``api`` extra)."""

from __future__ import annotations

import copy
import dataclasses
import errno
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

import click

from api.security import HeadDeadlineH11, is_loopback
from contract.constants import ENV_PREFIX
from contract.errors import ConfigError
from contract.settings import Settings
from producer.options import named_as_given

if TYPE_CHECKING:
    import uvicorn

#: ``serve --log-level`` choices (any case): uvicorn's levels.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
#: The format of bertstream's own log lines, as ``bertstream worker`` writes them.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The loggers of bertstream's code that ``serve`` runs (their children included).
OWN_LOGGERS = ("api", "contract", "producer")


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Server processes (each coalesces its own submits).")
@click.option("--no-auth", is_flag=True,
              help="Serve without bearer tokens on a non-loopback address (explicit opt-out).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              default="info", show_default=True)
@click.pass_context
def serve_command(ctx: click.Context, host: str, port: int, workers: int, no_auth: bool,
                  log_level: str) -> None:
    """Serve the HTTP API: submit texts, read results, /docs, /metrics."""
    import uvicorn

    obj = ctx.find_root().obj
    settings = obj if isinstance(obj, Settings) else Settings.from_env()
    tokens = settings.token_list()
    if tokens and no_auth:
        raise click.UsageError("--no-auth contradicts BERTSTREAM_API_TOKENS; unset one of them")
    if not tokens and not no_auth and not is_loopback(host):
        raise click.UsageError(
            f"refusing to serve {host} without authentication: set BERTSTREAM_API_TOKENS, "
            "bind to 127.0.0.1, or pass --no-auth")
    from api.app import refuse_database_role, refuse_outdated_schema
    from api.metrics import multiprocess_dir
    from api.submit import broker_redis
    from contract.broker import probe_broker
    from contract.errors import BrokerUnavailable, SchemaMismatch, StoreRefused
    from contract.results import ResultStore

    # memory:// (or a Redis URL that does not parse): a ConfigError, one line and exit 2,
    # before the server processes fail on it with a traceback.
    broker_redis(settings).close()
    # Redis refusing the URL (a database index it lacks, credentials it does not take) is
    # a ConfigError too, as for `bertstream worker`: no wait mends it. An unreachable Redis
    # is not: it may come up after the API (a restarted stack), so the API starts, says
    # so, and answers 503 broker_unavailable (and /readyz not ready) until then.
    try:
        probe_broker(settings)
    except BrokerUnavailable as exc:
        click.echo(f"warning: {exc}; serving anyway: submits are answered 503 and /readyz "
                   f"is not ready until Redis answers", err=True)
    store = ResultStore.from_settings(settings)
    try:
        refuse_outdated_schema(store)
        refuse_database_role(store)
    except (SchemaMismatch, StoreRefused) as exc:  # a setting to fix: no wait mends it
        # a --database-url given is named as the option (the group's errors are)
        click.echo(f"error: {named_as_given(ctx, str(exc))}", err=True)
        ctx.exit(2)
    finally:
        store.close()
    # The server processes build their settings from the environment: hand
    # them exactly this process's (command-line overrides included).
    for field in dataclasses.fields(settings):
        os.environ[ENV_PREFIX + field.name.upper()] = str(getattr(settings, field.name))
    # The port is bound here, once, and the listening sockets handed to uvicorn: a port
    # taken between a check and uvicorn's own bind would end in uvicorn's errno and exit 3.
    sockets = bind_port(host, port)
    # HeadDeadlineH11: uvicorn alone holds a connection whose request head never ends.
    config = uvicorn.Config("api.app:app_from_env", factory=True, host=host, port=port,
                            workers=workers, log_level=log_level, access_log=False,
                            http=HeadDeadlineH11, log_config=serve_log_config(log_level))
    # Set before uvicorn spawns its processes (they inherit it, and prometheus_client
    # reads it as it is imported there): /metrics then sums every process's counts.
    with multiprocess_dir(workers) as shared:
        # uvicorn listens later (after each process's start-up) and says so: this is no
        # claim that the API answers yet.
        click.echo(f"bertstream API starting on http://{host}:{port} (docs: /docs; "
                   f"{'bearer tokens required' if tokens else 'no authentication'})", err=True)
        if shared is not None:
            click.echo(f"/metrics sums the counts of every server process, kept in {shared}",
                       err=True)
        run_uvicorn(config, sockets)


def serve_log_config(log_level: str) -> dict[str, Any]:
    """uvicorn's own logging configuration (its lines as uvicorn writes them), plus a
    handler on stderr for bertstream's loggers (:data:`OWN_LOGGERS`) in the worker's
    format (:data:`LOG_FORMAT`: time, level, logger) at ``--log-level``. Without it they
    had no handler: Python's last resort wrote their warnings bare (no time, level or
    logger) and dropped their INFO lines. They do not propagate (as uvicorn's do not), so
    a handler on the root logger writes no second copy. Handed to ``uvicorn.Config``,
    it is applied in every server process (``--workers N``)."""
    from uvicorn.config import LOG_LEVELS as LEVELS
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["bertstream"] = {"format": LOG_FORMAT}
    config["handlers"]["bertstream"] = {"class": "logging.StreamHandler",
                                        "formatter": "bertstream",
                                        "stream": "ext://sys.stderr"}
    for name in OWN_LOGGERS:
        config["loggers"][name] = {"handlers": ["bertstream"],
                                   "level": LEVELS[log_level.lower()], "propagate": False}
    return config


def run_uvicorn(config: uvicorn.Config, sockets: list[socket.socket]) -> None:
    """Serve ``config`` on the bound ``sockets``, in ``config.workers`` processes, as
    ``uvicorn.run`` would on the sockets it binds (exit 3 when the app fails to start)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    server = uvicorn.Server(config)
    try:
        for sock in sockets:
            sock.listen(config.backlog)
        # Given sockets, uvicorn names no address: its usual line, once the port listens.
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
            f"[{config.host}]" if ":" in config.host else config.host,
            sockets[0].getsockname()[1])
        if config.workers > 1:
            Multiprocess(config, sockets=sockets).run()
        else:
            server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    finally:
        for sock in sockets:
            sock.close()
    if config.workers == 1 and not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE


def bind_port(host: str, port: int) -> list[socket.socket]:
    """A socket bound on ``port`` for every address of ``host`` (as asyncio's server binds
    them for uvicorn), held from here to uvicorn so no other process can take the port
    in between; :class:`ConfigError` (one line, exit 2) when one cannot be bound.

    uvicorn answers a port in use with its errno and exit 3, which bertstream's exit
    codes keep for an unreachable Redis or database; a port is a setting to change.
    """
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot serve on {host}:{port}: {str(exc.strerror).lower()}") from exc
    bound: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _name, address in addresses:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                why = ("the port is in use (another process listens on it); stop that process "
                       "or pick another --port" if exc.errno == errno.EADDRINUSE
                       else (exc.strerror or str(exc)).lower())
                raise ConfigError(f"cannot serve on {host}:{port}: {why}") from exc
            sock.set_inheritable(True)  # for uvicorn's worker processes
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound
