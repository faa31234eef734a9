"""The text search ``q`` folds case the same way on SQLite and PostgreSQL, in every script:
the query goes through the database's ``lower()`` as the column does (PostgreSQL's maps each
character alone, SQLite's is Python's), and the letters those still leave apart (final
sigma, dotted capital I, sharp s) are folded alike on both."""

from __future__ import annotations

import datetime as dt

from api.dashboard import search
from contract.queries import Filters
from contract.results import ResultRecord, ResultStore

TEXTS = {"greek": "Η ΟΔΟΣ ήταν κλειστή", "caps": "STRASSE gesperrt", "turkish": "İSTANBUL güzel",
         "sharp": "die Straße", "cjk": "这家酒店的服务很好", "wild": "100% sure_thing a\\b",
         "plain": "The room was SPOTLESS."}
FOUND = {
    "ΟΔΟΣ": {"greek"}, "οδος": {"greek"}, "οδοσ": {"greek"}, "Οδός": set(),  # accents differ
    "İSTANBUL": {"turkish"}, "istanbul": {"turkish"}, "İstanbul": {"turkish"},
    "straße": {"caps", "sharp"}, "STRASSE": {"caps", "sharp"}, "STRAẞE": {"caps", "sharp"},
    "酒店": {"cjk"}, "spotless": {"plain"}, "Room": {"plain"},
    # LIKE wildcards and the escape characters are literal
    "%": {"wild"}, "0%": {"wild"}, "_": {"wild"}, "e_t": {"wild"}, "\\": {"wild"},
    "a\\b": {"wild"}, "/": set(), "x%": set(), "s_r": set(), "o%m": set(),
}


def test_q_finds_the_same_rows_on_both_backends(store: ResultStore) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    store.upsert([ResultRecord(id=key, text_sha256="a" * 64, text_chars=len(text), text=text,
                               model="m", status="done", label="positive", score=0.9,
                               scores={"positive": 0.9}, finished_at=now)
                  for key, text in TEXTS.items()])
    got = {q: {r.id for r in search(store, Filters(), q=q)} for q in FOUND}
    assert got == FOUND
