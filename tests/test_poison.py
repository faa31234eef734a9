"""Poison messages in one flush, in-process: each bad item ends as its own row, nothing raises.

Every test runs on SQLite and PostgreSQL with the tiny real BERT. The kinds
are the ones found by hand: lone surrogates, NUL, ids too long for the
column, a long Celery task id on a malformed message, absurd timestamps,
rows the database refuses, deadlines.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from contract.constants import ID_COLUMN_CHARS, STATUS_DONE, STATUS_EXPIRED, STATUS_FAILED
from contract.errors import ConfigError
from contract.results import ResultStore
from contract.settings import Settings
from worker.app import build_runner
from worker.flush import FlushProcessor, derived_key


class Recording:
    """The tiny model, remembering every text it was asked to tokenize."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, texts: list[str]) -> Any:
        self.seen.extend(texts)
        return self.inner.encode(texts)


@pytest.fixture
def runner(tiny_model_dir: Path) -> Recording:
    return Recording(build_runner(Settings(model=str(tiny_model_dir))))


@pytest.fixture
def processor(runner: Recording, store: ResultStore) -> FlushProcessor:
    s = Settings(model="tiny", database_url="sqlite://")
    return FlushProcessor(runner, store, s, worker_name="t@h")  # type: ignore[arg-type]


def rows(store: ResultStore) -> dict[str, Any]:
    return {r.id: r for r in store.query(limit=None)}


def good(i: int) -> dict[str, Any]:
    return {"id": f"good-{i}", "text": f"the hotel is good {i}", "submitted_at": time.time()}


def test_lone_surrogates_in_id_and_source_fail_alone(processor: FlushProcessor,
                                                     store: ResultStore) -> None:
    items = [good(0), {"id": "sb-poison-\ud800", "text": "good hotel"},
             {"id": "src-poison", "text": "good hotel", "source": "web\udcff"}, good(1)]
    stats = processor.process([("m1", [items])])
    got = rows(store)
    assert stats.unwritable == set()
    assert got["good-0"].status == got["good-1"].status == STATUS_DONE
    assert got["malformed-m1-1"].status == STATUS_FAILED
    assert "lone surrogate" in (got["malformed-m1-1"].error or "")
    assert got["src-poison"].status == STATUS_FAILED
    assert "source is not valid Unicode" in (got["src-poison"].error or "")
    assert len(got) == 4


def test_nul_and_overlong_ids_are_stored_under_a_derived_key(processor: FlushProcessor,
                                                            store: ResultStore) -> None:
    items = [{"id": "nul\x00id", "text": "good hotel"}, good(0),
             {"id": "x" * 150, "text": "good hotel"}]
    processor.process([("m2", [items])])
    got = rows(store)
    assert set(got) == {"malformed-m2-0", "good-0", "malformed-m2-2"}
    assert "control characters" in (got["malformed-m2-0"].error or "")
    assert "over the limit of 128" in (got["malformed-m2-2"].error or "")
    assert got["good-0"].status == STATUS_DONE


def test_a_long_task_id_on_a_malformed_message_fits_the_column(processor: FlushProcessor,
                                                              store: ResultStore) -> None:
    task_id = "t" * 300
    processor.process([(task_id, "not a list of items"), ("m3", [[good(0)]])])
    got = rows(store)
    key = derived_key(task_id, 0)
    assert len(key) <= ID_COLUMN_CHARS
    assert key == "malformed-" + hashlib.sha256(task_id.encode()).hexdigest()[:40] + "-0"
    assert "malformed message" in (got[key].error or "")
    assert got["good-0"].status == STATUS_DONE
    assert all(len(k) <= ID_COLUMN_CHARS for k in got)


@pytest.mark.parametrize("stamp", [1e300, -1.0, float("inf"), float("nan"), 10**400, "soon"])
def test_absurd_submitted_at_is_replaced_by_the_receive_time(
        processor: FlushProcessor, store: ResultStore, stamp: Any) -> None:
    before = time.time()
    items = [{"id": "odd-time", "text": "good hotel", "submitted_at": stamp}, good(0)]
    processor.process([("m4", [items])])
    got = rows(store)
    assert got["odd-time"].status == got["good-0"].status == STATUS_DONE
    submitted = got["odd-time"].submitted_at
    assert submitted is not None and submitted.timestamp() >= before - 1


def test_a_row_the_database_refuses_fails_alone(processor: FlushProcessor,
                                                store: ResultStore) -> None:
    """A text whose full row the database refuses is stored as a minimal failed row."""
    bad_text = "this row is refused by the database"
    _refuse_rows(store, text=bad_text)
    items = [good(0), {"id": "refused", "text": bad_text}, good(1)]
    stats = processor.process([("m5", [items])])
    got = rows(store)
    assert stats.unwritable == set() and stats.refused == 1
    assert got["good-0"].status == got["good-1"].status == STATUS_DONE
    assert got["refused"].status == STATUS_FAILED and got["refused"].text is None
    assert "the database refused this row" in (got["refused"].error or "")


def test_a_message_whose_rows_cannot_be_written_is_reported_unwritable(
        processor: FlushProcessor, store: ResultStore) -> None:
    """Refused even as a minimal row: the message is unwritable, its mates still commit."""
    bad_text = "refused in every form"
    _refuse_rows(store, sha=hashlib.sha256(bad_text.encode()).hexdigest())
    stats = processor.process([("m6", [[good(0), {"id": "never", "text": bad_text}]]),
                               ("m7", [[good(1)]])])
    got = rows(store)
    assert stats.unwritable == {"m6"}
    assert got["good-0"].status == got["good-1"].status == STATUS_DONE
    assert "never" not in got


def test_expired_tasks_never_reach_the_model(processor: FlushProcessor, runner: Recording,
                                             store: ResultStore) -> None:
    now = time.time()
    items = [{"id": "late", "text": "stale work", "submitted_at": now - 60,
              "expires_at": now - 1},
             {"id": "late-ttl", "text": "stale too", "submitted_at": now - 60, "ttl_s": 5},
             {"id": "in-time", "text": "fresh work", "expires_at": now + 600}]
    stats = processor.process([("m8", [items])])
    got = rows(store)
    assert stats.expired == 2
    assert got["late"].status == got["late-ttl"].status == STATUS_EXPIRED
    assert "expired" in (got["late"].error or "")
    assert got["in-time"].status == STATUS_DONE
    assert runner.seen == ["fresh work"]
    assert [r.id for r in store.query(status=STATUS_EXPIRED, limit=None)] != []


def test_a_bad_deadline_fails_the_item(processor: FlushProcessor, store: ResultStore) -> None:
    processor.process([("m9", [[{"id": "bad-deadline", "text": "x", "expires_at": "later"},
                                {"id": "bad-ttl", "text": "x", "ttl_s": -5}]])])
    got = rows(store)
    assert "expires_at must be a number" in (got["bad-deadline"].error or "")
    assert "ttl_s must be > 0" in (got["bad-ttl"].error or "")


def test_max_length_too_small_for_the_special_tokens_is_refused(tiny_model_dir: Path) -> None:
    """BERTSTREAM_MAX_LENGTH=1 used to switch truncation off silently."""
    with pytest.raises(ConfigError, match="MAX_LENGTH"):
        build_runner(Settings(model=str(tiny_model_dir), max_length=1))
    runner = build_runner(Settings(model=str(tiny_model_dir), max_length=3))
    enc = runner.encode(["the hotel is very good and the room is clean " * 20])[0]
    assert len(enc.ids) == 3 and enc.truncated


def _refuse_rows(store: ResultStore, *, text: str | None = None, sha: str | None = None) -> None:
    """A real database trigger that refuses rows with this text (or this text hash)."""
    column, value = ("text", text) if text is not None else ("text_sha256", sha)
    assert value is not None and "'" not in value
    with store.engine.begin() as conn:
        if store.engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TRIGGER refuse BEFORE INSERT ON bertstream_results "
                f"WHEN NEW.{column} = '{value}' BEGIN SELECT RAISE(ABORT, 'refused'); END")
        else:
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.{column} = '{value}' THEN RAISE EXCEPTION 'refused' "
                "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
            conn.execute(sa.text(
                "CREATE TRIGGER refuse BEFORE INSERT ON bertstream_results "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"))


def test_id_check_fast_path_agrees_with_the_full_check() -> None:
    """Printable ASCII ids skip the regex and the UTF-8 encode; every other id is checked in
    full. Random ids over control characters, Latin-1, surrogates and CJK give the same
    answer as the full check alone."""
    import random
    import re

    from contract.messages import ID_COLUMN_CHARS, id_problem, storable

    control = re.compile(r"[\x00-\x1f\x7f]")

    def full(value: str, limit: int) -> str | None:
        if not value.strip():
            return "is empty"
        limit = min(limit, ID_COLUMN_CHARS)
        if len(value) > limit:
            return f"is {len(value)} characters, over the limit of {limit}"
        if control.search(value):
            return "contains control characters"
        if not storable(value):
            return "is not valid Unicode (lone surrogate)"
        return None

    rng = random.Random(3)
    pool = [chr(c) for c in range(0x100)] + ["\ud800", "好", "\u2028", "\u00a0", "𠀀"]
    values = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(50_000)]
    values += ["a" * ID_COLUMN_CHARS, "a" * (ID_COLUMN_CHARS + 1), "ok id", "tab\there"]
    for limit in (8, ID_COLUMN_CHARS):
        differ = [v for v in values if id_problem(v, limit) != full(v, limit)]
        assert not differ, differ[:5]
