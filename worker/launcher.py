"""Worker processes per GPU and per model: ``bertstream worker --gpus 0,1 [--procs-per-gpu N]
[--model NAME=PATH ...]``.

Each child serves one model and, with ``--gpus``, sees exactly one GPU
through CUDA_VISIBLE_DEVICES (so inside it the device is always ``cuda:0``);
each gets its own Celery hostname. Several models on one machine run as
separate processes, so each has its own batches and its own queues. Several
processes per GPU let one process tokenize, pad and commit while another's
batch runs on the device, at the cost of one model copy each.

The children are one set: when one of them leaves, the launcher stops the
others and exits, so that a supervisor (docker's restart policy, systemd)
restarts the whole set; see :func:`launch`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from contract.constants import DEFAULT_MODEL, ENV_PREFIX, MODEL_NAME_PATTERN
from contract.errors import ConfigError
from contract.settings import MAX_PORT, Settings
from worker.process import die_with_parent, prepare_ready_file

#: Seconds the other children get for their warm shutdown when one child left.
STOP_TIMEOUT_S = 30.0
#: How often the launcher looks at its children and their ready files.
_POLL_S = 0.1


def parse_gpus(spec: str) -> list[str]:
    """``"0,1"`` → ``["0", "1"]``; rejects empty, non-numeric or repeated entries."""
    gpus = [g.strip() for g in spec.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise ValueError(f"--gpus expects indices like 0,1 (got {spec!r})")
    twice = sorted({g for g in gpus if gpus.count(g) > 1}, key=int)
    if twice:
        # Two children on one GPU would share a node name and a heartbeat.
        raise ValueError(f"--gpus: {', '.join(twice)} given more than once; use "
                         "--procs-per-gpu N for several processes per GPU")
    return gpus


def child_hostname(gpu: str | None, index: int, procs_per_gpu: int, host: str,
                   model_name: str = "", prefix: str = "bertstream") -> str:
    """Celery node name of child ``index`` on ``gpu`` (``bertstream-gpu0@host``, or
    ``bertstream-gpu0-1@host`` when a GPU has several processes; a named model's
    children carry its name: ``bertstream-NAME-gpu0@host``, ``bertstream-NAME@host``).
    ``prefix`` replaces ``bertstream`` (:func:`child_commands` passes
    ``bertstream-<its pid>``, or the name part of ``worker --hostname``)."""
    parts = [prefix]
    if model_name:
        parts.append(model_name)
    if gpu is not None:
        parts.append(f"gpu{gpu}")
    if procs_per_gpu > 1:
        parts.append(str(index))
    return "-".join(parts) + f"@{host}"


def child_ready_file(ready_file: str, node: str) -> str:
    """The ready file of the child named ``node`` when the launcher's is ``ready_file``."""
    return f"{ready_file}.{node}"


def child_commands(
    gpus: Sequence[str], settings: Settings, loglevel: str = "INFO", procs_per_gpu: int = 1,
    host: str | None = None, models: Sequence[tuple[str, str]] | None = None,
    node: str | None = None, ready_file: str | None = None,
) -> list[tuple[list[str], dict[str, str]]]:
    """The command line and environment of each child worker: for every GPU (or once,
    without GPUs) and every ``(name, path)`` model, ``procs_per_gpu`` children.

    The parent's resolved settings travel as ``BERTSTREAM_*`` variables, so
    command-line overrides given to the parent reach every child. ``node``
    (``NAME@HOST``, from ``worker --hostname``) names the children
    ``NAME-<suffix>@HOST`` instead of ``bertstream-<pid>-<suffix>@<this host>``
    (the launcher's pid, as in a single worker's default name, so that two
    launchers on one host keep apart their node names and heartbeat keys); with
    ``ready_file`` each child gets its own (:func:`child_ready_file`). Raises
    :class:`ConfigError` when the children's metrics ports would pass 65535.
    """
    if procs_per_gpu < 1:
        raise ValueError(f"--procs-per-gpu must be at least 1 (got {procs_per_gpu})")
    prefix = ""
    if node:
        prefix, _, host = node.rpartition("@")
    prefix = prefix or f"bertstream-{os.getpid()}"
    host = host or socket.gethostname()
    served = list(models) if models else [(settings.model_name, settings.model)]
    slots: list[str | None] = [*gpus] or [None]
    count = len(slots) * len(served) * procs_per_gpu
    if settings.metrics_port and settings.metrics_port + count - 1 > MAX_PORT:
        raise ConfigError(
            f"{ENV_PREFIX}METRICS_PORT={settings.metrics_port}: {count} workers serve metrics "
            f"on consecutive ports from it, past {MAX_PORT}")
    visible = _visible_devices(gpus)
    # Children on the CPU share its cores: left to torch, each would take all of them.
    # An operator's OMP_NUM_THREADS (or MKL_NUM_THREADS) is a count per process, which
    # torch honours when left to decide: the split would override it.
    split = not gpus and count > 1 and not settings.torch_threads and not thread_env()
    cores = cpu_cores()
    cpu_threads = max(1, cores // count) if split else 0
    out: list[tuple[list[str], dict[str, str]]] = []
    for gpu in slots:
        for name, path in served:
            for index in range(procs_per_gpu):
                env = dict(os.environ)
                env.pop(SPLIT_ENV, None)
                for key, value in dataclasses.asdict(settings).items():
                    env[ENV_PREFIX + key.upper()] = str(value)
                env[ENV_PREFIX + "MODEL"] = path
                env[ENV_PREFIX + "MODEL_NAME"] = name
                if cpu_threads:
                    env[ENV_PREFIX + "TORCH_THREADS"] = str(cpu_threads)
                    env[SPLIT_ENV] = f"{cpu_threads} of {cores} cores for {count} workers"
                if settings.metrics_port:  # one port per child, counting up
                    env[ENV_PREFIX + "METRICS_PORT"] = str(settings.metrics_port + len(out))
                cmd = [sys.executable, "-m", "worker"]
                if gpu is not None:
                    env["CUDA_VISIBLE_DEVICES"] = visible[int(gpu)] if visible else gpu
                    cmd += ["--device", "cuda:0"]
                hostname = child_hostname(gpu, index, procs_per_gpu, host, name, prefix)
                cmd += ["--hostname", hostname, "--loglevel", loglevel]
                if ready_file:
                    cmd += ["--ready-file", child_ready_file(ready_file, hostname)]
                out.append((cmd, env))
    return out


def _visible_devices(gpus: Sequence[str]) -> list[str]:
    """The devices the launcher itself was given in ``CUDA_VISIBLE_DEVICES`` (empty: all).

    ``--gpus`` counts among them, as CUDA does inside the process: with
    ``CUDA_VISIBLE_DEVICES=2,3``, ``--gpus 0,1`` means the devices 2 and 3,
    never a GPU the launcher was kept from.
    """
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None or not mask.strip():
        return []
    visible = [d.strip() for d in mask.split(",") if d.strip()]
    beyond = [g for g in gpus if int(g) >= len(visible)]
    if beyond:
        raise ConfigError(f"--gpus {','.join(beyond)}: CUDA_VISIBLE_DEVICES={mask} leaves "
                          f"this launcher {len(visible)} device(s), numbered from 0")
    return visible


#: Per-process thread counts an operator sets for OpenMP and MKL; torch's default reads them.
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Set by the launcher in a CPU child whose ``BERTSTREAM_TORCH_THREADS`` is its split of
#: the cores: ``"<threads> of <cores> cores for <children> workers"``, for the child's log.
SPLIT_ENV = "_BERTSTREAM_THREAD_SPLIT"


#: A count OpenMP takes: a positive number, or one per nesting level (``4,2``).
THREAD_COUNT = re.compile(r"\+?0*[1-9][0-9]*(\s*,\s*\+?0*[1-9][0-9]*)*")


def thread_env(environ: Mapping[str, str] | None = None) -> str | None:
    """``NAME=VALUE`` of the first of :data:`THREAD_ENVS` set to a count, else None.
    Another value (``0``, ``abc``) limits nothing: OpenMP warns and ignores it, and
    torch takes every core, so it must not turn the launcher's split off."""
    environ = os.environ if environ is None else environ
    for name in THREAD_ENVS:
        value = environ.get(name, "").strip()
        if THREAD_COUNT.fullmatch(value):
            return f"{name}={value}"
    return None


def torch_threads_source(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """Why a CPU worker runs the torch threads it does, for its startup line: an explicit
    ``BERTSTREAM_TORCH_THREADS`` (or the launcher's split of the cores, which it set), else
    the operator's ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, else torch's own default."""
    environ = os.environ if environ is None else environ
    if settings.torch_threads:
        split = environ.get(SPLIT_ENV, "")
        if split.partition(" ")[0] == str(settings.torch_threads):
            return f"the launcher's split: {split}"
        return f"{ENV_PREFIX}TORCH_THREADS={settings.torch_threads}"
    return thread_env(environ) or "torch's default"


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or
    ``taskset``'s limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def exit_status(returncode: int) -> int:
    """A child's ``returncode`` as a shell reports it: killed by signal N → 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def launch(gpus: Sequence[str], settings: Settings, loglevel: str = "INFO",
           procs_per_gpu: int = 1, models: Sequence[tuple[str, str]] | None = None, *,
           node: str | None = None, ready_file: str | None = None,
           stop_timeout: float = STOP_TIMEOUT_S) -> int:
    """Start the children (see :func:`child_commands`), wait, and give the exit code.

    The children run in a session (process group) of their own, so a Ctrl-C in a
    terminal (which signals the whole foreground group) reaches the launcher
    only; the launcher turns SIGINT and SIGTERM into one SIGTERM per child,
    Celery's warm shutdown (a second Ctrl-C sends SIGQUIT, its cold shutdown),
    waits for them all and exits with the first non-zero code, else 0.

    When a child leaves unasked (its model fails to load, the OOM killer,
    kill -9, or even a clean exit) the set is incomplete: the other children
    get a SIGTERM and ``stop_timeout`` seconds before a SIGKILL, a line on
    stderr names the child and how it left, and the launcher exits with that
    child's code (128 + N for signal N). A child that exited 0 makes it exit
    1: a worker missing is a failure, and only a non-zero code fires an
    ``on-failure`` restart policy. A launcher killed
    outright (OOM killer, kill -9) leaves each child a SIGTERM, so that a
    restarted launcher never runs beside orphans on the same GPU.

    With ``ready_file``, the launcher creates it once every child has created
    its own (:func:`child_ready_file`): a health check sees the whole set.
    """
    if ready_file:
        prepare_ready_file(ready_file)
    commands = child_commands(gpus, settings, loglevel, procs_per_gpu, models=models,
                              node=node, ready_file=ready_file)
    ready = _ReadyFiles(ready_file, [cmd[cmd.index("--ready-file") + 1]
                                     for cmd, _ in commands] if ready_file else [])
    children = [subprocess.Popen(cmd, env=env, start_new_session=True,
                                 preexec_fn=die_with_parent(signal.SIGTERM))
                for cmd, env in commands]
    asked: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        cold = bool(asked) and signum == signal.SIGINT
        asked.append(signum)
        _signal_all(children, signal.SIGQUIT if cold else signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    first = _first_exit(children, ready)
    if asked:
        codes = [exit_status(child.wait()) for child in children]
        return next((c for c in codes if c), 0)
    # The children's own logs show only how each stopped, not which one left first.
    cmd = commands[children.index(first)][0]
    running = sum(child.poll() is None for child in children)
    print(f"worker: {cmd[cmd.index('--hostname') + 1]} (pid {first.pid}) "
          f"{_how_it_left(first.returncode)}; stopping the other {running} worker "
          "process(es)", file=sys.stderr, flush=True)
    _stop(children, stop_timeout)
    return exit_status(first.returncode) or 1


class _ReadyFiles:
    """The launcher's ready file, created once every child's exists."""

    def __init__(self, path: str | None, children: list[str]) -> None:
        self.path = Path(path) if path else None
        self.children = [Path(c) for c in children]
        for stale in ([self.path] if self.path else []) + self.children:
            stale.unlink(missing_ok=True)
        self.done = self.path is None

    def update(self) -> None:
        if self.path is not None and not self.done \
                and all(c.is_file() for c in self.children):
            self.path.write_text("\n".join(c.read_text(encoding="utf-8")
                                           for c in self.children), encoding="utf-8")
            self.done = True


def _first_exit(children: list[subprocess.Popen[bytes]],
                ready: _ReadyFiles) -> subprocess.Popen[bytes]:
    """Block until a child exits (keeping the ready file current); give that child."""
    while True:
        for child in children:
            if child.poll() is not None:
                return child
        ready.update()
        time.sleep(_POLL_S)  # polling the children, not waiting for time to pass


def _how_it_left(returncode: int) -> str:
    """A child's ``returncode`` in words, for the line that says why the set stops."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (exit {exit_status(returncode)})"
    return f"exited with code {returncode}"


def _signal_all(children: list[subprocess.Popen[bytes]], sig: int) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(sig)


def _stop(children: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM every child still running; SIGKILL those not gone after ``timeout``."""
    _signal_all(children, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def parse_models(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``--model`` values → ``(name, path)``: ``NAME=PATH`` names a model, a bare PATH (or
    ``default``) is the default model (name ""), and so is ``default=PATH``."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and path and re.fullmatch(MODEL_NAME_PATTERN, name):
            out.append(("" if name == DEFAULT_MODEL else name, path))
        elif sep and not path:
            raise ValueError(f"--model {spec!r}: expected NAME=PATH")
        else:
            out.append(("", spec))
    names = [n for n, _ in out]
    twice = sorted({n or DEFAULT_MODEL for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--model: {', '.join(twice)} given more than once")
    return out
