"""Worker processes per GPU and per model: ``bertstream worker --gpus 0,1 [--procs-per-gpu N]
[--model NAME=PATH ...]``.

Each child serves one model and, with ``--gpus``, sees exactly one GPU
through CUDA_VISIBLE_DEVICES (so inside it the device is always ``cuda:0``);
each gets its own Celery hostname. Several models on one machine run as
separate processes, so each has its own batches and its own queues. Several
processes per GPU let one process tokenize, pad and commit while another's
batch runs on the device, at the cost of one model copy each. Signals are
forwarded so Ctrl-C / SIGTERM shut all children down warmly.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from contract.constants import DEFAULT_MODEL, ENV_PREFIX, MODEL_NAME_PATTERN
from contract.settings import Settings
from worker.process import die_with_parent


def parse_gpus(spec: str) -> list[str]:
    """``"0,1"`` → ``["0", "1"]``; rejects empty or non-numeric entries."""
    gpus = [g.strip() for g in spec.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise ValueError(f"--gpus expects indices like 0,1 (got {spec!r})")
    return gpus


def child_hostname(gpu: str | None, index: int, procs_per_gpu: int, host: str,
                   model_name: str = "") -> str:
    """Celery node name of child ``index`` on ``gpu`` (``bertstream-gpu0@host``, or
    ``bertstream-gpu0-1@host`` when a GPU has several processes; a named model's
    children carry its name: ``bertstream-NAME-gpu0@host``, ``bertstream-NAME@host``)."""
    parts = ["bertstream"]
    if model_name:
        parts.append(model_name)
    if gpu is not None:
        parts.append(f"gpu{gpu}")
    if procs_per_gpu > 1:
        parts.append(str(index))
    return "-".join(parts) + f"@{host}"


def child_commands(
    gpus: Sequence[str], settings: Settings, loglevel: str = "INFO", procs_per_gpu: int = 1,
    host: str | None = None, models: Sequence[tuple[str, str]] | None = None,
) -> list[tuple[list[str], dict[str, str]]]:
    """The command line and environment of each child worker: for every GPU (or once,
    without GPUs) and every ``(name, path)`` model, ``procs_per_gpu`` children.

    The parent's resolved settings travel as ``BERTSTREAM_*`` variables, so
    command-line overrides given to the parent reach every child.
    """
    if procs_per_gpu < 1:
        raise ValueError(f"--procs-per-gpu must be at least 1 (got {procs_per_gpu})")
    host = host or socket.gethostname()
    served = list(models) if models else [(settings.model_name, settings.model)]
    out: list[tuple[list[str], dict[str, str]]] = []
    slots: list[str | None] = [*gpus] or [None]
    for gpu in slots:
        for name, path in served:
            for index in range(procs_per_gpu):
                env = dict(os.environ)
                for key, value in dataclasses.asdict(settings).items():
                    env[ENV_PREFIX + key.upper()] = str(value)
                env[ENV_PREFIX + "MODEL"] = path
                env[ENV_PREFIX + "MODEL_NAME"] = name
                if settings.metrics_port:  # one port per child, counting up
                    env[ENV_PREFIX + "METRICS_PORT"] = str(settings.metrics_port + len(out))
                cmd = [sys.executable, "-m", "worker"]
                if gpu is not None:
                    env["CUDA_VISIBLE_DEVICES"] = gpu
                    cmd += ["--device", "cuda:0"]
                cmd += ["--hostname", child_hostname(gpu, index, procs_per_gpu, host, name),
                        "--loglevel", loglevel]
                out.append((cmd, env))
    return out


def launch(gpus: Sequence[str], settings: Settings, loglevel: str = "INFO",
           procs_per_gpu: int = 1, models: Sequence[tuple[str, str]] | None = None) -> int:
    """Start the children (see :func:`child_commands`) and wait; gives the first non-zero
    exit code.

    A signal that stops the launcher is passed on to every child; a launcher
    killed outright (OOM killer, kill -9) leaves each child a SIGTERM, its
    warm shutdown, so that a restarted launcher never runs beside orphans on
    the same GPU.
    """
    commands = child_commands(gpus, settings, loglevel, procs_per_gpu, models=models)
    children = [subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent(signal.SIGTERM))
                for cmd, env in commands]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return next((c for c in codes if c), 0)


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
