"""The chaos run (``python -m bench.chaos``), small and with a fixed seed, on each database.

Two workers (and one of a second model, sent every fourth message too), a producer with
bad items among its texts, and each fault kind at least once (kill -9, SIGTERM and
SIGSTOP of a worker, a Redis restart, the database taken away); on SQLite also a Redis
restart that loses its data, whose lost ids the producer must report and send again.
Every check of the run must pass: the script cannot rot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.process import die_with_parent

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_a_small_chaos_run_passes_every_check(db_url: str, tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    sqlite = db_url.startswith("sqlite")
    cmd = [sys.executable, "-m", "bench.chaos", "--duration", "20", "--texts", "1500",
           "--workers", "2", "--seed", "7", "--fault-interval", "1", "3",
           "--faults", "kill,term,freeze,redis,db", "--second-model",
           "--visibility-timeout", "6", "--idle", "8", "--drain-timeout", "120",
           "--chunk", "25", "--bad-every", "100", "--database-url", db_url,
           "--workdir", str(tmp_path / "run"), "--out", str(out), "--quiet"]
    if sqlite:
        cmd.append("--lossy-restart")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280,
                          check=False, preexec_fn=die_with_parent())
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    failed = [c for c in result["checks"] if not c["ok"]]
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-4000:],
                                                 proc.stderr[-4000:])
    kinds = {f["kind"] for f in result["faults"]}
    assert {"kill -9 worker", "SIGTERM worker", "SIGSTOP worker"} <= kinds
    assert any(k.startswith("redis restart") for k in kinds)
    assert kinds & {"sqlite locked", "pg sessions terminated", "pg connections cut"}
    figures = result["figures"]
    assert figures["texts"] == 1500 and figures["bad_items"] == 15
    assert figures["second_model_ids"] > 0
    if sqlite:
        assert "redis restart losing its data" in kinds
        assert any(c["check"] == "losses only from the lossy restart" for c in result["checks"])
