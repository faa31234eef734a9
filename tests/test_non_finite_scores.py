"""A text whose scores come out NaN or infinite fails alone, with the reason.

In float16 (the CUDA default) an activation past 65504 overflows on some
inputs, and a checkpoint can hold NaN weights. Unchecked, SQLite stored such a
row as done with a NULL score and NaN in its scores (not JSON), and PostgreSQL
refused the row ("invalid input syntax for type json"), which failed it with a
database reason and without its text. The model here is real and loaded from
disk: a tiny BERT whose embedding row of one word is NaN, so only texts with
that word come out NaN.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
import torch

from contract.constants import STATUS_DONE, STATUS_FAILED
from contract.errors import ModelLoadError
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from tests.test_model_vocab_bounds import Pipelined
from tests.test_pipeline import wait_rows
from tests.test_poison_worker import wait_broker_idle
from tests.tinybert import write_tiny_bert
from worker.device import Placement
from worker.flush import FlushProcessor
from worker.inference import infer_pipelined, non_finite_reason
from worker.runner import HFRunner, Prediction

CPU = Placement(torch.device("cpu"), torch.float32)
#: The word whose embedding row is NaN.
WORD = "terrible"
GOOD = ["i love this movie", "the hotel room was clean", "bad", "the service was very bad"]
REASON = (r"the model gave NaN scores for this text \(\d+ tokens\): the model's weights may "
          r"hold NaN or infinite values")


def _poisoned(path: Path, *, everything: bool = False) -> Path:
    """A tiny BERT saved with NaN in ``WORD``'s embedding row (or in its classifier)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    write_tiny_bert(path)
    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    with torch.no_grad():
        if everything:
            model.classifier.weight.fill_(float("nan"))
        else:
            row = AutoTokenizer.from_pretrained(str(path)).convert_tokens_to_ids(WORD)
            model.get_input_embeddings().weight[row].fill_(float("nan"))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def nan_word_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _poisoned(tmp_path_factory.mktemp("nan-word"))


def _alone(runner: HFRunner, text: str) -> Prediction:
    return runner.decode(runner.forward(runner.collate(runner.encode([text]), [0])))[0]


def test_the_text_fails_alone_and_its_batch_mates_are_stored(
        nan_word_model: Path, store: ResultStore) -> None:
    runner = HFRunner(nan_word_model, CPU)
    want = {f"good-{i}": _alone(runner, t) for i, t in enumerate(GOOD)}
    processor = FlushProcessor(runner, store, Settings(model="tiny", database_url="sqlite://"),
                               worker_name="t@h")
    now = time.time()
    items = [{"id": f"good-{i}", "text": t, "submitted_at": now} for i, t in enumerate(GOOD)]
    items.insert(2, {"id": "bad", "text": f"the room was {WORD}", "submitted_at": now})
    stats = processor.process([("m1", [items])])
    assert stats.batches == 1
    got = {r.id: r for r in store.query(limit=None)}
    assert got["bad"].status == STATUS_FAILED
    assert re.fullmatch(REASON, got["bad"].error or ""), got["bad"].error
    assert got["bad"].text == f"the room was {WORD}"  # kept, unlike a row the database refused
    assert got["bad"].score is None and got["bad"].scores is None
    for key, pred in want.items():
        assert got[key].status == STATUS_DONE
        assert got[key].scores == pytest.approx(pred.scores, abs=1e-6)
        assert all(math.isfinite(p) for p in (got[key].scores or {}).values())


def test_a_long_text_fails_with_the_window_that_came_out_nan(nan_word_model: Path,
                                                             store: ResultStore) -> None:
    runner = HFRunner(nan_word_model, CPU)
    processor = FlushProcessor(runner, store, Settings(model="tiny", database_url="sqlite://"),
                               worker_name="t@h")
    sentence = "the hotel room was clean and the service was very good. "
    text = sentence * 8 + f"the food was {WORD}. " + sentence * 8
    assert len(runner.encode([text])[0].ids) == runner.max_length  # cut: windows
    processor.process([("m1", [[{"id": "long", "text": text},
                                {"id": "short", "text": "i love this movie"}]])])
    got = {r.id: r for r in store.query(limit=None)}
    assert got["short"].status == STATUS_DONE
    assert got["long"].status == STATUS_FAILED
    assert re.fullmatch(r"window \d+ of \d+ failed: " + REASON, got["long"].error or ""), \
        got["long"].error


def test_the_pipelined_path_checks_the_fetched_scores(nan_word_model: Path) -> None:
    """As on a GPU worker, where probabilities are fetched one batch later."""
    runner = HFRunner(nan_word_model, CPU)
    texts = [*GOOD, WORD, "great"]
    encoded = runner.encode(texts)
    got = infer_pipelined(Pipelined(runner), encoded,  # type: ignore[arg-type]
                          [[0, 4], [1, 2, 3, 5]])
    assert isinstance(got[4], str) and re.fullmatch(REASON, got[4])
    assert all(isinstance(got[r], Prediction) for r in (0, 1, 2, 3, 5))


def test_float16_names_the_overflow_and_the_way_out() -> None:
    runner = SimpleNamespace(placement=Placement(torch.device("cpu"), torch.float16))
    pred = Prediction("positive", float("nan"), {"negative": float("inf"), "positive": 0.5})
    assert non_finite_reason(runner, pred, 7) == (  # type: ignore[arg-type]
        "the model gave infinite scores for this text (7 tokens): float16 overflows past "
        "65504 on some inputs: BERTSTREAM_DTYPE=bfloat16 or float32 avoids it")
    fine = Prediction("positive", 0.9, {"negative": 0.1, "positive": 0.9})
    assert non_finite_reason(runner, fine, 7) is None  # type: ignore[arg-type]


def test_a_model_nan_for_every_text_is_refused_at_load(tmp_path: Path) -> None:
    """It used to be refused for "padding changes its results (by up to nan)"."""
    path = _poisoned(tmp_path / "all-nan", everything=True)
    with pytest.raises(ModelLoadError) as err:
        HFRunner(path, CPU)
    assert str(err.value) == (
        f"{path}: the model gives NaN or infinite scores for plain short texts at float32: "
        f"its weights hold NaN or infinite values; retrain or re-export it")


def test_rows_stored_with_nan_by_earlier_versions_read_as_null(
        nan_word_model: Path, sqlite_store: ResultStore) -> None:
    """Earlier workers stored a NaN text on SQLite as done, ``score`` NULL and NaN in
    ``scores`` (not JSON): every reader now sees null there, as the API always showed."""
    runner = HFRunner(nan_word_model, CPU)
    processor = FlushProcessor(runner, sqlite_store,
                               Settings(model="tiny", database_url="sqlite://"),
                               worker_name="t@h")
    processor.process([("m1", [[{"id": "old", "text": "good hotel"}]])])
    with sqlite_store.engine.begin() as conn:  # as the earlier version wrote it
        conn.execute(sa.text("UPDATE bertstream_results SET score = NULL, scores = :s "
                             "WHERE id = 'old'"),
                     {"s": '{"negative": NaN, "positive": NaN}'})
    record = sqlite_store.get("old")
    assert record is not None and record.scores == {"negative": None, "positive": None}
    assert [r.scores for r in sqlite_store.query(limit=None)] == [record.scores]
    json.dumps(record.to_json(), allow_nan=False)  # strict JSON (a JSONL export line)


@pytest.mark.slow
def test_a_real_worker_fails_the_text_and_keeps_serving(
        settings: Settings, nan_word_model: Path, worker_factory: Any) -> None:
    """Both databases: the NaN text failed with the reason (PostgreSQL refused the row
    before), its mates done, the queue empty and the same worker still running."""
    s = settings.replace(model=str(nan_word_model), flush_every=4)
    store = ResultStore.from_url(s.database_url)
    try:
        store.create_schema()
        worker = worker_factory(s)
        with Client(s) as client:
            ids = [client.submit("the hotel is good"), client.submit(f"{WORD} room"),
                   client.submit("bad room")]
            rows = wait_rows(store, ids, timeout=60)
            assert rows[ids[1]].status == STATUS_FAILED
            assert re.fullmatch(REASON, rows[ids[1]].error or ""), rows[ids[1]].error
            assert [rows[i].status for i in (ids[0], ids[2])] == [STATUS_DONE, STATUS_DONE]
            again = client.submit("i love this movie")
            assert wait_rows(store, [again], timeout=60)[again].status == STATUS_DONE
    finally:
        store.close()  # its pool's PostgreSQL connections, else closed by the GC with a warning
    wait_broker_idle(s)
    worker.check_alive()


def _beyond_float16(path: Path) -> Path:
    """A tiny BERT whose classifier biases are past float16's largest value (65504): in
    float16 they load as infinite, so every logit is; float32 scores it normally."""
    from transformers import AutoModelForSequenceClassification

    write_tiny_bert(path)
    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    with torch.no_grad():
        model.classifier.bias.fill_(70000.0)
    model.save_pretrained(str(path))
    return path


HALF = Placement(torch.device("cpu"), torch.float16)


def test_auto_precision_loads_a_float16_overflow_again_wider(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``BERTSTREAM_DTYPE=auto`` picks float16 on CUDA; a model that overflows there is
    loaded again in the wider type (bfloat16 on a GPU that has it, float32 here) with
    one warning, instead of refusing to start. (The CPU stands in for the GPU: torch
    runs float16 on it; ``resolve_placement`` never picks it there.)"""
    from worker.app import build_runner

    path = _beyond_float16(tmp_path / "m")
    settings = Settings(model=str(path), dtype="auto")
    with caplog.at_level(logging.WARNING, logger="worker.app"):
        runner = build_runner(settings, HALF)
    assert isinstance(runner, HFRunner) and runner.placement.dtype == torch.float32
    warned = [r.getMessage() for r in caplog.records if r.name == "worker.app"]
    assert warned == [
        f"{path}: the model gives NaN or infinite scores for plain short texts at float16: "
        f"float16 overflows past 65504: set BERTSTREAM_DTYPE=bfloat16 or float32; "
        f"BERTSTREAM_DTYPE is auto, so it is loaded again in float32"]
    pred = _alone(runner, "good hotel")
    assert all(math.isfinite(p) for p in pred.scores.values())


def test_an_explicit_float16_is_refused_with_the_way_out(tmp_path: Path) -> None:
    from worker.app import build_runner

    path = _beyond_float16(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="set BERTSTREAM_DTYPE=bfloat16 or float32$"):
        build_runner(Settings(model=str(path), dtype="float16"), HALF)


def test_the_wider_placement_keeps_the_device() -> None:
    from worker.device import wider_placement

    assert wider_placement(HALF) == Placement(torch.device("cpu"), torch.float32)
