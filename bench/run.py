"""One benchmark run: every measurement, same model, same machine, one after another.

Order: padding and the bare model in this process (the model loaded once),
then bertstream's worker (end to end, then the open-loop loads), the naive
peer's worker, and the null-model worker. Only one worker process runs at a
time, so stages never share the CPU with each other.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import figures
from bench.bare import measure_bare, run_once
from bench.models import BenchModel, resolve_model
from bench.naive import publish_naive
from bench.openloop import measure_load
from bench.options import BenchOptions
from bench.padding import measure_padding
from bench.pipeline import measure_bertstream, measure_null
from bench.services import (
    ResultsProbe,
    WorkerGroup,
    WorkerProc,
    bench_broker_url,
    flush_redis,
    free_port,
)
from bench.workload import long_texts, social_texts, with_long_texts
from contract.results import ResultStore
from contract.settings import Settings

#: Longest any one stage may wait for its rows.
STAGE_TIMEOUT_S = 900.0


class BenchRun:
    """Holds the services of one run; :meth:`run` gives the result document."""

    def __init__(self, settings: Settings, opts: BenchOptions, stack: ExitStack,
                 workdir: Path, log: Any = print) -> None:
        self.opts = opts
        self.stack = stack
        self.workdir = workdir
        self.log = log
        self.run_id = uuid.uuid4().hex[:8]
        self.broker = bench_broker_url(settings.broker_url)
        db = opts.database_url or f"sqlite:///{workdir / 'bench.db'}"
        self.settings = settings.replace(
            broker_url=self.broker, database_url=db, queue=f"bench-{self.run_id}",
            device=opts.device, torch_threads=opts.threads)
        self.stages: dict[str, Any] = {}
        #: The bare stage's runner, kept for the rounds that alternate with bertstream's.
        self.runner: Any = None
        self.bare_rounds: list[dict[str, Any]] = []
        #: Called with the stages finished so far after each one (partial results survive a timeout).
        self.checkpoint: Any = _ignore
        self.texts = social_texts(opts.texts, opts.seed)

    # -- services -------------------------------------------------------

    def _open_services(self) -> None:
        flush_redis(self.broker)
        self.stack.callback(flush_redis, self.broker)
        self.store = ResultStore.from_url(self.settings.database_url)
        self.store.create_schema()
        self.stack.callback(self.store.close)
        self.probe = ResultsProbe(self.store)
        # On a shared database only this run's rows are removed.
        self.stack.callback(self.probe.delete, f"bench-{self.run_id}-")

    def start_worker(self, settings: Settings, module: str = "worker") -> WorkerProc:
        """Start a worker subprocess, registered for stopping, and wait until it answers."""
        name = module.rsplit(".", 1)[-1]
        if module == "worker":  # bertstream workers report their flushes as metrics
            settings = settings.replace(metrics_port=free_port())
        proc = WorkerProc(settings, self.workdir / f"{name}-{time.monotonic_ns()}.log",
                          module=module, name="bench")
        self.stack.callback(proc.stop)
        return proc.wait_ready()

    def start_workers(self, settings: Settings, count: int) -> WorkerGroup:
        """``count`` bertstream workers on one queue and device, as ``--procs-per-gpu`` starts.

        On the CPU the torch threads are shared out so the group uses the
        same cores as one process.
        """
        if settings.device == "cpu" and count > 1:
            settings = settings.replace(torch_threads=max(1, self.opts.threads // count))
        members = [WorkerProc(settings.replace(metrics_port=free_port()),
                              self.workdir / f"worker-{time.monotonic_ns()}-{k}.log",
                              name="bench") for k in range(count)]
        for member in members:
            self.stack.callback(member.stop)
        for member in members:
            member.wait_ready()
        return WorkerGroup(members)

    def prefix(self, stage: str) -> str:
        """Id prefix of one stage's rows."""
        return f"bench-{self.run_id}-{stage}-"

    # -- stages ---------------------------------------------------------

    def run(self, model: BenchModel) -> dict[str, Any]:
        """Run every stage not skipped; give the stage figures."""
        self._open_services()
        self.settings = self.settings.replace(model=str(model.path))
        steps = (("padding", self._in_process), ("pipeline", self._pipeline),
                 ("long", self._long), ("naive", self._naive), ("null", self._null),
                 ("http", self._http))
        for stage, step in steps:
            if self.opts.runs(stage) or (stage == "padding" and self.opts.runs("bare")):
                step()
                self.checkpoint(self.stages)
        return self.stages

    def _in_process(self) -> None:
        import torch

        from worker.device import resolve_placement
        from worker.runner import HFRunner

        placement = resolve_placement(self.opts.device, self.settings.dtype)
        if placement.device.type == "cpu":
            torch.set_num_threads(self.opts.threads)
        runner = HFRunner(Path(self.settings.model), placement, name="bench")
        if self.opts.runs("padding"):
            self.log("padding: tokenizing the social-media mix")
            texts = social_texts(self.opts.padding_texts, self.opts.seed + 7)
            lengths = [len(e.ids) for e in runner.encode(texts)]
            self.stages["padding"] = measure_padding(
                lengths, token_budget=self.settings.token_budget,
                max_batch_size=self.settings.max_batch_size,
                max_padding=self.settings.max_padding, fifo_size=self.opts.fifo_size)
        if self.opts.runs("bare"):
            self.log(f"bare: sweeping budgets {list(self.opts.budgets)}, then {len(self.texts)} texts")
            bare = measure_bare(runner, self.texts, budgets=self.opts.budgets,
                                sweep_texts=self.opts.sweep_texts,
                                max_padding=self.settings.max_padding)
            self.stages["bare"] = bare
            # The worker runs at the budget the bare model does best with.
            self.settings = self.settings.replace(token_budget=bare["best_budget"])
            self.runner = runner
        else:
            del runner
            gc.collect()

    def _pipeline(self) -> None:
        by_procs: dict[int, dict[str, Any]] = {}
        for count in self.opts.procs:
            self.log(f"bertstream: starting {count} worker process(es) "
                     f"({self.opts.threads} torch threads in all)")
            workers = self.start_workers(self.settings, count)
            by_procs[count] = result = self._rounds(workers, f"p{count}")
            if count == self.opts.procs[0] and self.opts.runs("openloop"):
                self._openloop(workers, result["texts_per_s"])
            workers.stop()
        self.stages["pipeline"] = by_procs[self.opts.procs[0]]
        self.stages["pipeline"]["lang_detect"] = lang_detect_cost(
            self.texts, self.stages["pipeline"]["texts_per_s"])
        if len(by_procs) > 1 or self.opts.procs != (1,):
            self.stages["pipeline_procs"] = {str(n): r for n, r in by_procs.items()}

    def _openloop(self, workers: WorkerGroup, max_rate: float) -> None:
        loads = []
        for k, fraction in enumerate(self.opts.loads):
            rate = fraction * max_rate
            self.log(f"open loop: {100 * fraction:.0f}% = {rate:.1f} texts/s "
                     f"for {self.opts.load_seconds:.0f} s")
            load = measure_load(self.settings, self.probe, workers, self.texts,
                                self.prefix(f"load{k}"), rate=rate,
                                seconds=self.opts.load_seconds, seed=self.opts.seed + k)
            loads.append({"fraction": fraction, **load})
        self.stages["openloop"] = {"max_wait_ms": self.settings.max_wait_ms, "loads": loads}

    def _long(self) -> None:
        """Short texts' latency with and without 5% long texts in the mix, side by side.

        Each mix runs at ``long_load`` of its own maximum (measured first,
        closed loop, on the same worker), so both loads keep the worker
        equally busy; the long texts take most of its time in the second.
        """
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.settings.model)
        count = max(1, round(self.opts.long_share * len(self.texts)))
        long = long_texts(count, lambda t: len(tokenizer(t, add_special_tokens=False).input_ids),
                          seed=self.opts.seed, tokens=self.opts.long_tokens)
        mixed, places = with_long_texts(self.texts, long, seed=self.opts.seed)
        self.log(f"long: starting a worker; {count} of {len(self.texts)} texts long "
                 f"({self.opts.long_tokens[0]}-{self.opts.long_tokens[1]} tokens)")
        # 5,000 English tokens are ~23,000 characters: room for the longest text
        settings = self.settings.replace(
            max_text_chars=max(self.settings.max_text_chars, max(map(len, long))))
        workers = self.start_workers(settings, 1)
        mixes: dict[str, Any] = {}
        plain: set[int] = set()
        for name, texts, where in (("base", self.texts, plain), ("long", mixed, places)):
            self.log(f"long: {name} mix, maximum rate ({len(texts)} texts end to end)")
            cap = measure_bertstream(settings, self.probe, workers, texts,
                                     self.prefix(f"long-{name}-max"), STAGE_TIMEOUT_S)
            rate = self.opts.long_load * cap["texts_per_s"]
            self.log(f"long: {name} mix at {100 * self.opts.long_load:.0f}% = {rate:.1f} "
                     f"texts/s for {self.opts.long_seconds:.0f} s")
            load = measure_load(settings, self.probe, workers, texts,
                                self.prefix(f"long-{name}-load"), rate=rate,
                                seconds=self.opts.long_seconds, seed=self.opts.seed,
                                long=where)
            mixes[name] = {"max_texts_per_s": cap["texts_per_s"], **load}
        workers.stop()
        base, with_long = mixes["base"]["short"]["p99_ms"], mixes["long"]["short"]["p99_ms"]
        self.stages["long"] = {
            "share": self.opts.long_share, "tokens": list(self.opts.long_tokens),
            "load": self.opts.long_load, "seconds": self.opts.long_seconds,
            "long_texts": self.settings.long_texts,
            "window_slice_ms": self.settings.window_slice_ms,
            "mixes": mixes, "short_p99_ratio": with_long / base if base else None,
        }

    def _rounds(self, workers: WorkerGroup, tag: str) -> dict[str, Any]:
        """bertstream end to end, alternating with the bare model, ``opts.rounds`` times.

        This machine's speed drifts by +-10% over a minute; alternating the two
        and comparing medians keeps that drift out of the ratio. The bare
        rounds of every worker count are pooled into the bare stage's median.
        """
        pipe_rounds: list[dict[str, Any]] = []
        runner = self.runner
        for k in range(self.opts.rounds):
            note = f" (round {k + 1}/{self.opts.rounds})" if self.opts.rounds > 1 else ""
            if runner is not None:
                self.log(f"bare: {len(self.texts)} texts{note}")
                self.bare_rounds.append(run_once(runner, self.texts,
                                                 token_budget=self.settings.token_budget,
                                                 max_padding=self.settings.max_padding))
            self.log(f"bertstream ({tag}): {len(self.texts)} texts end to end{note}")
            pipe_rounds.append(measure_bertstream(
                self.settings, self.probe, workers, self.texts,
                self.prefix(f"pipeline-{tag}-{k}"), STAGE_TIMEOUT_S))
        result = dict(median_round(pipe_rounds))
        result["rounds"] = [r["texts_per_s"] for r in pipe_rounds]
        result["processes"] = len(workers.members)
        if self.bare_rounds:
            bare = self.stages["bare"]
            bare.update(median_round(self.bare_rounds))
            bare["rounds"] = [r["texts_per_s"] for r in self.bare_rounds]
        return result

    def _naive(self) -> None:
        step = max(len(self.texts) // self.opts.naive_texts, 1)
        texts = self.texts[::step][: self.opts.naive_texts]
        self.log(f"naive: starting a worker; {len(texts)} texts one per message")
        worker = self.start_worker(self.settings, "bench.naive")
        prefix = self.prefix("naive")
        warm = [{"id": f"{prefix}warm-{i}", "text": t, "submitted_at": time.time()}
                for i, t in enumerate(texts[:4])]
        publish_naive(self.settings, warm)
        self.probe.wait_for(f"{prefix}warm-", len(warm), timeout=STAGE_TIMEOUT_S,
                            alive=worker.check_alive)
        prefix = f"{prefix}run-"
        items = [{"id": f"{prefix}{i}", "text": t, "submitted_at": time.time()}
                 for i, t in enumerate(texts)]
        t0 = time.time()
        publish_naive(self.settings, items)
        self.probe.wait_for(prefix, len(items), timeout=STAGE_TIMEOUT_S,
                            alive=worker.check_alive)
        worker.stop()
        rows = self.probe.rows(prefix)
        wall = self.probe.last_finished(prefix) - t0
        self.stages["naive"] = {
            "texts": len(items), "tokens": figures.tokens(rows), "seconds": wall,
            "texts_per_s": figures.rate(len(items), wall),
            "tokens_per_s": figures.rate(figures.tokens(rows), wall),
            "drain_texts_per_s": figures.drain_rate(rows),
        }

    def _null(self) -> None:
        null = self.settings.replace(model="null")
        for bulk, count in ((False, self.opts.null_single), (True, self.opts.null_bulk)):
            mode = "bulk" if bulk else "single"
            self.log(f"null pipeline: {count} texts in {mode} messages")
            texts = [self.texts[i % len(self.texts)] for i in range(count)]
            self.stages[f"null_{mode}"] = measure_null(
                null, self.probe, self.start_worker, texts, self.prefix(f"null-{mode}"),
                bulk=bulk, timeout=STAGE_TIMEOUT_S)


    def _http(self) -> None:
        try:
            import api.app  # noqa: F401 - the api extra is optional for the benchmark
        except ImportError as exc:
            self.stages["http"] = {"skipped": f"the api extra is not installed ({exc})"}
            self.log("http: skipped (pip install 'bertstream[api]')")
            return
        from bench.http import measure_http

        self.stages["http"] = measure_http(
            self.settings, self.probe, self.workdir, self.start_worker, self.texts,
            self.prefix("http"), single=self.opts.http_single, real=self.opts.http_real,
            concurrency=self.opts.http_concurrency, bulk_rounds=self.opts.http_bulk_rounds,
            timeout=STAGE_TIMEOUT_S, log=self.log)


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median texts/s (the lower middle one for an even count)."""
    ordered = sorted(rounds, key=lambda r: r["texts_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def machine_info() -> dict[str, Any]:
    """CPUs, CPU model, load average and library versions of this machine."""
    import torch

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "gpu": gpu,
            "loadavg": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def run_bench(settings: Settings, opts: BenchOptions, *, command: str = "bertstream bench",
              log: Any = print, checkpoint: Any = None) -> dict[str, Any]:
    """Run the benchmark; every process and key it creates is gone when this returns.

    ``checkpoint(document)``, when given, receives the result document so far
    (``complete`` false) after every stage.
    """
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    machine = machine_info()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bertstream-bench-")))
        bench = BenchRun(settings, opts, stack, workdir, log)
        model = resolve_model(opts.model, workdir, Path(settings.cache_dir))
        log(f"model: {model.name} ({model.kind}) at {model.path}")

        def document(stages: dict[str, Any], complete: bool) -> dict[str, Any]:
            final = bench.settings
            return {
                "started_at": started.isoformat(timespec="seconds"),
                "seconds": time.monotonic() - t0,
                "complete": complete,
                "command": command,
                "machine": machine,
                "device": opts.device,
                "threads": opts.threads,
                "model": {"name": model.name, "kind": model.kind, "note": model.note},
                "options": {k: (sorted(v) if isinstance(v, frozenset) else v)
                            for k, v in vars(opts).items() if k != "notes"},
                "settings": {k: v for k, v in final.public().items()
                             if k in ("max_wait_ms", "token_budget", "max_batch_size",
                                      "flush_every", "bulk_chunk_size", "database_url",
                                      "broker_url", "torch_threads")},
                "stages": stages,
            }

        if checkpoint is not None:
            bench.checkpoint = lambda stages: checkpoint(document(stages, False))
        stages = bench.run(model)
        return document(stages, True)


def _ignore(_stages: dict[str, Any]) -> None:
    return None


def lang_detect_cost(texts: Sequence[str], e2e_texts_per_s: float) -> dict[str, float]:
    """What the worker's language detection costs: microseconds a text, and its
    share of the end-to-end time a text takes (the detector runs inside the flush)."""
    from contract.lang import detect_lang

    t0 = time.perf_counter()
    for text in texts:
        detect_lang(text)
    per_text = (time.perf_counter() - t0) / max(len(texts), 1)
    share = per_text * e2e_texts_per_s if e2e_texts_per_s else float("nan")
    return {"us_per_text": round(per_text * 1e6, 2), "share_of_e2e": share}
