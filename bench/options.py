"""What one benchmark run measures and how big each stage is."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: Stage names, in the order they run (``--skip`` takes these).
STAGES = ("padding", "bare", "pipeline", "openloop", "long", "naive", "null", "http")


@dataclass(frozen=True)
class BenchOptions:
    """Sizes and switches of one run; :meth:`build` derives them from the CLI flags."""

    model: str = "default"
    texts: int = 600
    out: Path = Path("bench/results/latest.json")
    database_url: str | None = None
    skip: frozenset[str] = frozenset()
    device: str = "cpu"
    threads: int = 2
    quick: bool = False
    seed: int = 0
    #: Token budgets the bare model tries (the best one is also the worker's).
    budgets: tuple[int, ...] = (1024, 2048, 4096, 8192)
    #: Texts per budget in the bare sweep; the best budget then runs on all texts.
    sweep_texts: int = 150
    #: Rounds of bare model / bertstream end to end, alternated; medians are reported.
    rounds: int = 3
    #: Worker process counts of the end-to-end stage (one run each, same device).
    procs: tuple[int, ...] = (1,)
    #: Texts the naive peer processes (a stride sample of the workload).
    naive_texts: int = 150
    #: Texts for the null pipeline: single-text messages, and bulk.
    null_single: int = 4000
    null_bulk: int = 40_000
    #: Open-loop loads (fractions of measured max) and seconds per load.
    loads: tuple[float, ...] = (0.25, 0.5, 0.75)
    load_seconds: float = 12.0
    #: Long texts: their share of the mix, their length in model tokens, the load
    #: (a fraction of each mix's own measured maximum) and its seconds per mix.
    long_share: float = 0.05
    long_tokens: tuple[int, int] = (500, 5_000)
    long_load: float = 0.5
    long_seconds: float = 60.0
    #: Fixed-count FIFO batch size compared with plan_batches.
    fifo_size: int = 32
    #: Texts in the padding comparison (tokenizer only, cheap).
    padding_texts: int = 5000
    #: HTTP stage: single-text POSTs (null model), with the real model, connections,
    #: and rounds of the bulk POST / submit_many comparison.
    http_single: int = 4000
    http_real: int = 200
    http_concurrency: int = 32
    http_bulk_rounds: int = 20
    notes: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, *, quick: bool = False, texts: int | None = None, model: str | None = None,
              out: str | None = None, database_url: str | None = None,
              skip: str | tuple[str, ...] | None = None, device: str | None = None,
              threads: int | None = None, rounds: int | None = None,
              procs: str | None = None) -> BenchOptions:
        """Options for the CLI flags; ``quick`` shrinks every stage to fit ~1 minute."""
        n = texts or (200 if quick else 600)
        dev = device or "cpu"
        names = _parse_skip(skip)
        base = cls(
            model=model or "default", texts=n, quick=quick, database_url=database_url,
            out=Path(out) if out else cls.out, skip=names, device=dev,
            threads=threads or min(os.cpu_count() or 1, 8), procs=_parse_procs(procs),
        )
        if rounds is not None:
            if rounds < 1:
                raise ValueError("--rounds must be at least 1")
            base = _replace(base, rounds=rounds)
        if quick:
            return _replace(base, budgets=(1024, 4096), sweep_texts=min(60, n), rounds=rounds or 1,
                            naive_texts=min(60, n), null_single=1500, null_bulk=10_000,
                            load_seconds=5.0, long_seconds=15.0, padding_texts=2000, http_single=1000,
                            http_real=min(60, n), http_bulk_rounds=8)
        if dev.startswith("cuda"):
            # A GPU runs the model ~100x faster: more texts so stages last long enough.
            return _replace(base, texts=texts or 20_000, sweep_texts=2000, naive_texts=300,
                            http_real=4000,
                            budgets=(8192, 16384, 32768, 65536))
        return _replace(base, sweep_texts=min(base.sweep_texts, n),
                        naive_texts=min(base.naive_texts, n))

    def runs(self, stage: str) -> bool:
        """True when ``stage`` is not skipped."""
        return stage not in self.skip


def _replace(opts: BenchOptions, **changes: object) -> BenchOptions:
    import dataclasses

    return dataclasses.replace(opts, **changes)  # type: ignore[arg-type]


def _parse_procs(spec: str | None) -> tuple[int, ...]:
    """``"1,2"`` → ``(1, 2)``: distinct positive counts, in the order given."""
    if not spec:
        return (1,)
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--procs-per-gpu expects counts like 1,2 (got {spec!r})")
    return tuple(dict.fromkeys(int(p) for p in parts))


def _parse_skip(skip: str | tuple[str, ...] | None) -> frozenset[str]:
    if not skip:
        return frozenset()
    raw = [skip] if isinstance(skip, str) else list(skip)
    names = {part.strip() for item in raw for part in item.split(",") if part.strip()}
    unknown = names - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) to skip: {sorted(unknown)}; known: {', '.join(STAGES)}")
    return frozenset(names)
