"""The README's first command, on the tiny model: with Redis, and without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from contract.settings import Settings
from worker.demo import load_samples, run_demo

pytestmark = pytest.mark.slow


def test_samples_are_labelled_zh_and_en() -> None:
    samples = load_samples()
    assert len(samples) == 100
    assert {s["lang"] for s in samples} == {"zh", "en"}
    assert {s["label"] for s in samples} == {"positive", "negative"}


def run(settings: Settings) -> list[str]:
    lines: list[str] = []
    assert run_demo(settings, repeat=2, echo=lines.append) == 0
    return lines


def test_demo_on_redis(redis_url: str, sqlite_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    lines = run(Settings(broker_url=redis_url, database_url=sqlite_url,
                         model=str(tiny_model_dir), cache_dir=str(tmp_path)))
    text = "\n".join(lines)
    assert "submitted 200 texts (100 distinct, each 2 times)" in text
    assert "throughput:" in text and "p99" in text
    assert "in-memory" not in text
    accuracy = [line for line in lines if line.startswith("accuracy on the")]
    assert len(accuracy) == 2 and all(line.endswith("(50 distinct texts)") for line in accuracy)
    client = redis.Redis.from_url(redis_url)
    try:
        left = [k for k in client.scan_iter(match="*") if b"bertstream_demo." in k]
    finally:
        client.close()
    assert left == []  # no _kombu.binding.bertstream_demo.* keys, no lanes, no heartbeat


def test_demo_without_redis_runs_in_memory(sqlite_url: str, tiny_model_dir: Path,
                                           tmp_path: Path) -> None:
    lines = run(Settings(broker_url="redis://127.0.0.1:1/0", database_url=sqlite_url,
                         model=str(tiny_model_dir), cache_dir=str(tmp_path)))
    assert lines[0].startswith("Redis is not reachable at redis://127.0.0.1:1/0")
    assert "in-memory transport" in lines[0]
    assert any("submitted 200 texts" in line for line in lines)
