"""``bertstream report`` says so when no row holds the label whose share it draws.

A model whose labels are not ``positive`` (a Hugging Face model's ``POSITIVE`` or
``LABEL_1``), or a ``--positive-label`` typed in another case, drew a share of 0 % in
every bucket and said nothing: a picture of texts all negative. Now stderr names the
labels stored, and the picture is drawn as before.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from click.testing import CliRunner

import producer.cli as cli
from contract.results import ResultStore
from tests.producer_helpers import broker_settings, record

T0 = dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc)


def test_a_positive_label_no_row_holds_is_named_with_the_labels_stored(
        store: ResultStore, db_url: str, redis_url: str, tmp_path: Path) -> None:
    store.upsert([record(f"r{i}", label=("LABEL_1", "LABEL_0")[i % 2], source="web",
                         finished_at=T0 + dt.timedelta(minutes=i)) for i in range(6)]
                 + [record("f", status="failed", label=None, score=None, error="x",
                           finished_at=T0)])
    settings = broker_settings(redis_url, db_url)
    png = tmp_path / "r.png"
    drawn = CliRunner().invoke(cli.main, ["report", "--out", str(png), "--bucket", "1d"],
                               obj=settings)
    assert drawn.exit_code == 0, drawn.output
    assert "1 source(s), 1 bucket(s), 6 done text(s)" in drawn.stdout
    assert ("no done row in the range is labelled 'positive' (the labels stored: LABEL_0, "
            "LABEL_1): --positive-label picks one") in drawn.stderr, drawn.stderr
    assert png.stat().st_size > 0
    right = CliRunner().invoke(cli.main, ["report", "--out", str(png), "--positive-label",
                                          "LABEL_1"], obj=settings)
    assert right.exit_code == 0 and right.stderr == "", right.stderr
    # A range with no done row at all says nothing of labels.
    empty = CliRunner().invoke(cli.main, ["report", "--out", str(png), "--since",
                                          "2026-12-01"], obj=settings)
    assert empty.exit_code == 0 and empty.stderr == "", empty.stderr
