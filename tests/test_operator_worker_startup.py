"""How a worker starts, as an operator reads it.

A worker stopped by SIGTERM while it loads its model (a supervisor restarting it, a
rollout): it died by the signal without a word, so the logs of a restart loop said
nothing of why it stopped. It now logs one line first, and still dies by the signal
(143 in a shell) with the queue untouched.

The real worker runs in a subprocess; a ``sitecustomize`` on its path holds the import
of the model's transformers module, which the load does (lazily), until the test has
sent SIGTERM, so the signal lands inside the load every time.
"""

from __future__ import annotations

import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import redis

from contract.liveness import live_workers
from contract.settings import Settings
from producer.client import Client
from tests.test_cli_interrupt_startup import signal_while_importing
from worker.process import free_port, settings_env

#: Imported by ``from_pretrained`` of a BERT model, not before.
LOADED_MODULE = "transformers.models.bert.modeling_bert"
LINE = "stopped by SIGTERM while loading the model; nothing was taken from the queue"


def test_sigterm_while_the_model_loads_is_logged_and_takes_nothing(
        redis_url: str, sqlite_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                        queue=f"bst-test-{uuid.uuid4().hex[:8]}", model=str(tiny_model_dir),
                        cache_dir=str(tmp_path / "cache"))
    with Client(settings) as client:
        [task_id] = client.submit_many(["waiting for a worker"]).ids
        queued = client.queue_length()
    assert queued == 1
    done = signal_while_importing(
        [sys.executable, "-m", "worker", "--device", "cpu"],
        {**settings_env(settings), "HF_HUB_OFFLINE": "1"}, LOADED_MODULE, tmp_path,
        signal.SIGTERM, cwd=Path(__file__).resolve().parents[1], merged=True)
    out = done.stdout
    assert done.returncode == -signal.SIGTERM, out  # as before: killed by the signal
    assert out.count(LINE) == 1, out
    assert "Traceback" not in out, out
    with Client(settings) as client:
        assert client.queue_length() == queued  # the task still waits, untouched
        assert client.get(task_id) is None


def test_two_models_in_directories_of_one_name_are_told_apart(
        redis_url: str, sqlite_url: str, tmp_path: Path, worker_factory: Any) -> None:
    """Two fine-tunes, each in a directory named ``model``: their rows differ by
    ``model_revision`` only, so the worker shows that revision where it shows the model
    (the heartbeat, the metrics) and its directory in the startup line."""
    from tests.tinybert import write_tiny_bert

    seen = []
    for seed in (1, 2):
        model_dir = write_tiny_bert(tmp_path / f"finetune-{seed}" / "model", seed=seed)
        settings = Settings(broker_url=redis_url, database_url=sqlite_url,
                            queue=f"bst-test-{uuid.uuid4().hex[:8]}", model=str(model_dir),
                            cache_dir=str(tmp_path / "cache"), max_wait_ms=20,
                            metrics_port=free_port())
        worker = worker_factory(settings)
        with Client(settings) as client:
            [task_id] = client.submit_many(["a text"]).ids
            row = client.wait([task_id], timeout=60)[task_id]
            with redis.Redis.from_url(redis_url) as r:
                [beat] = live_workers(r, settings.family)
        assert row.model == "model" and row.model_revision
        assert (beat["model"], beat["revision"]) == ("model", row.model_revision)
        assert (f'bertstream_model_info{{model="model",revision="{row.model_revision}"}} 1.0'
                in worker.metrics_text())
        assert f"model model ({model_dir}, rev {row.model_revision}) on cpu" in worker.log()
        worker.stop()
        seen.append(row.model_revision)
    assert seen[0] != seen[1]
