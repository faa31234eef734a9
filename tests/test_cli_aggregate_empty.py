"""``results --aggregate`` over no rows says so, as ``results`` does.

The table printed its header and rule with nothing under them, which reads as a
rendering fault; CSV keeps its header (a file a script reads) and JSON its ``[]``.
"""

from __future__ import annotations

import json

from tests.producer_helpers import broker_settings
from tests.test_cli_option_edges import bertstream


def test_an_aggregate_of_no_rows_says_no_results(redis_url: str, sqlite_url: str) -> None:
    settings = broker_settings(redis_url, sqlite_url)
    table = bertstream(settings, "results", "--aggregate", "label", "--source", "nope")
    assert table.returncode == 0, table.stderr
    assert table.stdout.strip() == "(no results)", table.stdout
    as_csv = bertstream(settings, "results", "--aggregate", "source", "--format", "csv")
    assert as_csv.stdout.strip() == "source,count,mean_score", as_csv.stdout
    as_json = bertstream(settings, "results", "--aggregate", "lang", "--format", "json")
    assert json.loads(as_json.stdout) == [], as_json.stdout
