"""Commands given the default model by a name: ``default``, or the name its rows are
stored under.

Rows of the default model carry its own name (``bertstream-sentiment-e5small``, or its
directory's), never ``default``; only its live workers tell that name (their
heartbeats). ``rescore --model default`` looked the done tasks up under ``default``,
found none, and sent the whole selection again on every run; with no such worker alive
it cannot know the name and is refused, as reads are. A submit to the stored name goes
to a queue of that name, which no worker serves: the hint says to name ``default``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from contract.results import ResultStore
from contract.settings import Settings
from producer.cli import main
from producer.client import Client
from tests.producer_helpers import lane_messages, record


def _cli(args: list[str], settings: Settings) -> Result:
    return CliRunner().invoke(main, args, obj=settings)


@pytest.fixture
def dsettings(redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path) -> Settings:
    """The default model is the tiny one: its rows are stored under its directory's name."""
    return Settings(broker_url=redis_url, database_url=sqlite_url,
                    queue=f"bst-rsd-{uuid.uuid4().hex[:8]}", cache_dir=str(tmp_path / "cache"),
                    model=str(tiny_model_dir), max_wait_ms=20)


def test_rescore_of_model_default_skips_the_tasks_the_default_model_did(
        dsettings: Settings, tiny_model_dir: Path, worker_factory: Any,
        redis_url: str) -> None:
    worker_factory(dsettings)
    with Client(dsettings) as client:
        ids = client.submit_many(["good hotel", "bad room"]).ids
        assert {r.model for r in client.wait(ids, timeout=60).values()} == {tiny_model_dir.name}
        # a third task scored by another model only: the one left to do
        store = ResultStore.from_url(dsettings.database_url)
        store.upsert([record("other-only", text="fine view")])
        store.close()
    result = _cli(["rescore", "--model", "default", "--no-progress"], dsettings)
    assert result.exit_code == 0, result.output
    assert (f"re-scoring with default ({tiny_model_dir.name}): sent 1 task(s) in 1 message(s), "
            "2 already scored by it, 0 refused") in result.stdout
    assert "warning" not in result.stderr  # its workers are alive

    # the stored name is no model to send to: said so (rescore's --model is required)
    by_name = _cli(["rescore", "--model", tiny_model_dir.name, "--no-progress"], dsettings)
    assert by_name.exit_code == 0, by_name.output
    assert "is the name the default model's results are stored under" in by_name.stderr
    assert "give --model default" in by_name.stderr and "omit" not in by_name.stderr


def test_rescore_of_model_default_without_its_worker_alive_is_refused(
        dsettings: Settings, redis_url: str) -> None:
    store = ResultStore.from_url(dsettings.database_url)
    store.create_schema()
    store.upsert([record("a", text="one"), record("b", text="two")])
    store.close()
    result = _cli(["rescore", "--model", "default", "--no-progress"], dsettings)
    assert result.exit_code == 2, result.output
    assert "no worker of the default model is alive" in result.stderr
    assert lane_messages(redis_url, f"{dsettings.queue}.bulk") == []  # nothing was sent


def test_a_submit_to_the_default_models_stored_name_says_to_name_default(
        dsettings: Settings, tiny_model_dir: Path, worker_factory: Any,
        redis_url: str) -> None:
    worker_factory(dsettings)
    stored = tiny_model_dir.name
    sent = _cli(["submit", "x", "--model", stored], dsettings)
    assert sent.exit_code == 0, sent.output  # sent all the same: a worker may serve it later
    [msg] = lane_messages(redis_url, f"{dsettings.queue}-{stored}.interactive")
    assert [it["id"] for it in msg["items"]] == sent.stdout.split()
    [warning] = sent.stderr.splitlines()
    assert f"{stored!r} is the name the default model's results are stored under" in warning
    assert "omit --model, or give --model default" in warning

    waited = _cli(["submit", "y", "--model", stored, "--wait", "--timeout", "0.5"], dsettings)
    assert waited.exit_code == 4, waited.output
    assert "omit --model, or give --model default" in waited.stderr.splitlines()[-1]
    assert "start one with `bertstream worker`" not in waited.stderr


def test_db_delete_of_model_default_deletes_the_default_models_rows(
        dsettings: Settings, tiny_model_dir: Path, worker_factory: Any) -> None:
    worker = worker_factory(dsettings)
    with Client(dsettings) as client:
        ids = client.submit_many(["good hotel", "bad room"]).ids
        client.wait(ids, timeout=60)
    store = ResultStore.from_url(dsettings.database_url)
    store.upsert([record("other-only", text="fine view")])  # another model's row stays
    store.close()
    dry = _cli(["db", "delete", "--model", "default"], dsettings)
    assert dry.exit_code == 0, dry.output
    assert "would delete 2 row(s) of 2 task(s)" in dry.stdout
    done = _cli(["db", "delete", "--model", "default", "--yes"], dsettings)
    assert "deleted 2 row(s) of 2 task(s)" in done.stdout, done.output
    with Client(dsettings) as client:
        assert [r.id for r in client.query()] == ["other-only"]

    worker.stop(timeout=15)  # a clean stop deletes its heartbeat: no worker tells the name
    refused = _cli(["db", "delete", "--model", "default", "--yes"], dsettings)
    assert refused.exit_code == 2, refused.output
    assert "no worker of the default model is alive" in refused.stderr
