"""The benchmark's output: one table on stdout and one JSON document."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TARGETS = {
    "http_vs_single": 1.5,
    "bulk_post": 1.15,
    "vs_bare": 0.90,
    "vs_naive": 5.0,
    "null_single": 2_000.0,
    "null_bulk": 20_000.0,
    "padding": 0.10,
}


def _num(value: Any, fmt: str = "{:,.1f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


def _lang_rows(pipeline: dict[str, Any]) -> list[str]:
    """The language detector's cost, as a share of the end-to-end time."""
    d = pipeline.get("lang_detect")
    if not d:
        return []
    return [f"| language detection in the flush | {d['us_per_text']:.1f} µs a text = "
            f"{100 * d['share_of_e2e']:.2f}% of the end-to-end time | "
            f"<= 5%{_mark(d['share_of_e2e'] <= 0.05)} |"]


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("  ok" if ok else "  MISS")


def _rounds(stage: dict[str, Any]) -> str:
    runs = stage.get("rounds") or []
    if len(runs) < 2:
        return ""
    return f"; median of {len(runs)} rounds: " + " / ".join(f"{x:,.1f}" for x in runs)


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """bertstream / bare and bertstream / naive, on texts/s and on tokens/s."""
    stages = result["stages"]
    out: dict[str, Any] = {}
    bs = stages.get("pipeline")
    for peer in ("bare", "naive"):
        other = stages.get(peer)
        if not bs or not other:
            continue
        out[f"vs_{peer}"] = bs["texts_per_s"] / other["texts_per_s"]
        out[f"vs_{peer}_tokens"] = bs["tokens_per_s"] / other["tokens_per_s"]
    bare = stages.get("bare")
    for count, run in (stages.get("pipeline_procs") or {}).items():
        if bare:
            out[f"vs_bare_procs{count}"] = run["texts_per_s"] / bare["texts_per_s"]
    return out


def table(result: dict[str, Any]) -> str:
    """The side-by-side table (markdown, readable on a terminal)."""
    s, r = result["stages"], result.get("ratios", {})
    lines = ["| measurement | figure | target |", "|---|---|---|"]

    def row(name: str, figure: str, target: str = "") -> None:
        lines.append(f"| {name} | {figure} | {target} |")

    if "bare" in s:
        b = s["bare"]
        row("1. bare model (limit)", f"{_num(b['texts_per_s'])} texts/s, "
            f"{_num(b['tokens_per_s'], '{:,.0f}')} tokens/s (budget {b['best_budget']})"
            + _rounds(b))
    if "naive" in s:
        n = s["naive"]
        row("2. naive Celery task", f"{_num(n['texts_per_s'])} texts/s, "
            f"{_num(n['tokens_per_s'], '{:,.0f}')} tokens/s")
    if "pipeline" in s:
        p = s["pipeline"]
        row("3. bertstream end to end", f"{_num(p['texts_per_s'])} texts/s, "
            f"{_num(p['tokens_per_s'], '{:,.0f}')} tokens/s; latency p50/p95/p99 "
            f"{_num(p['p50_ms'], '{:,.0f}')}/{_num(p['p95_ms'], '{:,.0f}')}/"
            f"{_num(p['p99_ms'], '{:,.0f}')} ms (all {p['texts']} submitted at once)"
            + _rounds(p))
        lines.extend(_lang_rows(p))
    lines.extend(_procs_rows(s, r))
    after_table = _http_rows(s)
    if "vs_bare" in r:
        row("   bertstream / bare", f"{r['vs_bare']:.2f}x (tokens/s {r['vs_bare_tokens']:.2f}x)",
            f">= 0.90x{_mark(r['vs_bare'] >= TARGETS['vs_bare'])}")
    if "vs_naive" in r:
        row("   bertstream / naive", f"{r['vs_naive']:.2f}x (tokens/s {r['vs_naive_tokens']:.2f}x)",
            f">= 5x{_mark(r['vs_naive'] >= TARGETS['vs_naive'])}")
    for mode in ("single", "bulk"):
        key = f"null_{mode}"
        if key in s:
            z = s[key]
            row(f"4. null pipeline, {mode} messages",
                f"{_num(z['texts_per_s'], '{:,.0f}')} texts/s (producer alone "
                f"{_num(z['publish_texts_per_s'], '{:,.0f}')}/s)",
                f">= {TARGETS[key]:,.0f}/s{_mark(z['texts_per_s'] >= TARGETS[key])}")
    if "padding" in s:
        d = s["padding"]
        row(f"5. padding waste, bertstream (cap {100 * d['max_padding']:.0f}%)",
            f"{100 * d['plan_waste_flush64']:.1f}% / {100 * d['plan_waste_flush256']:.1f}% "
            f"per 64/256-text flush ({100 * d['plan_waste']:.1f}% whole set)",
            f"<= 10%{_mark(d['plan_waste_flush64'] <= TARGETS['padding'])}")
        row("   padding waste, token budget only",
            f"{100 * d['uncapped_waste_flush64']:.1f}% / "
            f"{100 * d['uncapped_waste_flush256']:.1f}% per 64/256-text flush "
            f"({d['uncapped_batches_flush64']} vs {d['plan_batches_flush64']} batches per "
            f"{d['texts']} texts in 64-text flushes)")
        row(f"   padding waste, FIFO x{d['fifo_size']}", f"{100 * d['fifo_waste']:.1f}%")
    for load in s.get("openloop", {}).get("loads", []):
        pct = round(100 * load["fraction"])
        target = ""
        if pct == 50:
            target = f"p99 <= {_num(load['bound_ms'], '{:,.0f}')} ms{_mark(load['p99_within_bound'])}"
        row(f"6. open loop {pct}% ({load['rate']:.1f}/s)",
            f"p50 {_num(load['p50_ms'], '{:,.0f}')} ms, p99 {_num(load['p99_ms'], '{:,.0f}')} ms; "
            f"flush {_num(load['flush_p50_ms'], '{:,.0f}')} ms x {load['mean_flush_size']:.1f} texts",
            target)
    lines.extend(_long_rows(s))
    lines.extend(after_table)
    return "\n".join(lines)


def _long_rows(s: dict[str, Any]) -> list[str]:
    """The row of the long-text stage, when it ran."""
    long = s.get("long")
    if not long:
        return []
    base, mixed = long["mixes"]["base"], long["mixes"]["long"]
    ratio = long["short_p99_ratio"]
    return [f"| long texts: short texts' p99 at {100 * long['load']:.0f}% load, no long / "
            f"{100 * long['share']:.0f}% long ({long['tokens'][0]}-{long['tokens'][1]} tokens) | "
            f"{_num(base['short']['p99_ms'], '{:,.0f}')} / "
            f"{_num(mixed['short']['p99_ms'], '{:,.0f}')} ms = {_num(ratio, '{:.2f}')}x "
            f"({base['rate']:.1f} / {mixed['rate']:.1f} texts/s) | "
            f"<= 1.5x{_mark(ratio is not None and ratio <= 1.5)} |"]


def _http_rows(s: dict[str, Any]) -> list[str]:
    """Rows of measurement 7 (the HTTP API), when it ran."""
    h = s.get("http")
    if not h:
        return []
    if "skipped" in h:
        return [f"| 7. HTTP API | skipped: {h['skipped']} |  |"]
    out = [f"| 7. HTTP server limit (GET /healthz, {h['concurrency']} connections) | "
           f"{_num(h['noop_requests_per_s'], '{:,.0f}')} requests/s |  |"]
    ceiling = (s.get("null_single") or {}).get("texts_per_s")
    null = h.get("single_null") or {}
    if null:
        ratio = null["texts_per_s"] / ceiling if ceiling else None
        target = (f">= 1.5x{_mark(ratio >= TARGETS['http_vs_single'])}" if ratio else "")
        out.append(f"| 7. HTTP single-text POSTs end to end, null model | "
                   f"{_num(null['texts_per_s'], '{:,.0f}')} texts/s"
                   + (f" ({ratio:.2f}x the client's one message per text)" if ratio else "")
                   + f"; p50/p99 {_num(null['p50_ms'], '{:,.0f}')}/"
                   f"{_num(null['p99_ms'], '{:,.0f}')} ms | {target} |")
    real = h.get("single_model") or {}
    if real:
        out.append(f"| 7. HTTP single-text POSTs end to end, real model | "
                   f"{_num(real['texts_per_s'])} texts/s; p50/p99 {_num(real['p50_ms'], '{:,.0f}')}/"
                   f"{_num(real['p99_ms'], '{:,.0f}')} ms |  |")
    b = h.get("bulk") or {}
    if b:
        out.append(f"| 7. bulk POST of 256 items vs Client.submit_many | {b['http_ms']:.1f} ms vs "
                   f"{b['client_ms']:.1f} ms ({b['ratio']:.2f}x) | <= 1.15x"
                   f"{_mark(b['ratio'] <= TARGETS['bulk_post'])} |")
    return out


def _procs_rows(s: dict[str, Any], r: dict[str, Any]) -> list[str]:
    """One row per worker process count of the end-to-end stage (``--procs-per-gpu``)."""
    out = []
    for count, run in (s.get("pipeline_procs") or {}).items():
        ratio = r.get(f"vs_bare_procs{count}")
        figure = (f"{_num(run['texts_per_s'])} texts/s, p50/p99 {_num(run['p50_ms'], '{:,.0f}')}/"
                  f"{_num(run['p99_ms'], '{:,.0f}')} ms" + (f"; {ratio:.2f}x bare" if ratio else "")
                  + _rounds(run))
        out.append(f"|    {count} worker process(es) on the device | {figure} |  |")
    return out


def header(result: dict[str, Any]) -> str:
    """Machine, model and command lines above the table."""
    m = result["machine"]
    lines = [
        f"bertstream bench — {result['started_at']} — {result['seconds']:.0f} s",
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), load avg at start {m['loadavg']}, "
        f"device {result['device']}, torch {m['torch']} ({result['threads']} threads)",
        f"model: {result['model']['name']} ({result['model']['kind']})",
        f"command: {result['command']}",
    ]
    if result["model"].get("note"):
        lines.append(f"note: {result['model']['note']}")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` to ``path`` (parents created; NaN as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=2, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
