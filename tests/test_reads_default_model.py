"""A read of model ``default`` reads the default model's rows, as a submit to ``default``
sends to it: the rows carry the default model's own name (its directory's, or
``bertstream-sentiment-e5small`` for the bundled one), which the live workers of the
default queue family announce in their heartbeats. Such a read found nothing: rows are
never stored under ``default``. When no such worker is alive (or they announce several
names) the name cannot be known on the read side: the read is refused, saying so,
instead of answering nothing or guessing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner, Result

from contract.constants import DEFAULT_MODEL
from contract.liveness import HEARTBEAT_EVERY_S
from contract.results import ResultStore
from contract.settings import Settings
from producer.cli import main
from producer.client import Client
from tests.test_default_model_name import default_model_settings, serve_default_model


def _cli(args: list[str], settings: Settings) -> Result:
    return CliRunner().invoke(main, args, obj=settings)


def _json(args: list[str], settings: Settings) -> Any:
    out = _cli([*args, "--format", "json"], settings)
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def test_reads_of_model_default_find_the_default_models_rows(
        redis_url: str, pg_url: str, tmp_path: Path, tiny_model_dir: Path,
        worker_factory: Any, api_factory: Any) -> None:
    settings, worker, api = serve_default_model(redis_url, pg_url, tmp_path, tiny_model_dir,
                                                worker_factory, api_factory)
    stored = tiny_model_dir.name
    with Client(settings) as client:
        ids = client.submit_many(["good hotel", "bad room"], model=DEFAULT_MODEL).ids
        assert {r.model for r in client.wait(ids, timeout=60).values()} == {stored}
        # Another model scored the same tasks later: their latest rows are its own.
        store = ResultStore.from_url(pg_url)
        later = [dataclasses.replace(r, model="other", label="negative",
                                     finished_at=r.finished_at + dt.timedelta(seconds=1))
                 for r in client.get_many(ids).values()]
        store.upsert(later)
        store.close()
        assert {r.model for r in client.get_many(ids).values()} == {"other"}

        # Client reads
        assert {r.model for r in client.get_many(ids, model=DEFAULT_MODEL).values()} == {
            stored}
        assert client.get(ids[0], model=DEFAULT_MODEL).model == stored  # type: ignore[union-attr]
        assert {r.model for r in client.wait(ids, timeout=5, model=DEFAULT_MODEL).values()
                } == {stored}
        assert [r.model for r in client.query(model=DEFAULT_MODEL)] == [stored, stored]
        assert client.count(model=DEFAULT_MODEL) == 2
        assert [g["count"] for g in client.aggregate(by="model", model=DEFAULT_MODEL)] == [2]
        assert client.windowed(ids[0], DEFAULT_MODEL)[0].model == stored  # type: ignore[union-attr]

    # CLI reads
    assert [r["model"] for r in _json(["results", "--model", "default"], settings)] == [
        stored, stored]
    assert [r["model"] for r in _json(["results", "--model", "default", "--id", ids[0]],
                                      settings)] == [stored]
    assert [(g["model"], g["count"]) for g in _json(
        ["results", "--model", "default", "--aggregate", "model"], settings)] == [(stored, 2)]
    compared = _json(["compare", "--model", "default", "--model", "other"], settings)
    assert (compared["model_a"], compared["texts"]) == (stored, 2)

    # HTTP reads
    with httpx.Client(base_url=api.url, timeout=30) as http:
        def get(path: str, **params: Any) -> Any:
            r = http.get(path, params=params)
            assert r.status_code == 200, (path, r.text)
            return r.json()

        assert [r["model"] for r in get("/v1/results", model="default")["items"]] == [
            stored, stored]
        export = http.get("/v1/results", params={"model": "default", "format": "jsonl"})
        assert [json.loads(line)["model"] for line in export.text.splitlines()] == [
            stored, stored]
        assert [(g["model"], g["count"]) for g in get("/v1/stats", model="default",
                                                      by="model")["groups"]] == [(stored, 2)]
        assert get(f"/v1/tasks/{ids[0]}", model="default")["model"] == stored
        assert get(f"/v1/tasks/{ids[0]}/windows", model="default")["model"] == stored
        assert get("/v1/compare", a="default", b="other")["texts"] == 2
        assert [r["model"] for r in get("/v1/search", model="default")["items"]] == [
            stored, stored]

        # No worker of the default model alive: its name cannot be known; said, not guessed.
        worker.stop(timeout=15)
        time.sleep(HEARTBEAT_EVERY_S)  # the server reads the heartbeats again after that
        for path in ("/v1/results", "/v1/stats", f"/v1/tasks/{ids[0]}"):
            r = http.get(path, params={"model": "default"})
            assert r.status_code == 422, (path, r.text)
            assert "no worker of the default model is alive" in r.text, r.text
        assert http.get("/v1/results", params={"model": stored}).status_code == 200
    out = _cli(["results", "--model", "default"], settings)
    assert out.exit_code == 2, out.output
    assert "no worker of the default model is alive" in out.stderr
    assert "--aggregate model" in out.stderr and "Traceback" not in out.output


def test_default_model_workers_of_two_names_make_default_ambiguous(
        redis_url: str, sqlite_url: str, tmp_path: Path, tiny_model_dir: Path,
        worker_factory: Any) -> None:
    """Two workers serve the default family with different models (a switch under way):
    whose rows `default` means is not known, and the refusal names both."""
    other = tmp_path / "tiny-renamed"
    shutil.copytree(tiny_model_dir, other)
    settings = default_model_settings(redis_url, sqlite_url, tmp_path, tiny_model_dir)
    worker_factory(settings)
    worker_factory(settings.replace(model=str(other)))
    with Client(settings) as client:
        client.wait(client.submit_many(["fine"]).ids, timeout=60)
    out = _cli(["results", "--model", "default"], settings)
    assert out.exit_code == 2, out.output
    assert tiny_model_dir.name in out.stderr and "tiny-renamed" in out.stderr, out.stderr
