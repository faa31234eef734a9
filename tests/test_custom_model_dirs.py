"""A user's own model directory in place of the bundled model: what a worker's load says.

A data scientist swaps in a Hugging Face directory of their own. Rows must tell
which weights and tokenizer scored them (``model_revision``), and a directory
that cannot be served must be refused in one line that names what to fix,
not in transformers' words about arguments the user never passed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from contract.errors import ModelLoadError
from tests.tinybert import write_tiny_bert, write_tiny_model
from worker.device import Placement
from worker.runner import HFRunner, directory_revision

CPU = Placement(torch.device("cpu"), torch.float32)


def _user_copy(src: Path, dst: Path) -> Path:
    """``src`` as a user's directory: without the tiny model's own marker file."""
    shutil.copytree(src, dst)
    (dst / "bertstream_tiny_model.json").unlink(missing_ok=True)
    return dst


def test_retrained_weights_of_the_same_shape_get_a_new_revision(tmp_path: Path) -> None:
    """Fine-tuning again keeps config.json and the weights file's size: the revision
    must still change, or rows scored by the old and the new weights read alike."""
    mine = _user_copy(write_tiny_bert(tmp_path / "seed0", seed=0), tmp_path / "mine")
    before = directory_revision(mine)
    retrained = write_tiny_bert(tmp_path / "seed1", seed=1)
    shutil.copyfile(retrained / "model.safetensors", mine / "model.safetensors")
    assert directory_revision(mine) != before
    assert HFRunner(mine, CPU).revision == directory_revision(mine)


def test_a_changed_tokenizer_gets_a_new_revision(tmp_path: Path) -> None:
    """The same weights read through another tokenizer score texts differently."""
    mine = _user_copy(write_tiny_bert(tmp_path / "src"), tmp_path / "mine")
    before = directory_revision(mine)
    tokenizer = json.loads((mine / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["normalizer"]["lowercase"] = False
    (mine / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    assert directory_revision(mine) != before


def test_the_same_files_elsewhere_keep_their_revision(tmp_path: Path) -> None:
    """Workers on two hosts serving copies of one directory announce one revision."""
    mine = _user_copy(write_tiny_bert(tmp_path / "src"), tmp_path / "a")
    copy = tmp_path / "b"
    shutil.copytree(mine, copy)  # new mtimes and inodes, same bytes
    assert directory_revision(copy) == directory_revision(mine)


def test_labels_that_do_not_fit_the_trained_head_are_refused_saying_so(tmp_path: Path) -> None:
    """A neutral label added to config.json of a two-label model is refused naming the
    head's sizes and id2label, not "You set `ignore_mismatched_sizes` to `False`"."""
    mine = _user_copy(write_tiny_bert(tmp_path / "src"), tmp_path / "mine")
    config = json.loads((mine / "config.json").read_text(encoding="utf-8"))
    config["id2label"] = {"0": "negative", "1": "neutral", "2": "positive"}
    config["label2id"] = {"negative": 0, "neutral": 1, "positive": 2}
    (mine / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelLoadError) as refused:
        HFRunner(mine, CPU)
    message = str(refused.value)
    assert "\n" not in message
    assert "ignore_mismatched_sizes" not in message
    assert "classifier.weight" in message and "[2, 64]" in message and "[3, 64]" in message
    assert "3 labels" in message and "id2label" in message


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None,
                    reason="sentencepiece converts the model: the refusal is for its absence")
def test_a_sentencepiece_tokenizer_without_the_package_is_refused_saying_so(
        tmp_path: Path) -> None:
    """An XLM-R directory whose only tokenizer file is ``sentencepiece.bpe.model`` needs
    the sentencepiece package (transformers ends up asking for tiktoken instead)."""
    mine = write_tiny_model(tmp_path / "xlmr", "xlmr")
    (mine / "tokenizer.json").unlink()
    (mine / "sentencepiece.bpe.model").write_bytes(b"\x0a\x00")
    config = json.loads((mine / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "XLMRobertaTokenizer"
    (mine / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelLoadError) as refused:
        HFRunner(mine, CPU)
    message = str(refused.value)
    assert "tiktoken" not in message
    assert "sentencepiece.bpe.model" in message and "tokenizer.json" in message
    assert "pip install sentencepiece" in message
