"""``results --aggregate --format jsonl`` over no rows prints nothing, as ``results`` does.

It printed one blank line: a JSON-lines reader (``json.loads`` per line) fails on it,
where ``results --format jsonl`` of no rows writes no line at all.
"""

from __future__ import annotations

import json

from contract.results import ResultStore
from tests.producer_helpers import broker_settings, record
from tests.test_cli_option_edges import bertstream


def test_an_aggregate_of_no_rows_in_jsonl_is_no_line(redis_url: str, db_url: str,
                                                     store: ResultStore) -> None:
    store.upsert([record("a", source="web")])
    settings = broker_settings(redis_url, db_url)
    plain = bertstream(settings, "results", "--format", "jsonl", "--source", "nope")
    assert plain.returncode == 0 and plain.stdout == "", plain.stdout
    empty = bertstream(settings, "results", "--aggregate", "label", "--format", "jsonl",
                       "--source", "nope")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout == "", repr(empty.stdout)
    full = bertstream(settings, "results", "--aggregate", "source", "--format", "jsonl")
    lines = full.stdout.splitlines()
    assert [json.loads(x)["source"] for x in lines] == ["web"], full.stdout
