"""Several models at once, re-scoring and comparing: real Redis, SQLite and PostgreSQL,
real worker processes serving two tiny models side by side."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from contract.constants import RESULTS_TABLE
from contract.queries import Filters, compare
from contract.results import ResultRecord, ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.producer_helpers import invoke
from worker.flush import FlushProcessor
from worker.process import ServeProc, die_with_parent, settings_env

ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)
TEXTS = ["the hotel is very good", "这家酒店的服务很好,房间也很干净。", "bad service",
         "电影很差", "I love 这家酒店的早餐", "ok"]


@pytest.fixture(scope="session")
def second_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny random BERT (other weights): a second model to serve."""
    from tests.tinybert import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert-b"), seed=7)


class ModelWorkers:
    """``bertstream worker --model a=DIR --model b=DIR``: one parent, a child per model."""

    def __init__(self, settings: Settings, models: list[str], log: Path) -> None:
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.log_path = log
        args = [arg for spec in models for arg in ("--model", spec)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--device", "cpu", *args],
            env={**settings_env(settings.replace(torch_threads=1)), "HF_HUB_OFFLINE": "1"},
            stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def model_workers(tmp_path: Path) -> Iterator[Callable[..., ModelWorkers]]:
    started: list[ModelWorkers] = []

    def start(settings: Settings, models: list[str]) -> ModelWorkers:
        w = ModelWorkers(settings, models, tmp_path / f"models-{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def _rows(store: ResultStore) -> list[tuple[str, str]]:
    with store.engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(sa.text(  # type: ignore[misc]
            f"SELECT id, model FROM {RESULTS_TABLE}")))


@pytest.mark.slow
def test_two_models_at_once_each_with_its_rows_then_rescore_and_compare(
        settings: Settings, tiny_model_dir: Path, second_model_dir: Path,
        model_workers: Callable[..., ModelWorkers],
        api_factory: Callable[..., ServeProc]) -> None:
    s = settings.replace(flush_every=4, max_wait_ms=10)
    workers = model_workers(s, [f"alpha={tiny_model_dir}", f"beta={second_model_dir}"])
    with Client(s) as client:
        ids_a = client.submit_many(
            [{"text": t, "id": f"t{i}", "source": "web"} for i, t in enumerate(TEXTS)],
            model="alpha").ids
        b_only = client.submit("only for beta", id="b-only", model="beta")
        rows_a = client.wait(ids_a, timeout=120, model="alpha")
        row_b = client.wait([b_only], timeout=120, model="beta")[b_only]
        assert {r.model for r in rows_a.values()} == {"alpha"} and row_b.model == "beta"
        assert len({r.worker for r in rows_a.values()} | {row_b.worker}) == 2  # two processes
        assert {r.lang for r in rows_a.values()} == {"en", "zh", "mixed"}

        # Re-score everything alpha did with beta: stored beside, each (id, model) once.
        out = invoke(["rescore", "--model", "beta", "--source", "web", "--no-progress"], s)
        assert out.exit_code == 0, out.output
        assert f"sent {len(TEXTS)} task(s)" in out.stdout
        rows_b = client.wait(ids_a, timeout=120, model="beta")
        assert all(r.model == "beta" and r.text == rows_a[i].text for i, r in rows_b.items())
        again = invoke(["rescore", "--model", "beta", "--source", "web", "--no-progress"], s)
        assert again.exit_code == 0 and "sent 0 task(s)" in again.stdout
        assert f"{len(TEXTS)} already scored by it" in again.stdout
        assert _rows(client.store).count(("t0", "beta")) == 1
        assert len(_rows(client.store)) == 2 * len(TEXTS) + 1

        # Default views: each task once, its latest result; --model picks one.
        assert client.count() == len(TEXTS) + 1
        assert client.get("t0").model == "beta" and client.get("t0", model="alpha").model == "alpha"
        shown = invoke(["results", "--model", "alpha", "--format", "json"], s)
        assert {r["model"] for r in json.loads(shown.stdout)} == {"alpha"}
        by_model = {r["model"]: r["count"] for r in client.aggregate(by="model")}
        assert by_model == {"alpha": len(TEXTS), "beta": len(TEXTS) + 1}

        # Compare, on the CLI and the API, agrees with the rows themselves.
        agree = sum(rows_a[i].label == rows_b[i].label for i in ids_a)
        cmp = invoke(["compare", "--model", "alpha", "--model", "beta", "--format", "json"], s)
        assert cmp.exit_code == 0, cmp.output
        report = json.loads(cmp.stdout)
        assert report["texts"] == len(TEXTS) and report["agree"] == agree
        api = api_factory(s)
        import urllib.request

        with urllib.request.urlopen(f"{api.url}/v1/compare?a=alpha&b=beta") as response:
            assert json.loads(response.read())["agree"] == agree
        body = json.dumps({"text": "via the API", "id": "api-1", "model": "beta"}).encode()
        request = urllib.request.Request(f"{api.url}/v1/tasks", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            assert response.status == 202
        with urllib.request.urlopen(f"{api.url}/v1/tasks/api-1?model=beta&wait=60") as response:
            answer = json.loads(response.read())
        assert answer["status"] == "done" and answer["model"] == "beta"
    workers.stop()


def _record(task_id: str, model: str, label: str, p_pos: float, at: dt.datetime,
            text: str | None = "a text") -> ResultRecord:
    scores = {"positive": p_pos, "negative": 1 - p_pos}
    return ResultRecord(id=task_id, text_sha256="0" * 64, text_chars=6, model=model,
                        status="done", finished_at=at, text=text, label=label,
                        score=scores[label], scores=scores, source="s", lang="en")


def test_compare_in_sql(store: ResultStore) -> None:
    later = NOW + dt.timedelta(minutes=1)
    store.upsert([
        _record("x1", "A", "positive", 0.9, NOW), _record("x1", "B", "positive", 0.8, later),
        _record("x2", "A", "negative", 0.2, NOW), _record("x2", "B", "positive", 0.7, later),
        _record("x3", "A", "positive", 0.6, NOW), _record("x3", "B", "negative", 0.1, later),
        _record("x4", "A", "positive", 0.9, NOW),  # B never scored it
    ])
    result = compare(store, "A", "B", Filters())
    assert (result.texts, result.agree) == (3, 1)
    assert sorted(result.flips) == [("negative", "positive", 1), ("positive", "negative", 1)]
    # P_B(A's label) - P_A(A's label): -0.1, (0.3 - 0.8) = -0.5, (0.1 - 0.6) = -0.5
    assert result.mean_change == pytest.approx((-0.1 - 0.5 - 0.5) / 3)
    assert [r["id"] for r in result.largest] == ["x2", "x3", "x1"]
    assert compare(store, "A", "B", Filters(label="negative")).texts == 1


def test_rescore_refuses_when_no_text_was_stored(store: ResultStore, redis_url: str,
                                                 db_url: str) -> None:
    store.upsert([_record("n1", "A", "positive", 0.9, NOW, text=None)])
    out = invoke(["rescore", "--model", "B", "--no-progress"],
                 Settings(broker_url=redis_url, database_url=db_url))
    assert out.exit_code == 2
    assert "BERTSTREAM_STORE_TEXT=false" in out.stderr and "Traceback" not in out.output


def test_an_item_for_another_model_fails_alone(tiny_model_dir: Path, store: ResultStore) -> None:
    from worker.app import build_runner

    s = Settings(model=str(tiny_model_dir), database_url="sqlite://", model_name="alpha")
    processor = FlushProcessor(build_runner(s), store, s, worker_name="t@h")
    now = time.time()
    processor.process([("m1", [[{"id": "mine", "text": "good", "submitted_at": now,
                                 "model": "alpha"},
                                {"id": "theirs", "text": "good", "submitted_at": now,
                                 "model": "beta"},
                                {"id": "unnamed", "text": "good", "submitted_at": now}]])])
    rows = {r.id: r for r in store.query(limit=None)}
    assert rows["mine"].status == "done" and rows["mine"].model == "alpha"
    # Without a name, the queue it came on decides.
    assert rows["unnamed"].status == "done" and rows["unnamed"].model == "alpha"
    assert rows["theirs"].status == "failed"
    assert "is for model 'beta', but this queue family serves alpha" in rows["theirs"].error


def test_rescore_exits_5_when_tasks_are_refused(store: ResultStore, redis_url: str,
                                                db_url: str) -> None:
    """A stored text whose row holds another text's hash (a row edited by hand) is refused
    as a conflict: rescore says so and exits 5, as a stream that refused some lines,
    instead of 0 with nothing sent."""
    store.upsert([_record("h1", "A", "positive", 0.9, NOW, text="hello")])
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {RESULTS_TABLE} SET text_sha256 = :h"), {"h": "0" * 64})
    out = invoke(["rescore", "--model", "B", "--no-progress"],
                 Settings(broker_url=redis_url, database_url=db_url))
    assert out.exit_code == 5, out.output
    assert "1 refused" in out.stdout
