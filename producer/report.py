"""``bertstream report``: sentiment over time per source, drawn with matplotlib.

Bounded SQL aggregates give, per time bucket, the ``done`` rows of the
sources with the most rows and of all the others summed
(:func:`contract.queries.top_stats`), and the positive ones among them; the
picture has the share of positive on top and the volume below. matplotlib
is imported inside :func:`draw` only (the ``plot`` extra), with the Agg
backend, so the light client and servers without a display never load it.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from contract.constants import STATUS_DONE
from contract.errors import InvalidInput
from contract.queries import (
    _BUCKET_SECONDS,
    BUCKETS,
    MAX_BUCKETS,
    MAX_STATS_LIMIT,
    Filters,
    _bucket_expr,
    stats,
    top_stats,
)
from contract.results import ResultStore, results

#: Picture formats ``report`` writes (by the file's suffix).
IMAGE_SUFFIXES = (".png", ".svg")
#: Sources drawn with a line of their own by default (``report --limit``); the rest are
#: summed under ``OTHER``.
MAX_SOURCES = 8
OTHER = "(other)"
NO_SOURCE = "(none)"
#: Sans-serif fonts in order of preference: matplotlib takes each glyph from the first
#: that has it, so Chinese or Japanese source names render where a CJK font is
#: installed; fonts that are missing are passed over.
FONTS = ["DejaVu Sans", "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC",
         "Source Han Sans SC", "WenQuanYi Zen Hei", "Microsoft YaHei", "SimHei",
         "PingFang SC"]
PLOT_EXTRA_HINT = "report needs the plot extra: pip install 'bertstream[plot]'"


@dataclass
class Series:
    """One source's line: bucket starts (UTC), rows done and positive rows per bucket.

    :func:`collect` gives the buckets with rows; :func:`draw` draws them on every
    bucket of their span (:func:`gapless`).
    """

    source: str
    buckets: list[dt.datetime] = field(default_factory=list)
    volume: list[int] = field(default_factory=list)
    positive: list[int] = field(default_factory=list)

    @property
    def share(self) -> list[float]:
        """Positive rows / done rows, per bucket; NaN (a break in the line) where none."""
        return [p / v if v else math.nan for p, v in zip(self.positive, self.volume, strict=True)]


def collect(store: ResultStore, *, source: str | None = None, since: dt.datetime | None = None,
            until: dt.datetime | None = None, bucket: str = "1h",
            positive_label: str = "positive", limit: int = MAX_SOURCES) -> list[Series]:
    """The series to draw, one per source (most rows first), from bounded SQL aggregates.

    Only ``done`` rows count. The ``limit`` sources with the most rows get a
    series each; the others are summed into one ``(other)`` series, in SQL
    (:func:`contract.queries.top_stats`): a source per customer or feed makes
    thousands, and the reads stay at ``limit`` + 1 groups per bucket.
    """
    if bucket not in BUCKETS:
        raise InvalidInput(f"unknown bucket {bucket!r}; expected one of {', '.join(BUCKETS)}")
    if not 1 <= limit <= MAX_STATS_LIMIT:
        raise InvalidInput(f"limit must be 1 to {MAX_STATS_LIMIT}, not {limit}")
    base = Filters(source=source, status=STATUS_DONE, since=since, until=until)
    positive = replace(base, label=positive_label)
    done = top_stats(store, base, by="source", bucket=bucket, limit=limit)
    totals: dict[str | None, int] = {}
    for r in done.groups:
        totals[r["source"]] = totals.get(r["source"], 0) + r["count"]
    positives = _counts(store, positive, bucket, list(totals))
    cells: dict[str, dict[str, list[int]]] = {}
    for r in done.groups:
        cells.setdefault(_name(r["source"]), {})[r["bucket"]] = [
            r["count"], positives.get((r["bucket"], r["source"]), 0)]
    if done.other:  # the positive rows of the other sources: all of them less the kept ones'
        left = {r["bucket"]: r["count"] for r in stats(store, positive, by="status",
                                                       bucket=bucket)}
        for (start, _source), count in positives.items():
            left[start] = left.get(start, 0) - count
        cells[OTHER] = {r["bucket"]: [r["count"], left.get(r["bucket"], 0)] for r in done.other}
    ranked = sorted(totals, key=lambda s: (-totals[s], _name(s)))
    order = [_name(s) for s in ranked] + ([OTHER] if OTHER in cells else [])
    out = []
    for name in order:
        series = Series(name)
        for start in sorted(cells[name]):
            series.buckets.append(_parse_bucket(start))
            series.volume.append(cells[name][start][0])
            series.positive.append(cells[name][start][1])
        out.append(series)
    return out


def gapless(series: list[Series], bucket: str) -> list[Series]:
    """``series`` on one grid: every bucket from the first with rows to the last, 0 texts
    where a source had none, so a line drops to 0 (its share breaks) instead of being
    drawn across the empty buckets."""
    starts = _every_bucket([b for s in series for b in s.buckets], bucket)
    out = []
    for s in series:
        counts = dict(zip(s.buckets, zip(s.volume, s.positive, strict=True), strict=True))
        cells = [counts.get(start, (0, 0)) for start in starts]
        out.append(Series(s.source, list(starts), [c[0] for c in cells], [c[1] for c in cells]))
    return out


def _every_bucket(starts: list[dt.datetime], bucket: str) -> list[dt.datetime]:
    """Every bucket start from the first of ``starts`` to the last.

    The read checked its span against :data:`~contract.queries.MAX_BUCKETS` (a span
    that touches one bucket more at its ends); rows finished after now, the default
    ``until`` of that check, are the one way past it: refused rather than drawn.
    """
    if not starts:
        return []
    first, last = min(starts), max(starts)
    step = dt.timedelta(seconds=_BUCKET_SECONDS[bucket])
    count = (last - first) // step + 1
    if count > MAX_BUCKETS + 1:
        raise InvalidInput(f"{count:,} {bucket} buckets from {first.isoformat()} to "
                           f"{last.isoformat()}, over the limit of {MAX_BUCKETS:,}: narrow "
                           f"--since/--until or take a wider --bucket")
    return [first + i * step for i in range(count)]


def _name(source: str | None) -> str:
    return source if source is not None else NO_SOURCE


def _counts(store: ResultStore, filters: Filters, bucket: str,
            sources: list[str | None]) -> dict[tuple[str, str | None], int]:
    """Rows matching ``filters`` per (bucket, source), of ``sources`` only (None: the rows
    without a source): at most one group per source and bucket."""
    if not sources:
        return {}
    key, text = _bucket_expr(store, bucket)
    src = results.c.source
    named = [s for s in sources if s is not None]
    which = ([src.in_(named)] if named else []) + ([src.is_(None)] if None in sources else [])
    query = (sa.select(text.label("bucket"), src.label("source"), sa.func.count().label("n"))
             .where(*filters.clauses(), sa.or_(*which)).group_by(key, src))
    rows = store.run(lambda conn: conn.execute(query).mappings().all(), "cannot read results")
    return {(r["bucket"], r["source"]): int(r["n"]) for r in rows}


def _parse_bucket(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def draw(series: list[Series], out: Path, *, bucket: str = "1h", title: str | None = None,
         positive_label: str = "positive") -> list[Series]:
    """Write the picture of ``series`` to ``out`` (.png or .svg); give back what it drew:
    ``series`` with the empty buckets of their span as 0 texts (:func:`gapless`).

    Raises :class:`InvalidInput` for another suffix or a file that cannot be
    written, and :class:`ImportError` (with :data:`PLOT_EXTRA_HINT`) without matplotlib.
    """
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise InvalidInput(f"--out must end in {' or '.join(IMAGE_SUFFIXES)}, got {out.name!r}")
    drawn = gapless(series, bucket)
    plt = _pyplot()
    with plt.rc_context({"font.sans-serif": FONTS}):
        _plot(plt, drawn, out, bucket=bucket, title=title, positive_label=positive_label)
    return drawn


def _plot(plt: Any, series: list[Series], out: Path, *, bucket: str, title: str | None,
          positive_label: str) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    try:
        for s in series:
            line = top.plot(s.buckets, [100 * x for x in s.share], marker="o", markersize=3,
                            linewidth=1.5, label=s.source)[0]
            bottom.plot(s.buckets, s.volume, marker="o", markersize=3, linewidth=1.5,
                        color=line.get_color(), label=s.source)
        top.set_ylabel(f"{positive_label} (% of done)")
        top.set_ylim(-2, 102)
        top.grid(True, alpha=0.3)
        bottom.set_ylabel(f"texts per {bucket}")
        bottom.set_ylim(bottom=0)
        bottom.grid(True, alpha=0.3)
        bottom.set_xlabel("time (UTC)")
        starts = {b for s in series for b in s.buckets}
        if len(starts) == 1:  # matplotlib would widen a single date to years either side
            (start,) = starts
            width = dt.timedelta(seconds=_BUCKET_SECONDS[bucket])
            bottom.set_xlim(start - width, start + width)
        if series:
            top.legend(loc="upper left", fontsize="small", ncols=min(4, len(series)))
        else:
            top.text(0.5, 0.5, "no results match", ha="center", va="center",
                     transform=top.transAxes)
        top.set_title(title or f"Sentiment per source ({positive_label} share and volume)")
        fig.autofmt_xdate()
        fig.tight_layout()
        try:
            fig.savefig(out, dpi=100)
        except OSError as exc:
            raise InvalidInput(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(PLOT_EXTRA_HINT) from exc
    matplotlib.use("Agg")  # no display needed; also right on servers
    import matplotlib.pyplot as plt

    return plt
