"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): no request gets a 5xx.

Every operation is called with generated valid and invalid parameters and
bodies against a real ``bertstream serve`` on real Redis and a real database.
A 4xx with the JSON error form is a correct answer to a bad request; a 5xx
(or a broken connection) is a bug.
"""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from contract.results import ResultStore
from contract.settings import Settings

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_operation_answers_5xx(settings: Settings, api_factory: Any, mode: str) -> None:
    store = ResultStore.from_url(settings.database_url)
    store.create_schema()  # the read routes then run real queries
    store.close()
    api = api_factory(settings.replace(max_queue_length=100_000, api_coalesce_ms=1))
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.given(case=operation.as_strategy(generation_mode=generation))
        @hypothesis.settings(max_examples=30, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def call(case: Any) -> None:
            nonlocal calls
            calls += 1
            if case.path == "/readyz":  # 503 is its documented answer while no worker runs
                response = case.call(timeout=30)
                assert response.status_code in (200, 503) and "checks" in response.json()
                return
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        try:
            call()
        except hypothesis.errors.Unsatisfiable:
            # An operation without inputs (/healthz) has no invalid request to make.
            assert mode == "negative", operation.label
    assert calls >= 50  # the operations were really exercised
