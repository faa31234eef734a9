"""Worker processes pinned to GPUs: ``bertstream worker --gpus 0,1 [--procs-per-gpu N]``.

Each child sees exactly one GPU through CUDA_VISIBLE_DEVICES (so inside it
the device is always ``cuda:0``) and gets its own Celery hostname. Several
processes per GPU let one process tokenize, pad and commit while another's
batch runs on the device, at the cost of one model copy each. Signals are
forwarded so Ctrl-C / SIGTERM shut all children down warmly.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from contract.constants import ENV_PREFIX
from contract.settings import Settings


def parse_gpus(spec: str) -> list[str]:
    """``"0,1"`` → ``["0", "1"]``; rejects empty or non-numeric entries."""
    gpus = [g.strip() for g in spec.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise ValueError(f"--gpus expects indices like 0,1 (got {spec!r})")
    return gpus


def child_hostname(gpu: str, index: int, procs_per_gpu: int, host: str) -> str:
    """Celery node name of child ``index`` on ``gpu`` (``bertstream-gpu0@host``, or
    ``bertstream-gpu0-1@host`` when a GPU has several processes)."""
    suffix = f"-{index}" if procs_per_gpu > 1 else ""
    return f"bertstream-gpu{gpu}{suffix}@{host}"


def child_commands(
    gpus: Sequence[str], settings: Settings, loglevel: str = "INFO", procs_per_gpu: int = 1,
    host: str | None = None,
) -> list[tuple[list[str], dict[str, str]]]:
    """The command line and environment of each child worker, ``procs_per_gpu`` per GPU.

    The parent's resolved settings travel as ``BERTSTREAM_*`` variables, so
    command-line overrides given to the parent reach every child.
    """
    if procs_per_gpu < 1:
        raise ValueError(f"--procs-per-gpu must be at least 1 (got {procs_per_gpu})")
    host = host or socket.gethostname()
    out: list[tuple[list[str], dict[str, str]]] = []
    for gpu in gpus:
        for index in range(procs_per_gpu):
            env = dict(os.environ)
            for key, value in dataclasses.asdict(settings).items():
                env[ENV_PREFIX + key.upper()] = str(value)
            if settings.metrics_port:  # one port per child, counting up
                env[ENV_PREFIX + "METRICS_PORT"] = str(settings.metrics_port + len(out))
            env["CUDA_VISIBLE_DEVICES"] = gpu
            cmd = [sys.executable, "-m", "worker", "--device", "cuda:0",
                   "--hostname", child_hostname(gpu, index, procs_per_gpu, host),
                   "--loglevel", loglevel]
            out.append((cmd, env))
    return out


def launch(gpus: Sequence[str], settings: Settings, loglevel: str = "INFO",
           procs_per_gpu: int = 1) -> int:
    """Start ``procs_per_gpu`` children per GPU and wait; gives the first non-zero exit code."""
    commands = child_commands(gpus, settings, loglevel, procs_per_gpu)
    children = [subprocess.Popen(cmd, env=env) for cmd, env in commands]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return next((c for c in codes if c), 0)
