"""A worker on a Redis that refuses Lua scripts says so at start, in one line, exit 2.

kombu's visibility restore releases its lock with a script, whatever
``BERTSTREAM_ATOMIC_RECEIVE`` says, so such a worker died at start with a traceback
(``Unrecoverable error: NoPermissionError``, or an unknown ``EVALSHA``). Real private
redis-servers refuse the scripts (:mod:`tests.scriptless_redis`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contract.settings import Settings
from tests.scriptless_redis import REFUSALS, refusing_server
from worker.process import settings_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", REFUSALS)
@pytest.mark.parametrize("atomic", ["true", "false"])
def test_a_worker_refuses_a_redis_without_scripts_in_one_line(
        kind: str, atomic: str, tmp_path: Path, sqlite_url: str, tiny_model_dir: Path) -> None:
    with refusing_server(kind, tmp_path) as (_server, url):
        settings = Settings(broker_url=url, database_url=sqlite_url,
                            model=str(tiny_model_dir), torch_threads=1)
        out = subprocess.run([sys.executable, "-m", "worker", "--device", "cpu"],
                             env={**settings_env(settings), "HF_HUB_OFFLINE": "1",
                                  "BERTSTREAM_ATOMIC_RECEIVE": atomic,
                                  "BERTSTREAM_BROKER_START_WAIT_S": "5"},
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "refuses Lua scripts" in errors[0] and "+@scripting" in errors[0], errors[0]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert ":pw@" not in errors[0]  # the password is masked
