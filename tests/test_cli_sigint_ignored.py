"""A ``bertstream`` started with SIGINT ignored (``cmd &`` in a shell script, which
ignores SIGINT for its background jobs so that Ctrl-C at the terminal stops the script
alone) keeps ignoring it: the console script's Ctrl-C handling, which turns a Ctrl-C
during start-up into exit 130, must not take the place of an inherited SIG_IGN.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.test_cli_interrupt_startup import _interrupt_while_importing


def _ignoring_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_an_ignored_sigint_stays_ignored(tmp_path: Path, redis_url: str) -> None:
    """SIGINT sent while the command imports (held there by a ``sitecustomize``) is
    ignored, as the shell asked: the command runs to its end and exits 0."""
    out = _interrupt_while_importing("redis", ["--version"], tmp_path, redis_url,
                                     preexec_fn=_ignoring_sigint)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert "interrupted" not in out.stderr, out.stderr
    assert "bertstream" in out.stdout.lower(), out.stdout
