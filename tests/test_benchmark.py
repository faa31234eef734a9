"""Smoke tests of the benchmark machinery: structure and positive figures, never timings."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from bench import figures
from bench.bare import measure_bare
from bench.options import BenchOptions
from bench.padding import measure_padding
from bench.report import ratios, table, write_json
from bench.workload import social_lengths, social_texts
from contract.settings import Settings
from worker.app import build_runner


def test_workload_is_deterministic_mixed_and_long_tailed() -> None:
    texts = social_texts(500, seed=3)
    assert texts == social_texts(500, seed=3) and texts != social_texts(500, seed=4)
    zh = sum(1 for t in texts if "\u4e00" <= t[0] <= "\u9fff")
    assert 100 < zh < 300  # ~40% Chinese
    lengths = social_lengths(2000)
    assert figures.percentile(lengths, 50) < 25 and max(lengths) > 250


def test_options_quick_and_skip() -> None:
    quick = BenchOptions.build(quick=True, skip=("naive,null", "padding"))
    assert quick.texts == 200 and quick.skip == {"naive", "null", "padding"}
    assert not quick.runs("naive") and quick.runs("bare")
    with pytest.raises(ValueError, match="unknown stage"):
        BenchOptions.build(skip=("nope",))


def test_figures_from_rows() -> None:
    rows = [{"submitted_at": 0.0, "started_at": 1.0, "finished_at": 1.5, "tokens": 10},
            {"submitted_at": 0.5, "started_at": 1.0, "finished_at": 1.5, "tokens": 20},
            {"submitted_at": 1.0, "started_at": 2.0, "finished_at": 3.0, "tokens": 5}]
    lat = figures.latency_ms(rows)
    assert lat["p50_ms"] == pytest.approx(1500.0) and lat["max_ms"] == pytest.approx(2000.0)
    assert figures.drain_rate(rows) == pytest.approx(3 / 2.0)
    assert sorted(figures.flush_durations_ms(rows)) == pytest.approx([500.0, 1000.0])
    assert figures.tokens(rows) == 35 and math.isnan(figures.percentile([], 50))
    from types import SimpleNamespace

    from worker.inference import InferTimings
    from worker.metrics import WorkerMetrics

    metrics = WorkerMetrics("m")
    for n, (items, infer, commit) in enumerate(((300, 0.25, 0.010), (5, 0.05, 0.002))):
        metrics.observe(SimpleNamespace(
            messages=2 - n, batch_sizes=[items], batch_tokens=[items * 10], real_tokens=100,
            padded_tokens=104, infer_s=infer, persist_s=commit, encode_s=0.05 - 0.04 * n,
            steps=InferTimings(0.02, 0.1, 0.06, 0.01), began=0.0,
            rows=[("done", "s", None, 1.0)] * items))
    from prometheus_client import generate_latest

    totals = figures.metrics_totals(generate_latest(metrics.registry).decode())
    assert totals == pytest.approx(
        {"flushes": 2, "messages": 3, "items": 305, "infer_s": 0.3, "commit_s": 0.012,
         "tokenize_s": 0.06, "collate_s": 0.04, "launch_s": 0.2, "wait_s": 0.12,
         "decode_s": 0.02})
    assert figures.diff_totals({"items": 5.0}, {"items": 2.0}) == {"items": 3.0}


def test_padding_plan_beats_fifo(tiny_model_dir: Path) -> None:
    runner = build_runner(Settings(model=str(tiny_model_dir), device="cpu"))
    lengths = [len(e.ids) for e in runner.encode(social_texts(600))]
    pad = measure_padding(lengths, token_budget=4096, max_batch_size=256, max_padding=0.10,
                          fifo_size=32)
    assert 0 <= pad["plan_waste"] < pad["fifo_waste"]
    assert pad["real_tokens"] == sum(lengths)
    for window in (64, 256):
        assert pad[f"plan_waste_flush{window}"] <= 0.10 < pad["fifo_waste"]
        assert pad[f"plan_waste_flush{window}"] <= pad[f"uncapped_waste_flush{window}"]
        assert pad[f"plan_batches_flush{window}"] >= pad[f"uncapped_batches_flush{window}"]


def test_bare_and_report(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = build_runner(Settings(model=str(tiny_model_dir), device="cpu"))
    bare = measure_bare(runner, social_texts(40), budgets=(512, 2048), sweep_texts=20)
    assert [s["token_budget"] for s in bare["sweep"]] == [512, 2048]
    assert bare["best_budget"] in (512, 2048) and bare["texts"] == 40
    assert bare["texts_per_s"] > 0 and bare["tokens_per_s"] > 0 and bare["mean_batch_ms"] > 0
    pipeline = {"texts": 40, "texts_per_s": bare["texts_per_s"] / 2,
                "tokens_per_s": bare["tokens_per_s"] / 2, "p50_ms": 1.0, "p95_ms": 2.0,
                "p99_ms": float("nan")}
    result = {"stages": {"bare": bare, "pipeline": pipeline}}
    result["ratios"] = ratios(result)
    assert result["ratios"]["vs_bare"] == pytest.approx(0.5)
    assert "bertstream / bare" in table(result) and "MISS" in table(result)
    out = tmp_path / "r" / "latest.json"
    write_json(result, out)
    assert json.loads(out.read_text())["stages"]["pipeline"]["p99_ms"] is None


@pytest.mark.slow
def test_full_run_tiny(redis_url: str, tmp_path: Path) -> None:
    """Every stage on real Redis, a temp SQLite and real worker processes, tiny sizes."""
    from bench.run import run_bench

    settings = Settings(broker_url=redis_url, cache_dir=str(tmp_path / "cache"))
    opts = dataclasses.replace(
        BenchOptions.build(quick=True, model="tiny", texts=40, threads=1,
                           out=str(tmp_path / "out.json")),
        sweep_texts=20, naive_texts=10, null_single=100, null_bulk=600, load_seconds=1.0,
        padding_texts=200, rounds=2, http_single=200, http_real=10, http_bulk_rounds=2,
        long_seconds=2.0, long_share=0.1, long_tokens=(200, 600),
    )
    result = run_bench(settings, opts, log=lambda _msg: None)
    stages = result["stages"]
    assert set(stages) == {"padding", "bare", "pipeline", "openloop", "long", "naive",
                           "null_single", "null_bulk", "http"}
    long = stages["long"]
    assert long["mixes"]["base"]["long"]["texts"] == 0 and long["short_p99_ratio"] > 0
    mixed = long["mixes"]["long"]
    assert mixed["short"]["texts"] > 0 and mixed["short"]["p99_ms"] > 0
    assert all(t > 128 for t in mixed["long"]["tokens"])  # scored whole, past the maximum
    http = stages["http"]
    assert http["noop_requests_per_s"] > 0 and http["bulk"]["ratio"] > 0
    for name in ("single_null", "single_model"):
        assert http[name]["texts_per_s"] > 0 and http[name]["p99_ms"] > 0, name
    # The worker's figures come from its metrics: every text of the stage is counted.
    worker = stages["pipeline"]["worker"]
    assert worker["items"] == 40 and worker["flushes"] >= 1 and worker["tokenize_s"] > 0
    for name in ("bare", "pipeline", "naive", "null_single", "null_bulk"):
        assert stages[name]["texts_per_s"] > 0, name
    assert stages["pipeline"]["failed"] == 0 and stages["pipeline"]["p99_ms"] > 0
    # bare and bertstream alternate; the medians are the rounds' lower middle
    assert len(stages["bare"]["rounds"]) == len(stages["pipeline"]["rounds"]) == 2
    assert stages["pipeline"]["texts_per_s"] == min(stages["pipeline"]["rounds"])
    assert [load["fraction"] for load in stages["openloop"]["loads"]] == [0.25, 0.5, 0.75]
    assert all(load["bound_ms"] > 0 for load in stages["openloop"]["loads"])


@pytest.mark.parametrize("args, expected", [
    (["--database-url", "sqlite:////tmp/b.db", "bench", "--quick"], "sqlite:////tmp/b.db"),
    (["bench", "--quick", "--database-url", "sqlite:////tmp/b.db"], "sqlite:////tmp/b.db"),
    (["bench", "--quick"], None),  # the environment's database is never the bench's
])
def test_bench_writes_where_the_command_line_says_only(
        monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str | None) -> None:
    from click.testing import CliRunner

    import bench
    from producer.cli import main

    seen: dict[str, object] = {}

    def fake_main(_settings: Settings, **options: object) -> int:
        seen.update(options)
        return 0

    monkeypatch.setattr(bench, "main", fake_main)
    result = CliRunner().invoke(main, args,
                                env={"BERTSTREAM_DATABASE_URL": "sqlite:////tmp/prod.db"})
    assert result.exit_code == 0, result.output
    assert seen["database_url"] == expected
