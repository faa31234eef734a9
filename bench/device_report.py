"""The short report of one device run (``bench/device.sh``), from the files it left in its out dir.

Reads ``steps.tsv`` (step, exit code, seconds), ``pytest.log`` (the GPU
tests' closing line), ``nvidia-smi.csv`` (sampled once a second during the
run), ``shape-cost.json`` (first and second pass of new batch shapes) and
every ``bench-*.json``; writes ``report.txt`` (the benchmark tables,
one per model shape, with the steps and the device's peak readings) and
``report.json`` (the same figures, machine-readable).

``python -m bench.device_report OUT_DIR``
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

from bench.report import header, table

_PYTEST_SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed|skipped|deselected|error).*?)\s*=*$")


def read_steps(out: Path) -> list[dict[str, Any]]:
    """The steps the script ran, in order, with their exit codes and durations."""
    path = out / "steps.tsv"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, rc, seconds = line.split("\t")
        steps.append({"step": name, "rc": int(rc), "seconds": float(seconds)})
    return steps


def pytest_summary(out: Path) -> str | None:
    """The GPU tests' closing line (``3 passed, 2 skipped in 9.1s``), if they ran."""
    path = out / "pytest.log"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _PYTEST_SUMMARY.match(line.strip())
        if m:
            found = m.group(1)
    return found


def gpu_peaks(out: Path) -> dict[str, Any] | None:
    """Peak utilisation, memory and power from the sampled ``nvidia-smi`` CSV."""
    path = out / "nvidia-smi.csv"
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.read_text(encoding="utf-8").splitlines(),
                               skipinitialspace=True))
    if not rows:
        return None

    def peak(prefix: str) -> float | None:
        key = next((k for k in rows[0] if k and k.startswith(prefix)), None)
        values = []
        for row in rows:
            raw = (row.get(key) or "").split(" ")[0] if key else ""
            try:
                values.append(float(raw))
            except ValueError:
                continue
        return max(values) if values else None

    return {"gpu": rows[0].get("name"), "samples": len(rows),
            "peak_utilization_pct": peak("utilization.gpu"),
            "peak_memory_used_mib": peak("memory.used"),
            "memory_total_mib": peak("memory.total"),
            "peak_power_w": peak("power.draw"), "peak_sm_clock_mhz": peak("clocks.current.sm")}


_STEP_NAMES = ("tokenize", "collate", "launch", "wait", "decode")


def where_time_goes(stages: dict[str, Any]) -> list[str]:
    """Milliseconds per 1,000 texts of each step: the bare model beside each worker count.

    The bare model's steps come from its median round; a worker's from its
    flush log lines (summed over processes, so over wall time for N > 1).
    """
    rows: list[tuple[str, dict[str, float], float]] = []
    bare = stages.get("bare") or {}
    if "steps" in bare:
        st = bare["steps"]
        rows.append(("bare model", {"tokenize": st["encode_s"], **{
            k: st[f"{k}_s"] for k in _STEP_NAMES[1:]}}, bare["texts"]))
    for count, run in (stages.get("pipeline_procs") or {"1": stages.get("pipeline")}).items():
        if not run or "tokenize_s" not in run.get("worker", {}):
            continue
        w = run["worker"]
        extra = {"other flush": w["infer_s"] - sum(w[f"{k}_s"] for k in _STEP_NAMES),
                 "commit": w["commit_s"]}
        rows.append((f"worker x{count}", {**{k: w[f"{k}_s"] for k in _STEP_NAMES}, **extra},
                     run["texts"]))
    if not rows:
        return []
    names = list(dict.fromkeys(k for _, steps, _ in rows for k in steps))
    out = ["where the time goes (ms per 1,000 texts):", "",
           "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, steps, texts in rows:
        cells = [f"{1e6 * steps[k] / texts:,.0f}" if k in steps else "" for k in names]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def build(out: Path) -> tuple[str, dict[str, Any]]:
    """The text report and its JSON twin for the run in ``out``."""
    shape_path = out / "shape-cost.json"
    shape_cost = json.loads(shape_path.read_text(encoding="utf-8")) if shape_path.is_file() else None
    doc: dict[str, Any] = {"steps": read_steps(out), "gpu_tests": pytest_summary(out),
                           "nvidia_smi": gpu_peaks(out), "shape_cost": shape_cost,
                           "benchmarks": {}}
    lines = ["# bertstream device run", ""]
    for step in doc["steps"]:
        state = "ok" if step["rc"] == 0 else f"FAILED (exit {step['rc']})"
        lines.append(f"- {step['step']}: {state}, {step['seconds']:.0f} s")
    lines.append(f"- GPU tests: {doc['gpu_tests'] or 'no summary line'}")
    smi = doc["nvidia_smi"]
    if smi:
        lines.append(f"- {smi['gpu']}: peak utilisation {smi['peak_utilization_pct']}%, memory "
                     f"{smi['peak_memory_used_mib']} of {smi['memory_total_mib']} MiB, power "
                     f"{smi['peak_power_w']} W ({smi['samples']} one-second samples)")
    else:
        lines.append("- nvidia-smi: no readings (no NVIDIA device)")
    if shape_cost:
        first, second = shape_cost["first"], shape_cost["second"]
        lines.append(f"- a new batch shape ({shape_cost['shapes']} random ones, median ms, "
                     f"first / second pass): collate {first['collate']:.2f} / "
                     f"{second['collate']:.2f}, launch {first['launch']:.2f} / "
                     f"{second['launch']:.2f}, wait {first['wait']:.2f} / {second['wait']:.2f}")
    for path in sorted(out.glob("bench-*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        shape = path.stem.removeprefix("bench-")
        doc["benchmarks"][shape] = {
            "complete": result.get("complete", True), "ratios": result.get("ratios", {}),
            "texts_per_s": {k: v.get("texts_per_s") for k, v in result["stages"].items()
                            if isinstance(v, dict) and "texts_per_s" in v},
        }
        lines += ["", f"## {shape}" + ("" if result.get("complete", True) else " (incomplete)"),
                  "", header(result), "", table(result), "", *where_time_goes(result["stages"])]
    return "\n".join(lines) + "\n", doc


def main(argv: list[str] | None = None) -> int:
    """Write ``report.txt`` and ``report.json`` into the out dir given; print the text."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.device_report OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    text, doc = build(out)
    (out / "report.txt").write_text(text, encoding="utf-8")
    (out / "report.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
