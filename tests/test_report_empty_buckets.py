"""``bertstream report`` draws the buckets without rows as such, and one bucket on a sane axis.

matplotlib joins the points it is given: with only the buckets that had rows,
the volume line ran flat at 1 through empty minutes, and the share line
bridged them. The lines drawn are read back from the figure as it is saved.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import producer.cli as cli
from contract.results import ResultStore
from producer.report import collect, draw
from tests.producer_helpers import broker_settings, record

T0 = dt.datetime(2026, 11, 28, 15, 0, tzinfo=dt.timezone.utc)
MINUTES = [T0 + dt.timedelta(minutes=m) for m in range(5, 14)]  # 15:05 .. 15:13


def _rows() -> list[Any]:
    """One positive row of "feed" at 15:05, 15:09 and 15:13; one negative of "other" at 15:07."""
    rows = [record(f"feed-{m}", source="feed", label="positive",
                   finished_at=T0 + dt.timedelta(minutes=m, seconds=20)) for m in (5, 9, 13)]
    rows.append(record("other-7", source="other", label="negative",
                       finished_at=T0 + dt.timedelta(minutes=7, seconds=5)))
    return rows


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What each figure the report saves draws: per axis its y label, x limits and lines."""
    from matplotlib.figure import Figure

    drawn: list[dict[str, Any]] = []
    save = Figure.savefig

    def spy(fig: Figure, *args: Any, **kwargs: Any) -> Any:
        drawn.append({ax.get_ylabel(): {
            "xlim": ax.get_xlim(),
            "lines": {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                      for line in ax.get_lines()}} for ax in fig.axes})
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return drawn


def _same(values: list[float], expected: list[float]) -> bool:
    return len(values) == len(expected) and all(
        (math.isnan(v) and math.isnan(e)) or v == e for v, e in zip(values, expected, strict=True))


def test_empty_minutes_are_drawn_as_zero_volume_and_a_break_in_the_share(
        store: ResultStore, redis_url: str, db_url: str, tmp_path: Path,
        saved: list[dict[str, Any]]) -> None:
    store.upsert(_rows())
    settings = broker_settings(redis_url, db_url)
    result = CliRunner().invoke(cli.main, ["report", "--out", str(tmp_path / "x.png"),
                                           "--limit", "1", "--bucket", "1m"], obj=settings)
    assert result.exit_code == 0, result.output
    assert "2 source(s), 4 bucket(s), 4 done text(s)" in result.stdout  # buckets with rows

    (figure,) = saved
    volume = figure["texts per 1m"]["lines"]
    assert set(volume) == {"feed", "(other)"}
    assert volume["feed"] == (MINUTES, [1, 0, 0, 0, 1, 0, 0, 0, 1])
    assert volume["(other)"] == (MINUTES, [0, 0, 1, 0, 0, 0, 0, 0, 0])
    share = figure["positive (% of done)"]["lines"]
    nan = float("nan")
    assert share["feed"][0] == MINUTES
    assert _same(share["feed"][1], [100, nan, nan, nan, 100, nan, nan, nan, 100])
    assert _same(share["(other)"][1], [nan, nan, 0, nan, nan, nan, nan, nan, nan])


def test_draw_gives_back_every_bucket_of_the_span(store: ResultStore, tmp_path: Path) -> None:
    store.upsert(_rows())
    read = collect(store, bucket="1m", limit=1)
    assert [len(s.buckets) for s in read] == [3, 1]  # collect: the buckets with rows
    feed, other = draw(read, tmp_path / "x.svg", bucket="1m")
    assert (feed.source, other.source) == ("feed", "(other)")
    assert feed.buckets == other.buckets == MINUTES
    assert feed.volume == [1, 0, 0, 0, 1, 0, 0, 0, 1] and feed.positive == feed.volume
    assert other.volume == [0, 0, 1, 0, 0, 0, 0, 0, 0] and other.positive == [0] * 9
    assert math.isnan(feed.share[1]) and feed.share[0] == 1.0 and other.share[2] == 0.0
    assert draw([], tmp_path / "none.svg", bucket="1m") == []


def test_a_single_bucket_gets_an_axis_of_about_one_bucket_each_side(
        store: ResultStore, redis_url: str, db_url: str, tmp_path: Path,
        saved: list[dict[str, Any]]) -> None:
    import matplotlib.dates as mdates

    store.upsert([record("only", source="feed", finished_at=T0 + dt.timedelta(minutes=5))])
    settings = broker_settings(redis_url, db_url)
    for bucket, width in (("1m", dt.timedelta(minutes=1)), ("1h", dt.timedelta(hours=1)),
                          ("1d", dt.timedelta(days=1))):
        saved.clear()
        result = CliRunner().invoke(cli.main, ["report", "--out", str(tmp_path / "one.png"),
                                               "--bucket", bucket], obj=settings)
        assert result.exit_code == 0, result.output
        assert "1 source(s), 1 bucket(s), 1 done text(s)" in result.stdout
        (figure,) = saved
        low, high = (mdates.num2date(x) for x in figure[f"texts per {bucket}"]["xlim"])
        (start,), _ = figure[f"texts per {bucket}"]["lines"]["feed"]
        assert low < start < high, (bucket, low, start, high)
        # it was 2025 to 2029 whatever the bucket: matplotlib widens a single date by years
        assert high - low <= 2 * width + dt.timedelta(seconds=1), (bucket, low, high)


def test_rows_after_now_cannot_make_the_grid_unbounded(
        store: ResultStore, redis_url: str, db_url: str, tmp_path: Path) -> None:
    """--since alone checks the span up to now; a row finished far in the future (a
    worker's clock ahead) would make a grid of a bucket per minute up to it."""
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert([record("now", source="feed", finished_at=now - dt.timedelta(minutes=30)),
                  record("ahead", source="feed", finished_at=now + dt.timedelta(days=30))])
    since = (now - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    settings = broker_settings(redis_url, db_url)
    result = CliRunner().invoke(cli.main, ["report", "--out", str(tmp_path / "far.png"),
                                           "--since", since, "--bucket", "1m"], obj=settings)
    assert result.exit_code == 2, result.output
    assert "over the limit of 10,000" in result.stderr and "--bucket" in result.stderr
    assert not (tmp_path / "far.png").exists()
