"""The ``bertstream`` console command's entry point: Ctrl-C while it starts exits quietly.

The command imports much before it runs (the CLI with SQLAlchemy and Redis), and
Ctrl-C during those imports raised KeyboardInterrupt outside the CLI's own handling:
a long traceback. Here the CLI is imported inside a ``try``; the CLI itself turns
Ctrl-C during a command's start (a worker's torch) into the same exit. This module
is in ``contract``, whose package imports nothing, so next to nothing runs before the
``try``.

Two places lose a KeyboardInterrupt raised in them: a finalizer (``__del__``, which
the garbage collector runs in the middle of large imports; Python only prints the
exception, "Exception ignored in"), and the initialisation of an extension module
that imports modules and drops their errors (torch's). Ctrl-C there was lost, and the
command ran on. :func:`on_sigint` waits until the main thread has left those places.
"""

from __future__ import annotations

import _thread
import signal
import sys
import time
from types import FrameType
from typing import Any

#: 128 + SIGINT, as shells report Ctrl-C (``contract.errors.EXIT_INTERRUPTED``, not
#: imported: that module is what may be interrupted).
EXIT_INTERRUPTED = 130
#: How long a held Ctrl-C waits for the main thread to leave a finalizer or an
#: extension module's initialisation, and how often it looks.
HOLD_S = 30.0
HOLD_POLL_S = 0.01

_main_thread = _thread.get_ident()
#: A Ctrl-C held by :func:`on_sigint` and not raised yet: the command may end first.
_held = False


def main() -> None:
    """Run the ``bertstream`` CLI; Ctrl-C before it handles one exits 130 in one line."""
    global _main_thread
    _main_thread = _thread.get_ident()
    # Only in place of Python's own handler: SIGINT ignored when the command started (a
    # shell script's background job, `cmd &`) stays ignored, as it was before this hook.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    previous = sys.unraisablehook

    def unraisable(report: Any) -> None:  # a KeyboardInterrupt Python could only print
        global _held
        if report.exc_type is not None and issubclass(report.exc_type, KeyboardInterrupt):
            _held = True
            _thread.start_new_thread(_deliver_when_free, (signal.SIGINT,))
            return
        previous(report)

    sys.unraisablehook = unraisable
    try:
        from producer.cli import main as cli

        cli()
    except KeyboardInterrupt:
        interrupted()
    except SystemExit:
        if _held:  # it ended before the held Ctrl-C came back: it was interrupted all the same
            interrupted()
        raise


def on_sigint(signum: int, frame: FrameType | None) -> None:
    """Python's own Ctrl-C (raise KeyboardInterrupt), but where the exception would be
    lost (:func:`_lost_in`) the signal is sent again once the main thread has left."""
    global _held
    if _lost_in(frame):
        _held = True
        _thread.start_new_thread(_deliver_when_free, (signum,))
        return
    _held = False
    raise KeyboardInterrupt


def _lost_in(frame: FrameType | None) -> bool:
    """True when ``frame`` or a caller is a finalizer or an extension module's
    initialisation (the loader's ``create_module``, or the ``exec_module`` of an
    ``ExtensionFileLoader``): a KeyboardInterrupt raised there may never reach the CLI."""
    while frame is not None:
        name = frame.f_code.co_name
        if name in ("__del__", "create_module"):
            return True
        if name == "exec_module" and \
                type(frame.f_locals.get("self")).__name__ == "ExtensionFileLoader":
            return True
        frame = frame.f_back
    return False


def _deliver_when_free(signum: int) -> None:
    """In a thread of its own: SIGINT again for the main thread once it has left every
    place :func:`_lost_in` names (if it enters one again, the signal waits again)."""
    deadline = time.monotonic() + HOLD_S
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(_main_thread)
        if frame is None:
            return  # the main thread is gone: the process is ending
        if not _lost_in(frame):
            break
        del frame
        time.sleep(HOLD_POLL_S)
    _thread.interrupt_main(signal.Signals(signum))


def interrupted() -> None:
    """Exit :data:`EXIT_INTERRUPTED` with one line on stderr, after a newline that closes
    a terminal's ``^C``. A second Ctrl-C meanwhile ends the process by the signal, still
    without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        sys.stderr.write(("\n" if sys.stderr.isatty() else "") + "error: interrupted\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or gone: the status says it
        pass
    sys.exit(EXIT_INTERRUPTED)
