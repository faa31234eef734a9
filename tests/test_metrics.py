"""A real worker's Prometheus metrics, scraped over HTTP after real flushes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contract.settings import Settings
from producer.client import Client
from worker.launcher import child_commands
from worker.metrics import MAX_SOURCES, WorkerMetrics
from worker.process import free_port


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.slow
def test_worker_serves_flush_metrics(settings: Settings, tiny_model_dir: Path,
                                     worker_factory: Any) -> None:
    port = free_port()
    s = settings.replace(model=str(tiny_model_dir), metrics_port=port)
    worker_factory(s)
    with Client(s) as client:
        report = client.submit_many([{"text": f"good hotel {i}", "source": "web"}
                                     for i in range(30)] + ["   x   ", "plain"], source="feed")
        bad = client.submit_many([{"text": "ok", "source": "web"}])  # a valid one more
        client.wait(report.ids + bad.ids, timeout=60)
    # A flush counts its items after its rows are committed (and, on PostgreSQL, after
    # the latest flags are settled in a second transaction): poll past that gap.
    deadline = time.monotonic() + 30
    while True:
        samples = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        if (samples.get(("bertstream_end_to_end_seconds_count", ())) == 33
                or time.monotonic() > deadline):
            break
        time.sleep(0.05)
    model = tiny_model_dir.name
    assert samples[("bertstream_items_total", (("model", model), ("source", "web"),
                                               ("status", "done")))] == 31
    assert samples[("bertstream_items_total", (("model", model), ("source", "feed"),
                                               ("status", "done")))] == 2
    assert samples[("bertstream_end_to_end_seconds_count", ())] == 33
    assert samples[("bertstream_queue_wait_seconds_count", ())] == 33
    assert samples[("bertstream_batch_size_sum", ())] == 33  # every text in one batch or another
    assert samples[("bertstream_inference_seconds_count", ())] >= 1
    assert samples[("bertstream_commit_seconds_count", ())] >= 1
    assert ("bertstream_queue_depth", (("lane", "interactive"),)) in samples
    assert samples[("bertstream_worker_up", ())] == 1


def test_source_labels_are_bounded() -> None:
    metrics = WorkerMetrics("m")
    labels = {metrics.source_label(f"s{i}") for i in range(MAX_SOURCES + 50)}
    assert len(labels) == MAX_SOURCES + 1 and "other" in labels
    assert metrics.source_label("s3") == "s3" and metrics.source_label(None) == ""


def test_launcher_children_get_consecutive_metrics_ports() -> None:
    children = child_commands(["0", "1"], Settings(metrics_port=9100), procs_per_gpu=2, host="h")
    assert [env["BERTSTREAM_METRICS_PORT"] for _, env in children] == ["9100", "9101", "9102",
                                                                       "9103"]
