"""A tokenizer with tokens the model lacks must not poison a worker or fail whole batches.

Added tokens without resized embeddings, or a vocab.txt larger than the
config's ``vocab_size``, give token ids beyond the model's embedding table:
an IndexError on the CPU, and on CUDA a device-side assert after which every
CUDA call of the process fails. The runner serves such a model (with one
warning at load); a text using one of those tokens fails alone with the
reason, is never given to the model, and its batch-mates are scored as alone.
The embedding's forward is wrapped to record the largest id it is given:
observation only, the model runs unchanged.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from contract.constants import STATUS_DONE, STATUS_FAILED
from contract.errors import ModelLoadError
from contract.results import ResultStore
from contract.settings import Settings
from tests.tinybert import write_tiny_model
from worker.device import Placement
from worker.flush import FlushProcessor
from worker.inference import infer_pipelined
from worker.runner import Encoded, HFRunner, PaddedBatch, Prediction

CPU = Placement(torch.device("cpu"), torch.float32)
#: Tokens the tokenizer gains and the model's embedding table lacks.
EXTRA = ("zorblax", "quuxword")
GOOD = ["i love this movie", "the hotel room was clean", "bad", "the service was very bad"]
#: Why the bad text fails: the id, its token, the table's size and the two ways out.
REASON = (r"token id (?P<id>\d+) \('zorblax'\) is outside the model's embedding table of "
          r"(?P<rows>\d+) rows: its tokenizer has tokens the model lacks; resize the "
          r"model's token embeddings to the tokenizer \(and fine-tune them\), or use the "
          r"tokenizer the model was trained with")


@pytest.fixture(scope="module", params=["added_tokens", "larger_vocab_txt"])
def extra_token_model(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT whose tokenizer knows :data:`EXTRA` beyond the model's embedding rows."""
    from transformers import AutoTokenizer

    path = write_tiny_model(tmp_path_factory.mktemp(request.param), "bert")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if request.param == "added_tokens":
        tokenizer.add_tokens(list(EXTRA))  # without model.resize_token_embeddings
        tokenizer.save_pretrained(str(path))
    else:
        # A vocab.txt alone, two words longer than the model's: transformers builds the
        # fast tokenizer from it.
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        (path / "tokenizer.json").unlink()
        (path / "vocab.txt").write_text(
            "".join(f"{t}\n" for t in [t for t, _ in vocab] + list(EXTRA)), encoding="utf-8")
    return path


class Recorder:
    """The largest token id each call of the model's input embedding was given."""

    def __init__(self, runner: HFRunner) -> None:
        self.seen: list[int] = []
        embedding = runner.model.get_input_embeddings()
        inner = embedding.forward

        def forward(ids: torch.Tensor) -> torch.Tensor:
            self.seen.append(int(ids.max()))
            return inner(ids)

        embedding.forward = forward


def _alone(runner: HFRunner, text: str) -> Prediction:
    """``text``'s prediction in a batch of its own."""
    return runner.decode(runner.forward(runner.collate(runner.encode([text]), [0])))[0]


def test_a_tokenizer_larger_than_the_embeddings_is_served_with_one_warning(
        extra_token_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.runner"):
        runner = HFRunner(extra_token_model, CPU)
    rows = runner.model.get_input_embeddings().num_embeddings
    warned = [r.getMessage() for r in caplog.records if "embedding table" in r.getMessage()]
    assert warned == [
        f"{extra_token_model}: its tokenizer has {rows + len(EXTRA)} tokens but the model's "
        f"embedding table only {rows} rows: texts using a token id of {rows} or more will "
        f"fail; resize the model's token embeddings to the tokenizer or use the tokenizer "
        f"it was trained with"]
    assert runner.encode(["zorblax"])[0].ids[1] == rows  # the first id beyond the table


def test_a_matching_tokenizer_gives_no_warning(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.runner"):
        HFRunner(write_tiny_model(tmp_path / "m", "bert"), CPU)
    assert not [r for r in caplog.records if "embedding table" in r.getMessage()]


def test_a_text_with_a_token_the_model_lacks_fails_alone_and_is_never_run(
        extra_token_model: Path, store: ResultStore, caplog: pytest.LogCaptureFixture) -> None:
    """In one flush: the good texts are done with their scores alone, the bad one failed
    with the reason, no batch is bisected, and the model never sees an id beyond its
    table (on CUDA that one lookup would break the worker's every later batch)."""
    runner = HFRunner(extra_token_model, CPU)
    rows = runner.model.get_input_embeddings().num_embeddings
    want = {f"good-{i}": _alone(runner, t) for i, t in enumerate(GOOD)}
    recorder = Recorder(runner)
    processor = FlushProcessor(runner, store, Settings(model="tiny", database_url="sqlite://"),
                               worker_name="t@h")
    now = time.time()
    items = [{"id": f"good-{i}", "text": t, "submitted_at": now} for i, t in enumerate(GOOD)]
    items.insert(2, {"id": "bad", "text": "the zorblax was bad", "submitted_at": now})
    with caplog.at_level(logging.WARNING, logger="worker.inference"):
        stats = processor.process([("m1", [items])])
    assert stats.batches == 1  # the bad text was planned into the same batch
    got = {r.id: r for r in store.query(limit=None)}
    assert got["bad"].status == STATUS_FAILED
    match = re.fullmatch(REASON, got["bad"].error or "")
    assert match, got["bad"].error
    assert int(match["id"]) == int(match["rows"]) == rows
    assert got["bad"].scores is None
    for key, pred in want.items():
        assert got[key].status == STATUS_DONE
        assert got[key].label == pred.label
        assert got[key].scores == pytest.approx(pred.scores, abs=1e-6)
    assert recorder.seen and max(recorder.seen) < rows
    assert "retrying in halves" not in caplog.text


def test_a_long_text_with_such_a_token_fails_with_its_window(extra_token_model: Path,
                                                             store: ResultStore) -> None:
    """A long text is scored in windows: the window holding the token fails unrun, and
    so the text, naming the window; a short text beside it is done."""
    runner = HFRunner(extra_token_model, CPU)
    rows = runner.model.get_input_embeddings().num_embeddings
    recorder = Recorder(runner)
    processor = FlushProcessor(runner, store, Settings(model="tiny", database_url="sqlite://"),
                               worker_name="t@h")
    sentence = "the hotel room was clean and the service was very good. "
    text = sentence * 8 + "the zorblax was bad. " + sentence * 8
    assert len(runner.encode([text])[0].ids) == runner.max_length  # cut: windows
    processor.process([("m1", [[{"id": "long", "text": text},
                                {"id": "short", "text": "i love this movie"}]])])
    got = {r.id: r for r in store.query(limit=None)}
    assert got["short"].status == STATUS_DONE
    assert got["long"].status == STATUS_FAILED
    assert "failed: token id" in (got["long"].error or ""), got["long"].error
    assert (got["long"].error or "").startswith("window ")
    assert recorder.seen and max(recorder.seen) < rows


class Pipelined:
    """The CPU runner driven as a CUDA one is: launch, then fetch one batch later."""

    asynchronous = True

    def __init__(self, inner: HFRunner) -> None:
        self.inner = inner
        self.launched: list[list[int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def launch(self, batch: PaddedBatch) -> Any:
        self.launched.append(list(batch.rows))
        return self.inner.launch(batch)

    def collate(self, encoded: Sequence[Encoded], rows: list[int]) -> PaddedBatch:
        return self.inner.collate(encoded, rows)


def test_the_pipelined_path_fails_such_texts_before_launch(extra_token_model: Path) -> None:
    """As on a GPU worker: batches whose rows hold such ids launch without them (a batch
    of only such rows launches nothing), and every row has its outcome once."""
    runner = HFRunner(extra_token_model, CPU)
    rows = runner.model.get_input_embeddings().num_embeddings
    texts = [*GOOD, "zorblax", "quuxword zorblax", "great"]
    encoded = runner.encode(texts)
    batches = [[0, 4], [5], [1, 2, 3, 6]]
    assert sorted(r for b in batches for r in b) == list(range(len(texts)))
    recorder = Recorder(runner)
    wrapped = Pipelined(runner)
    got = infer_pipelined(wrapped, encoded, batches)  # type: ignore[arg-type]
    assert wrapped.launched == [[0], [1, 2, 3, 6]]
    assert set(got) == set(range(len(texts)))
    for r in (4, 5):
        assert isinstance(got[r], str) and f"embedding table of {rows} rows" in got[r]
    for r in (0, 1, 2, 3, 6):
        pred = got[r]
        assert isinstance(pred, Prediction)
        assert pred.scores == pytest.approx(_alone(runner, texts[r]).scores, abs=1e-6)
    assert max(recorder.seen) < rows


def test_the_runner_refuses_such_a_batch_before_the_device(extra_token_model: Path) -> None:
    """A caller that did not screen its texts gets a ValueError with the reason from
    launch, checked on the host tensors; the model is not run."""
    runner = HFRunner(extra_token_model, CPU)
    recorder = Recorder(runner)
    encoded = runner.encode(["i love this movie", "the zorblax was bad"])
    with pytest.raises(ValueError, match=REASON):
        runner.forward(runner.collate(encoded, [0, 1]))
    assert recorder.seen == []


def test_a_pad_token_the_model_lacks_is_refused_at_load(tmp_path: Path) -> None:
    """A pad token added to the tokenizer (and named in config.json) without resized
    embeddings would be in every padded batch: refused at load, in one line naming it,
    instead of failing (or, on CUDA, breaking the process at) the load's padding probe."""
    from transformers import AutoTokenizer

    path = write_tiny_model(tmp_path / "gpt2", "gpt2", pad=False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(str(path))
    config = json.loads((path / "config.json").read_text())
    config["pad_token_id"] = tokenizer.pad_token_id
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=(
            rf"{path} fails on a padded batch of two texts: token id {tokenizer.pad_token_id} "
            rf"\('<pad>'\) is outside the model's embedding table of "
            rf"{tokenizer.pad_token_id} rows")) as info:
        HFRunner(path, CPU)
    assert "\n" not in str(info.value)
