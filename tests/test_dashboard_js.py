"""The dashboard's script (``api/static/app.js``) under node with a minimal DOM of its own
(``tests/dashboard_driver.js``), against a real ``bertstream serve`` on SQLite and
PostgreSQL: what its refreshes draw as the rows change under it."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.results import ResultRecord, ResultStore
from contract.settings import Settings

HERE = Path(__file__).parent
APP_JS = HERE.parent / "api" / "static" / "app.js"


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Callable[[str], Callable[[], dict[str, Any]]]]:
    """Start the script on a server URL; each call of the result runs one refresh (the
    first is the page's load) and returns what it drew. Stopped at teardown."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("the dashboard script test needs node (apt-get install -y nodejs)")
    procs: list[subprocess.Popen[str]] = []

    def start(url: str) -> Callable[[], dict[str, Any]]:
        proc = subprocess.Popen([node, str(HERE / "dashboard_driver.js"), str(APP_JS), url],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        first = [True]

        def refresh() -> dict[str, Any]:
            assert proc.stdin is not None and proc.stdout is not None
            if not first[0]:
                proc.stdin.write("next\n")
                proc.stdin.flush()
            first[0] = False
            line = proc.stdout.readline()
            assert line, f"the driver ended (exit {proc.poll()})"
            return dict(json.loads(line))

        return refresh

    yield start
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _rows(model: str, when: dt.datetime) -> list[ResultRecord]:
    return [ResultRecord(id=f"live{i}", text_sha256="0" * 64, text_chars=1, model=model,
                         status="done", finished_at=when, label="positive", score=0.9,
                         source="live") for i in range(3)]


def _per_bucket(drawn: dict[str, Any]) -> dict[str, int]:
    assert drawn["error"] == "", drawn
    out: dict[str, int] = {}
    for bar in drawn["bars"]:
        out[bar["bucket"]] = out.get(bar["bucket"], 0) + int(bar["count"])
    return out


def test_the_label_mix_follows_a_rescore_out_of_an_ended_bucket(
        settings: Settings, store: ResultStore, api_factory: Any, page: Any) -> None:
    """A re-score moves each task's latest row to a later bucket: the bucket that had
    ended loses the tasks, and the chart counts each task once."""
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert(_rows("m", now - dt.timedelta(minutes=20)))
    refresh = page(api_factory(settings).url)
    before = _per_bucket(refresh())
    assert list(before.values()) == [3]
    store.upsert(_rows("m2", dt.datetime.now(dt.timezone.utc)))
    after = _per_bucket(refresh())
    assert sum(after.values()) == 3 and len(after) == 1 and after.keys() != before.keys(), after
