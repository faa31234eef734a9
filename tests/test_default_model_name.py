"""The model name ``default`` is the default model for producers too, as it is for
``worker --model default=PATH``: a task sent with ``model: "default"`` (API body, ``submit
--model default``, ``BERTSTREAM_MODEL_NAME=default``, ``Client.for_model("default")``)
travels on the default queue family, and the default model's worker stores it. It went to
``<queue>-default``, which no worker serves: the task waited for ever."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from api.app import Services
from contract.constants import DEFAULT_MODEL
from contract.settings import Settings
from producer.client import Client
from tests.conftest import REDIS_URL
from worker.process import settings_env


def _settings(**changes: Any) -> Settings:
    return Settings(broker_url=REDIS_URL, database_url="sqlite://",
                    queue=f"bst-default-{uuid.uuid4().hex[:8]}", **changes)


def default_model_settings(broker_url: str, database_url: str, tmp_path: Path,
                           model_dir: Path) -> Settings:
    """Settings on a queue family of their own with ``model_dir`` as the default model
    (``worker --model PATH``, which is ``default=PATH``)."""
    return Settings(broker_url=broker_url, database_url=database_url,
                    queue=f"bst-default-{uuid.uuid4().hex[:8]}",
                    cache_dir=str(tmp_path / "cache"), model=str(model_dir))


def serve_default_model(redis_url: str, database_url: str, tmp_path: Path, model_dir: Path,
                        worker_factory: Any, api_factory: Any) -> tuple[Settings, Any, Any]:
    """:func:`default_model_settings`, a worker of that default model and an API server
    on them: gives the settings, the worker and the server."""
    settings = default_model_settings(redis_url, database_url, tmp_path, model_dir)
    return settings, worker_factory(settings), api_factory(settings)


def test_settings_read_default_as_the_default_model() -> None:
    base = _settings()
    for built in (Settings(queue=base.queue, model_name=DEFAULT_MODEL),
                  base.replace(model_name=DEFAULT_MODEL),
                  Settings.from_env({"BERTSTREAM_MODEL_NAME": DEFAULT_MODEL},
                                    queue=base.queue)):
        assert built.model_name == ""
        assert built.family == base.queue
    assert base.replace(model_name="sentiment-v2").family == f"{base.queue}-sentiment-v2"


def test_client_and_api_lanes_read_default_as_the_default_model() -> None:
    settings = _settings()
    with Client(settings) as client:
        assert client.for_model(DEFAULT_MODEL) is client
        named = client.for_model("sentiment-v2")
        assert named.for_model(DEFAULT_MODEL).settings.family == settings.queue
    # A server whose own model is a named one: "default" still names the default model.
    services = Services(settings.replace(model_name="sentiment-v2"))
    try:
        assert services.settings_for(DEFAULT_MODEL).family == settings.queue
        with services.lane(DEFAULT_MODEL) as lane:
            assert lane.settings.family == settings.queue
            with services.lane(None) as own:
                assert own.settings.model_name == "sentiment-v2"
    finally:
        services.close()


def test_tasks_sent_to_model_default_are_scored_by_the_default_worker(
        redis_url: str, pg_url: str, tmp_path: Path, tiny_model_dir: Path,
        worker_factory: Any, api_factory: Any) -> None:
    settings, _, api = serve_default_model(redis_url, pg_url, tmp_path, tiny_model_dir,
                                           worker_factory, api_factory)
    with Client(settings) as client:
        ids = [client.submit("good hotel", model=DEFAULT_MODEL),
               client.for_model(DEFAULT_MODEL).submit("bad room"),
               *client.submit_many(["nice staff", "dirty"], model=DEFAULT_MODEL).ids]
        with Client(settings.replace(model_name=DEFAULT_MODEL)) as bound:
            ids.append(bound.submit("clean"))
        with httpx.Client(base_url=api.url, timeout=60) as http:
            one = http.post("/v1/tasks", json={"text": "friendly", "model": DEFAULT_MODEL})
            many = http.post("/v1/tasks", json={"items": ["awful", "great"],
                                                "model": DEFAULT_MODEL})
            assert one.status_code == 202 and many.status_code == 202, (one.text, many.text)
            ids += [one.json()["id"], *many.json()["ids"]]
            done = http.get(f"/v1/tasks/{one.json()['id']}", params={"wait": 30}).json()
            assert done["status"] == "done", done
        cli = []
        for args, env in ((["--model", DEFAULT_MODEL], {}),
                          ([], {"BERTSTREAM_MODEL_NAME": DEFAULT_MODEL})):
            run = subprocess.run(
                [sys.executable, "-c", "from producer.cli import main; main()", "submit",
                 "good", "--wait", "--timeout", "60", "--format", "json", *args],
                env={**settings_env(settings), **env}, capture_output=True, text=True,
                timeout=120)
            assert run.returncode == 0, run.stderr
            cli += [row["id"] for row in json.loads(run.stdout)]
        rows = client.wait(ids + cli, timeout=60)
    assert {r.status for r in rows.values()} == {"done"}
    assert {r.model for r in rows.values()} == {done["model"]} != {DEFAULT_MODEL}
