"""The device run's report, read back from the files a real H200 run left (bench/results)."""

from __future__ import annotations

from pathlib import Path

from bench.device_report import build, gpu_peaks, pytest_summary, read_steps

RUN = Path(__file__).resolve().parents[1] / "bench" / "results" / "gpu-h200-2026-11-30"


def test_report_of_a_real_device_run() -> None:
    steps = read_steps(RUN)
    assert [s["step"] for s in steps] == ["install", "imports", "redis", "models", "gpu-tests",
                                          "bench-e5-small", "bench-bert-base"]
    assert all(s["rc"] == 0 for s in steps)
    assert pytest_summary(RUN) == "3 passed in 42.90s"
    peaks = gpu_peaks(RUN)
    assert peaks is not None and peaks["gpu"] == "NVIDIA H200" and peaks["samples"] > 300
    assert 0 < peaks["peak_memory_used_mib"] < peaks["memory_total_mib"]
    text, doc = build(RUN)
    assert set(doc["benchmarks"]) == {"e5-small", "bert-base"}
    e5 = doc["benchmarks"]["e5-small"]
    assert e5["complete"] and e5["texts_per_s"]["bare"] > e5["texts_per_s"]["pipeline"] > 0
    assert "## e5-small" in text and "2 worker process(es) on the device" in text


def test_report_of_an_empty_out_dir(tmp_path: Path) -> None:
    text, doc = build(tmp_path)
    assert doc == {"steps": [], "gpu_tests": None, "nvidia_smi": None, "shape_cost": None,
                   "benchmarks": {}}
    assert "no summary line" in text and "no readings" in text
