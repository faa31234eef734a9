"""How many tokens one text takes when BERTSTREAM_MAX_LENGTH is 0 (the model's own maximum).

A long-context decoder says 131072 positions (and its tokenizer no limit, or
the same 131072): taken as is, one text could take the memory of many batches
and a GPU worker's warm-up would run a batch that wide at start. The model's
maximum is taken up to ``LONGEST_DEFAULT`` (the default token budget); an
explicit BERTSTREAM_MAX_LENGTH takes more, up to the model's own maximum. The
cap is logged at load, and the worker's model line says the length chosen.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from contract.settings import Settings
from tests.tinybert import write_tiny_model
from worker.app import build_runner
from worker.device import Placement
from worker.runner import HFRunner

CPU = Placement(torch.device("cpu"), torch.float32)
#: The most tokens BERTSTREAM_MAX_LENGTH=0 gives one text (the runner's LONGEST_DEFAULT).
LONGEST_DEFAULT = 8192
#: A long-context decoder's position count (Llama 3, Qwen2.5).
LONG_CONTEXT = 131072


@pytest.fixture(scope="module", params=[None, LONG_CONTEXT])
def long_context(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama of :data:`LONG_CONTEXT` positions; its tokenizer has no limit, or the
    same (which transformers' tokenizers cannot tell from "no limit" by size)."""
    return _llama(tmp_path_factory.mktemp("llama"), LONG_CONTEXT, request.param)


def _llama(path: Path, positions: int, tokenizer_limit: int | None) -> Path:
    """A tiny Llama saying ``positions`` in its config (rotary: no table in the weights)."""
    write_tiny_model(path, "llama", max_length=tokenizer_limit)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_long_context_model_takes_the_default_most_and_says_so(
        long_context: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        runner = HFRunner(long_context, CPU)
    assert runner.max_length == LONGEST_DEFAULT
    assert [r.getMessage() for r in caplog.records if "BERTSTREAM_MAX_LENGTH" in r.getMessage()
            ] == [f"{long_context}: the model takes up to {LONG_CONTEXT} tokens; texts are cut "
                  f"(or windowed) at {LONGEST_DEFAULT}, the default most; set "
                  f"BERTSTREAM_MAX_LENGTH (up to {LONG_CONTEXT}) for more"]
    # A text longer than that is cut there (and so scored in windows of that size).
    encoded = runner.encode(["good " * (LONGEST_DEFAULT + 100)])[0]
    assert encoded.truncated and len(encoded.ids) == LONGEST_DEFAULT


@pytest.mark.parametrize(("asked", "taken"), [
    (20_000, 20_000),          # more than the default most: asked for, so taken
    (LONG_CONTEXT * 2, LONG_CONTEXT),  # never more than the model's own maximum
    (512, 512),
])
def test_an_explicit_max_length_is_taken_up_to_the_models_own(
        long_context: Path, caplog: pytest.LogCaptureFixture, asked: int, taken: int) -> None:
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        assert HFRunner(long_context, CPU, max_length=asked).max_length == taken
    said = [r.getMessage() for r in caplog.records if "BERTSTREAM_MAX_LENGTH" in r.getMessage()]
    if asked == taken:
        assert said == []
    else:  # asked for more than the model takes: said, as a warning, not lowered quietly
        assert said == [f"{long_context}: BERTSTREAM_MAX_LENGTH={asked} is more than the model "
                        f"takes ({taken} tokens); texts are cut (or windowed) at {taken}"]
        assert [r.levelno for r in caplog.records if r.getMessage() in said] == [logging.WARNING]


@pytest.mark.parametrize(("arch", "positions", "tokenizer_limit"), [
    ("bert", 64, 64),  # the usual encoder: its own maximum
    ("llama", LONGEST_DEFAULT, None),  # exactly the default most (ModernBERT's): kept
    ("llama", 4096, None),
])
def test_a_model_within_the_default_most_keeps_its_own_maximum(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, arch: str, positions: int,
        tokenizer_limit: int | None) -> None:
    model_dir = (_llama(tmp_path / arch, positions, tokenizer_limit) if arch == "llama"
                 else write_tiny_model(tmp_path / arch, arch, max_length=tokenizer_limit))
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        assert HFRunner(model_dir, CPU).max_length == positions
    assert "BERTSTREAM_MAX_LENGTH" not in caplog.text


def test_the_workers_model_line_gives_the_length_chosen(
        long_context: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="worker.app"):
        build_runner(Settings(model=str(long_context), device="cpu"))
    assert any(f"max_length {LONGEST_DEFAULT}," in r.getMessage() for r in caplog.records
               if r.name == "worker.app"), caplog.text
