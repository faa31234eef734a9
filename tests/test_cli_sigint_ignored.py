"""A ``bertstream`` started with SIGINT ignored (``cmd &`` in a shell script, which
ignores SIGINT for its background jobs so that Ctrl-C at the terminal stops the script
alone) keeps ignoring it: the console script's Ctrl-C handling, which turns a Ctrl-C
during start-up into exit 130, must not take the place of an inherited SIG_IGN.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.test_cli_interrupt_startup import SCRIPT, SITECUSTOMIZE


def _ignoring_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_an_ignored_sigint_stays_ignored(tmp_path: Path, redis_url: str) -> None:
    """SIGINT sent while the command imports (held there by a ``sitecustomize``) is
    ignored, as the shell asked: the command runs to its end and exits 0."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker = tmp_path / "importing-redis"
    env = {"PATH": str(SCRIPT.parent), "PYTHONPATH": str(hook), "SLOW_IMPORT": "redis",
           "SLOW_MARKER": str(marker), "BERTSTREAM_BROKER_URL": redis_url,
           "BERTSTREAM_DATABASE_URL": f"sqlite:///{tmp_path / 'results.db'}",
           "BERTSTREAM_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([str(SCRIPT), "--version"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=_ignoring_sigint)
    try:
        for _ in range(1200):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()
        proc.send_signal(signal.SIGINT)
        marker.with_name(marker.name + ".released").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (proc.returncode, err)
    assert "interrupted" not in err, err
    assert "bertstream" in out.lower(), out
