"""``bertstream report``: the picture is read back and its series checked against SQL counts.

Runs on SQLite and PostgreSQL. With ``BERTSTREAM_TEST_REPORT_EXAMPLE=path`` set, the
picture drawn from this test's data is also copied there (the README's example).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import producer.cli as cli
from contract.results import ResultStore, results
from contract.settings import Settings
from producer.report import MAX_SOURCES, OTHER, collect, draw
from tests.producer_helpers import broker_settings, record

T0 = dt.datetime(2026, 11, 28, 0, 0, tzinfo=dt.timezone.utc)
HOURS = 24
#: Per source: rows per hour and the chance a row is positive.
SOURCES = {"twitter": (30, 0.35), "weibo": (20, 0.7), "reviews": (8, 0.55)}


def _fill(store: ResultStore) -> None:
    rng = random.Random(11)
    rows = []
    for source, (per_hour, p_pos) in SOURCES.items():
        for hour in range(HOURS):
            swing = 0.25 if hour >= 12 else 0.0  # the mood turns at noon
            for n in range(rng.randint(per_hour // 2, per_hour)):
                at = T0 + dt.timedelta(hours=hour, seconds=rng.randint(0, 3599))
                positive = rng.random() < min(0.95, p_pos + swing * (1 if source == "twitter" else -1))
                rows.append(record(f"{source}-{hour}-{n}", source=source, finished_at=at,
                                   label="positive" if positive else "negative",
                                   score=rng.uniform(0.5, 1.0)))
    # failed rows never count; nor do rows outside --since/--until
    rows += [record(f"fail-{i}", source="twitter", status="failed", error="bad",
                    finished_at=T0 + dt.timedelta(hours=i)) for i in range(5)]
    rows.append(record("early", source="twitter", finished_at=T0 - dt.timedelta(days=3)))
    store.upsert(rows)


def _sql_count(store: ResultStore, source: str, start: dt.datetime, label: str | None) -> int:
    c = results.c
    query = sa.select(sa.func.count()).where(
        c.source == source, c.status == "done", c.finished_at >= start,
        c.finished_at < start + dt.timedelta(hours=1))
    if label is not None:
        query = query.where(c.label == label)
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def _painted(png: Path) -> tuple[tuple[int, ...], float, int]:
    from matplotlib import image

    pixels = image.imread(str(png))
    rgb = pixels[..., :3]
    painted = float((rgb.sum(axis=-1) < 2.9).mean())  # share of pixels not (near) white
    colours = len({tuple(p) for p in (rgb[::7, ::7].reshape(-1, 3) * 255).astype(int).tolist()})
    return pixels.shape, painted, colours


def test_report_series_match_sql_counts_and_the_png_is_drawn(
    store: ResultStore, tmp_path: Path
) -> None:
    _fill(store)
    since = T0 - dt.timedelta(hours=1)
    series = collect(store, since=since, until=T0 + dt.timedelta(hours=HOURS), bucket="1h")
    drawn = draw(series, tmp_path / "report.png", bucket="1h")

    assert [s.source for s in drawn] == ["twitter", "weibo", "reviews"]  # most rows first
    for s in drawn:
        assert len(s.buckets) == HOURS
        assert s.buckets == sorted(s.buckets) and s.buckets[0] == T0
        for start, volume, positive in zip(s.buckets, s.volume, s.positive, strict=True):
            assert volume == _sql_count(store, s.source, start, None)
            assert positive == _sql_count(store, s.source, start, "positive")
    twitter = drawn[0]
    assert sum(twitter.share[12:]) / 12 > sum(twitter.share[:12]) / 12  # the turn is visible

    shape, painted, colours = _painted(tmp_path / "report.png")
    assert shape[:2] == (650, 1000)
    assert painted > 0.03 and colours > 8  # axes, three coloured lines, text: not blank

    example = os.environ.get("BERTSTREAM_TEST_REPORT_EXAMPLE")
    if example and store.engine.dialect.name == "sqlite":
        shutil.copyfile(tmp_path / "report.png", example)


def test_report_folds_small_sources_into_other(store: ResultStore) -> None:
    rows = [record(f"s{i}-{n}", source=f"s{i:02d}", finished_at=T0) for i in range(MAX_SOURCES + 3)
            for n in range(i + 1)]
    store.upsert(rows)
    series = collect(store, bucket="1d")
    assert len(series) == MAX_SOURCES + 1
    assert series[-1].source == OTHER
    assert series[-1].volume == [1 + 2 + 3]  # the three smallest sources
    assert sum(sum(s.volume) for s in series) == len(rows)


def test_report_reads_bounded_groups_however_many_sources(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 sources over two days, 3 drawn: each series (the (other) line too) matches
    direct SQL counts, and no read gives more than a group per drawn source and bucket
    plus the other one. It read a group per source and bucket (600 here; millions for a
    source per customer over weeks of hourly buckets), folding them in Python."""
    rng = random.Random(5)
    rows = []
    for i in range(300):
        for d in range(2):
            for n in range(1 + (i % 7 if i >= 3 else 20)):  # s000-s002 have the most rows
                rows.append(record(f"r{i}-{d}-{n}", source=f"s{i:03d}",
                                   finished_at=T0 + dt.timedelta(days=d, minutes=n),
                                   label="positive" if rng.random() < 0.4 else "negative"))
    rows.append(record("unnamed", finished_at=T0, label="positive"))  # no source: (other)
    store.upsert(rows)
    sizes: list[int] = []
    run = store.run

    def counted(work: Any, what: str) -> Any:
        got = run(work, what)
        if isinstance(got, list):
            sizes.append(len(got))
        return got

    monkeypatch.setattr(store, "run", counted)
    series = collect(store, bucket="1d", limit=3)
    assert sizes and max(sizes) <= (3 + 1) * 2, sizes
    assert [s.source for s in series] == ["s000", "s001", "s002", OTHER]
    days = [T0, T0 + dt.timedelta(days=1)]
    c = results.c
    for s in series:
        assert s.buckets == days
        for day, volume, positive in zip(s.buckets, s.volume, s.positive, strict=True):
            which = (c.source.in_(["s000", "s001", "s002"]).is_not(True) if s.source == OTHER
                     else c.source == s.source)
            query = sa.select(sa.func.count(), sa.func.count().filter(c.label == "positive")) \
                .where(which, c.finished_at >= day, c.finished_at < day + dt.timedelta(days=1))
            with store.engine.connect() as conn:
                assert (volume, positive) == tuple(conn.execute(query).one()), (s.source, day)
    assert sum(sum(s.volume) for s in series) == len(rows)


def _invoke(args: list[str], settings: Settings) -> object:
    return CliRunner().invoke(cli.main, args, obj=settings)


def test_report_command_writes_svg_and_png(
    store: ResultStore, db_url: str, redis_url: str, tmp_path: Path
) -> None:
    _fill(store)
    settings = broker_settings(redis_url, db_url)
    svg = tmp_path / "weibo.svg"
    result = CliRunner().invoke(cli.main, [
        "report", "--out", str(svg), "--source", "weibo", "--since", "2026-11-28T06:00",
        "--until", "2026-11-28T10:00Z", "--bucket", "1h"], obj=settings)
    assert result.exit_code == 0, result.output
    expected = sum(_sql_count(store, "weibo", T0 + dt.timedelta(hours=h), None) for h in range(6, 10))
    assert f"1 source(s), 4 bucket(s), {expected} done text(s)" in result.stdout
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 20  # glyphs, lines, ticks

    png = tmp_path / "all.png"
    result = CliRunner().invoke(cli.main, ["report", "--out", str(png), "--bucket", "1d"],
                                obj=settings)
    assert result.exit_code == 0, result.output
    total = sum(_sql_count(store, s, T0 + dt.timedelta(hours=h), None)
                          for s in SOURCES for h in range(HOURS))
    assert f"3 source(s), 2 bucket(s), {total + 1} done text(s)" in result.stdout  # + "early"
    assert _painted(png)[1] > 0.03

    result = CliRunner().invoke(cli.main, ["report", "--out", str(png), "--bucket", "1d",
                                           "--limit", "1"], obj=settings)
    assert result.exit_code == 0, result.output  # twitter, and (other): weibo and reviews
    assert f"2 source(s), 2 bucket(s), {total + 1} done text(s)" in result.stdout
    refused = CliRunner().invoke(cli.main, ["report", "--out", str(png), "--limit", "0"],
                                 obj=settings)
    assert refused.exit_code == 2 and "--limit" in refused.stderr
    helped = CliRunner().invoke(cli.main, ["report", "--help"], obj=settings)
    assert "--limit" in helped.stdout and "(other)" in helped.stdout


def test_report_on_an_empty_database_draws_an_empty_picture(
    redis_url: str, tmp_path: Path
) -> None:
    settings = broker_settings(redis_url, f"sqlite:///{tmp_path / 'none.db'}")
    result = CliRunner().invoke(cli.main, ["report", "--out", str(tmp_path / "e.png")],
                                obj=settings)
    assert result.exit_code == 0, result.output
    assert "0 source(s), 0 bucket(s), 0 done text(s)" in result.stdout
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_report_refuses_other_suffixes_and_says_what_to_install(
    redis_url: str, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = broker_settings(redis_url, sqlite_url)
    bad = CliRunner().invoke(cli.main, ["report", "--out", str(tmp_path / "r.jpg")], obj=settings)
    assert bad.exit_code == 2 and ".png or .svg" in bad.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were missing
    missing = CliRunner().invoke(cli.main, ["report", "--out", str(tmp_path / "r.png")],
                                 obj=settings)
    assert missing.exit_code == 2
    assert missing.stderr.strip() == "report needs the plot extra: pip install 'bertstream[plot]'"


def test_the_cli_does_not_import_matplotlib() -> None:
    code = ("import sys, producer.cli, producer.report\n"
            "assert 'matplotlib' not in sys.modules\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
