"""Small defects a new user met in the README's examples: a CPU line that said
``1 threads``, a CLI conflict error that named its id twice, ``/v1/live`` and
``/readyz`` naming different causes for one Redis outage, and a SQLite URL whose
directory is missing read as an empty store."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from api.app import create_app
from contract.errors import StoreRefused
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.producer_helpers import broker_settings, invoke, record
from worker.device import resolve_placement


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one CPU thread, as a worker with ``OMP_NUM_THREADS=1``; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_one_thread_cpu_placement_says_thread() -> None:
    """The model line and ``/v1/live`` say ``1 thread``, not ``1 threads``."""
    assert resolve_placement("cpu", "auto").describe() == "cpu (1 thread, float32)"
    assert resolve_placement("cpu", "int8").describe() == "cpu (1 thread, dynamic int8)"


def test_the_cli_names_a_conflicting_id_once(store: ResultStore, redis_url: str,
                                             db_url: str) -> None:
    """``submit --id`` of an id stored with another text: the error names the id once."""
    store.upsert([record("review-17", text="some text")])
    result = invoke(["submit", "other text", "--id", "review-17"],
                    broker_settings(redis_url, db_url))
    assert result.exit_code == 2, result.output
    assert result.stderr == ("error: id 'review-17' is already stored with a different text "
                             "(the stored result stands; use a new id)\n")


def test_live_and_readyz_name_the_same_cause_of_a_redis_outage(
        redis_server: Any, sqlite_url: str) -> None:
    """Redis stopped under a running API: ``/v1/live`` (which reads through the client's
    :class:`BrokerUnavailable`) names the driver's error, as ``/readyz`` does."""
    settings = Settings(broker_url=redis_server.url, database_url=sqlite_url,
                        queue="bst-audit-live", redis_socket_timeout_s=1.0)
    with TestClient(create_app(settings)) as http:
        assert http.get("/v1/live").json()["redis"] == "ok"
        redis_server.stop()
        ready = http.get("/readyz").json()["checks"]["redis"]
        live = http.get("/v1/live").json()["redis"]
    assert ready == "unreachable: ConnectionError"
    assert live == ready


def test_readers_refuse_an_sqlite_url_whose_directory_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped directory is a setting to fix, as ``db upgrade`` says (exit 2, the
    absolute path), not an empty store; a missing file in an existing directory still
    reads as no rows, and neither is created."""
    monkeypatch.chdir(tmp_path)
    settings = Settings(database_url="sqlite:///no-such-dir/x.db",
                        broker_url="redis://127.0.0.1:1/0")
    problem = (f"{tmp_path / 'no-such-dir'} does not exist (the directory of "
               f"{tmp_path / 'no-such-dir' / 'x.db'}): create it or fix ")
    result = invoke(["results"], settings)
    assert result.exit_code == 2, result.output
    assert problem in result.stderr and result.stdout == ""
    client = Client(settings)
    with pytest.raises(StoreRefused, match=re.escape(problem)):
        client.get("x")
    client.close()
    assert invoke(["db", "upgrade"], settings).exit_code == 2  # refused the same way

    settings = settings.replace(database_url="sqlite:///x.db")
    result = invoke(["results"], settings)
    assert (result.exit_code, result.stdout) == (0, "(no results)\n"), result.output
    client = Client(settings)
    assert client.get("x") is None
    client.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("under", ["x.db", "sub/x.db"])
def test_a_file_in_place_of_the_sqlite_directory_is_refused_by_readers(
        under: str, tmp_path: Path, redis_url: str) -> None:
    """A file where the path needs a directory is refused as a missing directory is,
    naming it (the first version of the refusal crashed here with a NotADirectoryError
    traceback, exit 1), while ``submit --id``, which needs only Redis, queues. Nothing
    is created."""
    (tmp_path / "afile").write_text("")
    settings = broker_settings(redis_url, f"sqlite:///{tmp_path / 'afile' / under}")
    result = invoke(["results"], settings)
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'afile'} is a file, not a directory" in result.output, result.output
    result = invoke(["submit", "some text", "--id", "a1"], settings)
    assert (result.exit_code, result.stdout) == (0, "a1\n"), result.output
    with Client(settings) as client, pytest.raises(StoreRefused, match="not a directory"):
        client.get("a1")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
