"""A model path that is not a directory is refused as such, in one line, exit 2.

transformers reads a missing path as a Hub repo id and answers with the repo
id rules, which says nothing about the path that was given.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from contract.errors import ModelLoadError, exit_code
from producer.cli import main
from worker.device import Placement
from worker.runner import HFRunner

CPU = Placement(torch.device("cpu"), torch.float32)


def test_a_missing_model_directory_is_named_as_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"{missing}: no such directory") as info:
        HFRunner(missing, CPU)
    assert "Repo id" not in str(info.value)
    assert exit_code(info.value) == 2


def test_a_file_given_as_the_model_is_not_a_directory(tmp_path: Path) -> None:
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"{a_file}: not a directory"):
        HFRunner(a_file, CPU)


def test_worker_with_a_missing_model_says_so_and_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    result = CliRunner().invoke(main, ["worker", "--device", "cpu", "--model", str(missing)], env={
        "BERTSTREAM_BROKER_URL": "redis://127.0.0.1:1/0",
        "BERTSTREAM_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"})
    assert result.exit_code == 2, result.output
    assert f"error: cannot load a model from {missing}: no such directory" in result.output
    assert "Repo id" not in result.output and "Traceback" not in result.output
