"""A model directory that lacks a part is refused naming the part, in one line, exit 2.

An empty directory was answered with transformers' advice to install
sentencepiece or tiktoken; one without tokenizer files loaded, with a
tokenizer that knows only its special tokens (every text read as [UNK]).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from contract.errors import ModelLoadError, exit_code
from producer.cli import main
from worker.device import Placement
from worker.runner import HFRunner

CPU = Placement(torch.device("cpu"), torch.float32)
WHOLE = "a Hugging Face sequence-classification model folder holds config.json, the weights"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _copy(src: Path, dst: Path, *, leave_out: tuple[str, ...]) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in leave_out:
            shutil.copy(f, dst / f.name)
    return dst


def test_an_empty_directory_is_not_a_model_directory(tmp_path: Path) -> None:
    empty = tmp_path / "e"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as info:
        HFRunner(empty, CPU)
    message = str(info.value)
    assert message.startswith(f"{empty} is not a model directory: no config.json, no weights "
                              f"file (model.safetensors or pytorch_model.bin) and no tokenizer "
                              f"file"), message
    assert WHOLE in message
    assert "sentencepiece" not in message and "\n" not in message
    assert exit_code(info.value) == 2


def test_a_directory_without_weights_names_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "no-weights", leave_out=("model.safetensors",))
    with pytest.raises(ModelLoadError, match=r"is not a model directory: no weights file "
                                             r"\(model.safetensors or pytorch_model.bin\); a Hugging") as info:
        HFRunner(folder, CPU)
    lacks = str(info.value).split("; a Hugging Face")[0]
    assert "config.json" not in lacks and "tokenizer" not in lacks, lacks


def test_a_directory_without_tokenizer_files_names_them(tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "no-tokenizer", leave_out=TOKENIZER_FILES)
    with pytest.raises(ModelLoadError, match=f"{folder} is not a model directory: no tokenizer "
                                             r"file \(tokenizer.json, vocab.txt"):
        HFRunner(folder, CPU)


def test_a_tokenizer_that_knows_only_its_special_tokens_is_refused(tiny_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    """A vocabulary file that is there but holds nothing but the special tokens."""
    folder = _copy(tiny_model_dir, tmp_path / "specials-only",
                   leave_out=("tokenizer.json", "tokenizer_config.json"))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ModelLoadError, match="no vocabulary beyond its 5 special tokens"):
        HFRunner(folder, CPU)


def test_a_whole_directory_still_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert HFRunner(tiny_model_dir, CPU).labels == ["negative", "positive"]
    slow_only = _copy(tiny_model_dir, tmp_path / "vocab-only",
                      leave_out=("tokenizer.json", "tokenizer_config.json"))
    assert HFRunner(slow_only, CPU).labels == ["negative", "positive"]  # vocab.txt converted


def test_the_worker_says_what_the_directory_lacks_and_exits_2(redis_url: str,
                                                              tmp_path: Path) -> None:
    empty = tmp_path / "e"
    empty.mkdir()
    result = CliRunner().invoke(main, ["worker", "--device", "cpu", "--model", str(empty)], env={
        "BERTSTREAM_BROKER_URL": redis_url,
        "BERTSTREAM_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"})
    assert result.exit_code == 2, result.output
    assert f"error: {empty} is not a model directory: no config.json" in result.output
    assert "sentencepiece" not in result.output and "Traceback" not in result.output


def test_model_eval_refuses_a_partial_folder_the_same_way(tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    """`bertstream model eval --model DIR` loads through its own path (training.evaluate):
    it checks the folder's parts as a worker does, before transformers reads it."""
    from training.evaluate import _load

    empty = tmp_path / "e"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="is not a model directory: no config.json"):
        _load(empty)
    folder = _copy(tiny_model_dir, tmp_path / "no-tokenizer", leave_out=TOKENIZER_FILES)
    with pytest.raises(ModelLoadError, match="is not a model directory: no tokenizer file"):
        _load(folder)
