"""Property-based: whatever JSON arrives as a message's args, the flush never raises and
every item ends as exactly one row."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.results import ResultStore
from contract.settings import Settings
from worker.flush import FlushProcessor, parse_message
from worker.runner import NullRunner

# any JSON value (what kombu's json decoder can give), with the nasty strings
nasty = st.sampled_from(["\ud800", "a\x00b", "x" * 200, "\x1b[2J", "", " ", "ok"])
texts = st.one_of(st.text(), nasty)
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=20)
items = st.one_of(
    json_values,
    st.fixed_dictionaries({"id": st.one_of(texts, json_values), "text": st.one_of(texts, json_values)},
                          optional={"source": st.one_of(texts, json_values),
                                    "meta": json_values, "submitted_at": json_values,
                                    "expires_at": json_values, "ttl_s": json_values}),
)
args = st.one_of(json_values, st.lists(st.lists(items, min_size=1, max_size=6), min_size=1,
                                       max_size=1))

_ids = itertools.count()


@pytest.fixture
def prop_store(module_store: ResultStore) -> ResultStore:
    return module_store


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=args)
def test_any_args_give_one_row_per_item(prop_store: ResultStore, payload: Any) -> None:
    s = Settings(database_url="sqlite://")
    proc = FlushProcessor(NullRunner(), prop_store, s, worker_name="prop@h")
    mid = f"prop-{next(_ids)}"
    expected = len(parse_message(mid, payload, s))
    stats = proc.process([(mid, payload)])
    assert stats.items == expected and not stats.unwritable
    import sqlalchemy as sa

    from contract.results import results

    with prop_store.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(results)
                         .where(results.c.id.like(f"malformed-{mid}-%"))).scalar_one()
    keys = {e.key for e in parse_message(mid, payload, s)}
    stored = prop_store.get_many([k for k in keys if not k.startswith("malformed-")])
    # every item is one row: own ids found, derived keys counted (distinct ids may collide
    # with an earlier example's own id, which is then final: still one row)
    assert len(stored) + n >= len(keys)
