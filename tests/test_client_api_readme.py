"""The README's Python client examples run as written, against a real worker."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from contract.settings import Settings
from producer import Client

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block_after(marker: str) -> str:
    """The first ```python block of the README after the line ``marker``."""
    text = README.read_text(encoding="utf-8")
    found = re.search(re.escape(marker) + r".*?```python\n(.*?)```", text, re.S)
    assert found, f"no python block after {marker!r}"
    return found.group(1)


def test_the_readme_client_examples_run_as_written(
        settings: Settings, tiny_model_dir: Path, worker_factory: Any,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = settings.replace(model=str(tiny_model_dir))
    worker_factory(tiny)
    monkeypatch.setenv("BERTSTREAM_BROKER_URL", tiny.broker_url)
    monkeypatch.setenv("BERTSTREAM_DATABASE_URL", tiny.database_url)
    monkeypatch.setenv("BERTSTREAM_QUEUE", tiny.queue)

    scope: dict[str, Any] = {}
    exec(_python_block_after("Python client:"), scope)  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out.splitlines()
    results, task_id, report = scope["results"], scope["task_id"], scope["report"]
    assert report.accepted == 3 and report.errors == [] and "my-key-1" in report.ids
    assert list(results) == [task_id, *report.ids]
    assert all(r.status == "done" for r in results.values())
    assert printed[0].split()[0] in ("positive", "negative")
    assert printed[1].startswith("[{") and "'count': " in printed[1]  # the aggregate

    with Client(Settings.from_env()) as client:
        scope.update(client=client, task_id=task_id)
        exec(_python_block_after("### Long texts"), scope)  # noqa: S102
        assert client.windows(task_id) == []  # scored in one pass
        # "From Python (a web app erasing a user's texts, say)"
        counted = client.store.delete(ids=[task_id], dry_run=True)
        assert client.get(task_id) is not None and counted
        client.store.delete(ids=[task_id])
        assert client.get(task_id) is None


def test_the_readme_async_client_example_runs_as_written(
        settings: Settings, worker_factory: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    null = settings.replace(model="null")
    worker_factory(null)
    monkeypatch.setenv("BERTSTREAM_BROKER_URL", null.broker_url)
    monkeypatch.setenv("BERTSTREAM_DATABASE_URL", null.database_url)
    monkeypatch.setenv("BERTSTREAM_QUEUE", null.queue)

    exec(_python_block_after("From asyncio code"), {})  # noqa: S102 - the README's own code
    assert capsys.readouterr().out.split() == ["positive", "2"]  # the null model's label
