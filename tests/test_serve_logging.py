"""``bertstream serve`` writes bertstream's own log lines as ``bertstream worker`` does.

Nothing configured the ``api``/``contract``/``producer`` loggers under ``serve``: their
lines reached stderr through Python's last-resort handler, bare (``answering 503
broker_unavailable: ...`` with no time, level or logger, in journald or ``docker logs``
as in a terminal) and their INFO lines were dropped. ``serve`` now hands uvicorn its own
logging configuration plus a handler for them in the worker's format (time, level,
logger), at ``--log-level``; uvicorn's lines keep their form, and no line is written
twice. The refusal is real: a private redis-server stopped under ``serve`` subprocesses.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from bench.faults import RedisServer
from contract.settings import Settings
from worker.process import ServeProc

#: A line of the worker's format: ``2026-12-07 08:00:00,123 WARNING api.errors: ...``.
STAMPED = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
REFUSED = "answering 503 broker_unavailable: cannot reach Redis at "


def _refused_under_serve(redis_server: RedisServer, tmp_path: Path, *args: str) -> str:
    """``serve`` (``args``: more options) answering submits with Redis stopped, then
    stopped itself: its whole output."""
    settings = Settings(broker_url=redis_server.url,
                        database_url=f"sqlite:///{tmp_path / 'results.db'}",
                        queue=f"bst-logs-{uuid.uuid4().hex[:8]}")
    api = ServeProc(settings, tmp_path / "serve.log", *args).wait_ready()
    try:
        redis_server.stop()
        with httpx.Client(base_url=api.url, timeout=30) as http:
            for i in range(5):
                r = http.post("/v1/tasks", json={"text": f"the lamp {i}"})
                assert r.status_code == 503, r.text
    finally:
        api.stop()
    return api.log_path.read_text(errors="replace")


def test_a_refusal_under_serve_has_the_time_level_and_logger_of_a_worker_line(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """The refusal's line and its count at the stop carry the time, WARNING and
    ``api.errors``, once each; uvicorn's own lines are as uvicorn writes them."""
    out = _refused_under_serve(redis_server, tmp_path)
    refused = [line for line in out.splitlines() if "answering 503" in line]
    assert len(refused) == 2, out[-3000:]
    assert re.match(rf"{STAMPED}WARNING api\.errors: {re.escape(REFUSED)}", refused[0]), out
    assert re.match(rf"{STAMPED}WARNING api\.errors: answering 503 broker_unavailable: "
                    r"4 more like it since the last line", refused[1]), out
    assert re.search(r"^INFO:     Application startup complete\.$", out, re.M), out


def test_serve_log_level_error_hides_the_warnings(redis_server: RedisServer,
                                                  tmp_path: Path) -> None:
    """``--log-level error`` applies to bertstream's lines too: an outage's warnings are
    not written (a misconfiguration's errors would be)."""
    out = _refused_under_serve(redis_server, tmp_path, "--log-level", "error")
    assert "answering 503" not in out, out[-3000:]


@pytest.mark.parametrize("level, shown", [("info", True), ("warning", False)])
def test_info_lines_are_written_once_even_beside_a_root_handler(level: str,
                                                                 shown: bool) -> None:
    """An INFO line of ``contract`` (a transaction run again) is written at ``--log-level
    info``, not at ``warning``; a handler on the root logger (an operator's, a library's)
    gets no second copy."""
    code = (
        "import logging, logging.config, sys\n"
        "from api.cli import serve_log_config\n"
        "logging.basicConfig(stream=sys.stderr, format='ROOT %(message)s')\n"
        f"logging.config.dictConfig(serve_log_config({level!r}))\n"
        "logging.getLogger('contract.results').info('running the transaction again')\n"
        "logging.getLogger('uvicorn.error').info('uvicorn says')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    lines = run.stderr.splitlines()
    ours = [line for line in lines if "running the transaction again" in line]
    if shown:
        assert len(ours) == 1, run.stderr
        assert re.fullmatch(rf"{STAMPED}INFO contract\.results: running the transaction "
                            r"again", ours[0]), run.stderr
    else:
        assert ours == [], run.stderr
    assert "INFO:     uvicorn says" in lines, run.stderr
