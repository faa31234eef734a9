"""Ctrl-C while the ``bertstream`` console command starts: its imports (the CLI with
SQLAlchemy and Redis; a worker's command module; torch inside the worker command) take
a while, and Ctrl-C then printed a KeyboardInterrupt traceback (exit by the signal) or
click's "Aborted!" (exit 1). It now exits 130 with one line at most, as an interrupted
stream does.

The real console script runs in a subprocess; a ``sitecustomize`` put on its path holds
the import of one chosen module until the test has sent SIGINT, so the signal lands
during that import every time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "bertstream"

#: Loaded by the interpreter at start (``site``): the import of ``$SLOW_IMPORT`` writes
#: ``$SLOW_MARKER`` and then waits (in Python, so a signal is handled there) for SIGINT;
#: with ``$SLOW_IN_DEL`` it waits in an object's ``__del__``, as when the signal comes
#: while the garbage collector runs finalizers (an exception there is only printed),
#: until the test writes ``$SLOW_MARKER.released``.
SITECUSTOMIZE = '''
import os, sys, time

def _wait(marker):
    open(marker, "w").close()
    for _ in range(600):
        if os.path.exists(marker + ".released"):
            return
        time.sleep(0.1)

class _Finalized:
    def __del__(self):
        _wait(os.environ["SLOW_MARKER"])

class _Slow:
    def __init__(self):
        self.name = os.environ["SLOW_IMPORT"]
        self.done = False

    def find_spec(self, name, path=None, target=None):
        if name == self.name and not self.done:
            self.done = True
            if os.environ.get("SLOW_IN_DEL"):
                _Finalized()  # dropped at once: its __del__ runs here
            else:
                _wait(os.environ["SLOW_MARKER"])
        return None

sys.meta_path.insert(0, _Slow())
'''


def signal_while_importing(cmd: list[str], env: dict[str, str], module: str, tmp_path: Path,
                           signum: int, *, cwd: Path, merged: bool = False,
                           preexec_fn: Callable[[], None] | None = None
                           ) -> subprocess.CompletedProcess[str]:
    """``cmd`` (with ``env``) sent ``signum`` while it imports ``module``, held there by
    :data:`SITECUSTOMIZE` until the signal is sent: its exit and output (``merged``:
    stderr in stdout; ``preexec_fn`` run in the child before it starts)."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker = tmp_path / f"importing-{module}"
    env = {**env, "PYTHONPATH": str(hook), "SLOW_IMPORT": module, "SLOW_MARKER": str(marker)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merged else subprocess.PIPE,
                            text=True, cwd=cwd, preexec_fn=preexec_fn)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"{module} was never imported"
            time.sleep(0.05)
        proc.send_signal(signum)
        marker.with_name(marker.name + ".released").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _interrupt_while_importing(module: str, args: list[str], tmp_path: Path, redis_url: str,
                               in_del: bool = False, preexec_fn: Callable[[], None] | None = None
                               ) -> subprocess.CompletedProcess[str]:
    """``bertstream ARGS`` sent SIGINT while it imports ``module`` (``preexec_fn`` run in
    the child before it starts): its exit and output."""
    env = {**os.environ, "BERTSTREAM_BROKER_URL": redis_url,
           "BERTSTREAM_DATABASE_URL": f"sqlite:///{tmp_path / 'results.db'}",
           "BERTSTREAM_CACHE_DIR": str(tmp_path / "cache")}
    if in_del:
        env["SLOW_IN_DEL"] = "1"
    return signal_while_importing([str(SCRIPT), *args], env, module, tmp_path, signal.SIGINT,
                                  cwd=tmp_path, preexec_fn=preexec_fn)


def test_the_console_script_is_the_entry_module() -> None:
    """The installed script starts in ``contract.entry`` (reinstall after changing
    pyproject.toml's scripts: ``pip install --no-deps -e .``)."""
    assert "from contract.entry import main" in SCRIPT.read_text()


@pytest.mark.parametrize(("module", "args"), [
    ("sqlalchemy", ["--help"]),  # the CLI's own imports, before click runs
    ("redis", ["results"]),
    ("worker.cli", ["worker", "--help"]),  # a worker command's module, inside click
    ("torch.nn", ["worker"]),  # torch, imported as the worker command starts
])
def test_ctrl_c_during_start_up_exits_130_in_one_line(module: str, args: list[str],
                                                      tmp_path: Path, redis_url: str) -> None:
    pytest.importorskip(module.split(".")[0])
    done = _interrupt_while_importing(module, args, tmp_path, redis_url)
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, \
        done.stderr
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines() == ["error: interrupted"], done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(("module", "args"), [("redis", ["results"]),
                                              ("worker.cli", ["worker", "--help"])])
def test_ctrl_c_in_a_finalizer_during_start_up_is_not_lost(module: str, args: list[str],
                                                           tmp_path: Path,
                                                           redis_url: str) -> None:
    """Python only prints an exception raised in ``__del__`` ("Exception ignored in ...
    KeyboardInterrupt" and a traceback) and goes on: Ctrl-C while the garbage collector
    ran a finalizer (a Redis connection pool's, as a worker starts) was lost, and the
    command ran on. It is raised again once the finalizer is done."""
    done = _interrupt_while_importing(module, args, tmp_path, redis_url, in_del=True)
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, \
        done.stderr
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines() == ["error: interrupted"], done.stderr
