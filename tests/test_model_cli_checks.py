"""`bertstream model ...`: bad inputs end in one line with exit 2, before the slow part.

The slow library calls are replaced by stubs that record whether they ran, so
each test takes well under a second and proves the check comes first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from producer.cli import main
from training.data import DataSourceError
from training.parts import PartsError, join_parts, manifest_path, split_file
from worker.sentiment.assemble import default_adapter_dir

PACK_META = {"counts": {"train": 1}, "vocab_rows": 1, "base": {"vocab": 2}}


class Calls:
    """A stub for a slow library function: records its calls, then raises ``effect`` (an
    exception), calls it (a function) or gives it."""

    def __init__(self, effect: Any = None) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.effect = effect

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        if isinstance(self.effect, BaseException):
            raise self.effect
        return self.effect(*args, **kwargs) if callable(self.effect) else self.effect


@pytest.fixture
def stubs(monkeypatch: pytest.MonkeyPatch) -> dict[str, Calls]:
    """Every command's slow function, stubbed (succeeding) unless a test says otherwise."""

    class Report:
        def as_dict(self) -> dict[str, Any]:
            return {"heldout": {}}

    out = {"eval": Calls(Report()), "calibrate": Calls(), "speed": Calls(),
           "train": Calls(), "interpolate": Calls(), "pack": Calls(PACK_META)}
    # The checks come before the data: they hold whether the train extra is installed.
    monkeypatch.setattr("training.cli.TRAIN_DATA_PACKAGES", ())
    for target, key in (("training.evaluate.eval_main", "eval"),
                        ("training.evaluate.calibrate_main", "calibrate"),
                        ("training.speed.speed_main", "speed"),
                        ("training.train.train_main", "train"),
                        ("training.interpolate.interpolate_main", "interpolate"),
                        ("training.device_pack.pack_main", "pack")):
        monkeypatch.setattr(target, out[key])
    return out


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder that passes for a model directory (the stubs never load it)."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["model", *args])


def one_line_exit_2(result: Result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    for needle in needles:
        assert needle in result.output, result.output


# 1. device-pack never deletes a folder it did not write


def test_device_pack_refuses_a_folder_that_is_not_a_pack(tmp_path: Path,
                                                         stubs: dict[str, Calls]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run("device-pack", "--out", str(out), "--no-vader")
    one_line_exit_2(result, "holds no pack.json")
    assert (out / "notes.txt").read_text() == "keep me"
    assert not stubs["pack"].calls


def test_a_failed_device_pack_leaves_the_previous_pack(tmp_path: Path,
                                                       stubs: dict[str, Calls]) -> None:
    out = tmp_path / "pack"
    out.mkdir()
    (out / "pack.json").write_text("{}")
    (out / "data.safetensors").write_text("old")

    def fail(building: Path, *args: Any, **kwargs: Any) -> None:
        building.mkdir()
        (building / "data.safetensors").write_text("half")
        raise DataSourceError("cannot read the ICWSM 2014 ground truth from bogus.tar.gz")

    stubs["pack"].effect = fail
    result = run("device-pack", "--out", str(out), "--no-vader")
    one_line_exit_2(result, "cannot read the ICWSM 2014 ground truth")
    assert (out / "data.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]  # no leftovers


def test_device_pack_replaces_a_previous_pack_once_complete(tmp_path: Path,
                                                            stubs: dict[str, Calls]) -> None:
    out = tmp_path / "pack"
    out.mkdir()
    (out / "pack.json").write_text("{}")
    (out / "stale.bin").write_text("old")

    def build(building: Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        assert building.parent.name.startswith(".") and not building.exists()
        building.mkdir()
        (building / "pack.json").write_text('{"new": 1}')
        return PACK_META

    stubs["pack"].effect = build
    result = run("device-pack", "--out", str(out), "--no-vader")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["pack.json"]
    assert json.loads((out / "pack.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]
    new = tmp_path / "new" / "deeper"  # a new folder (and its parent) is created
    assert run("device-pack", "--out", str(new), "--no-vader").exit_code == 0
    assert (new / "pack.json").is_file()


# 2. output paths are checked before the work


@pytest.mark.parametrize("option", ["--json-out", "--reliability-png"])
def test_eval_output_into_a_missing_folder(tmp_path: Path, stubs: dict[str, Calls],
                                           option: str) -> None:
    result = run("eval", "--no-vader", option, str(tmp_path / "missing" / "r.out"))
    one_line_exit_2(result, option, "does not exist")
    assert not stubs["eval"].calls


def test_train_and_interpolate_out_under_a_file(tmp_path: Path, stubs: dict[str, Calls]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    for command in (["train"], ["interpolate", "--to", str(default_adapter_dir())]):
        result = run(*command, "--no-vader", "--out", str(blocker / "adapter"))
        one_line_exit_2(result, "--out", "is not a folder")
    assert not stubs["train"].calls and not stubs["interpolate"].calls
    ok = run("train", "--no-vader", "--out", str(tmp_path / "a" / "b"))
    assert ok.exit_code == 0 and len(stubs["train"].calls) == 1, ok.output


# 3. --model is a model directory


@pytest.mark.parametrize("command", [["eval"], ["speed"], ["verdict", "--report", "R"]])
def test_model_option_needs_a_model_directory(tmp_path: Path, stubs: dict[str, Calls],
                                              command: list[str]) -> None:
    command = [str(tmp_path / "r.json") if c == "R" else c for c in command]
    (tmp_path / "r.json").write_text('{"heldout": {}}')
    missing = run(*command[:1], "--model", str(tmp_path / "nowhere"), "--no-vader")
    one_line_exit_2(missing, "--model", "does not exist")
    adapter = tmp_path / "adapter"
    shutil.copytree(default_adapter_dir(), adapter)
    result = run(*command[:1], "--model", str(adapter), "--no-vader")
    one_line_exit_2(result, "no config.json", "model path --adapter")
    if command[0] == "verdict":
        result = run(*command, "--baseline", str(adapter), "--no-vader")
        one_line_exit_2(result, "--baseline", "model path --adapter")
    assert not stubs["eval"].calls and not stubs["speed"].calls


# 4. numbers that must be positive


@pytest.mark.parametrize("args", [
    ["eval", "--batch-size", "0"], ["eval", "--batch-size", "-5"], ["eval", "--threads", "-1"],
    ["speed", "--batch-size", "0"], ["speed", "--threads", "0"], ["speed", "--texts", "0"],
    ["calibrate", "--batch-size", "0"], ["calibrate", "--threads", "-1"],
    ["interpolate", "--to", "ADAPTER", "--out", "OUT", "--batch-size", "0"],
    ["train", "--out", "OUT", "--steps", "0"], ["train", "--out", "OUT", "--eval-every", "0"],
    ["train", "--out", "OUT", "--rank", "0"], ["train", "--out", "OUT", "--batch-size", "0"],
    ["train", "--out", "OUT", "--threads", "0"],
    ["train", "--out", "OUT", "--frozen-layers", "-1"],
    ["device-pack", "--out", "OUT", "--limit-mb", "0"],
])
def test_positive_numbers(tmp_path: Path, stubs: dict[str, Calls], model_dir: Path,
                          args: list[str]) -> None:
    args = [str(default_adapter_dir()) if a == "ADAPTER" else str(tmp_path / "o") if a == "OUT"
            else a for a in args]
    if args[0] in ("eval", "speed"):
        args += ["--model", str(model_dir)]
    result = run(*args, "--no-vader")
    one_line_exit_2(result, "Invalid value")
    assert not any(stub.calls for stub in stubs.values())


def test_model_ab_refuses_non_positive_counts(model_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from bench.model_ab import main as ab_main

    for option in ("--texts", "--rounds", "--threads"):
        with pytest.raises(SystemExit) as exit_info:
            ab_main([str(model_dir), str(model_dir), option, "0"])
        assert exit_info.value.code == 2
        assert "below 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        ab_main([str(model_dir.parent), str(model_dir)])
    assert exit_info.value.code == 2 and "no config.json" in capsys.readouterr().err


def test_model_ab_warms_both_up_then_alternates_the_order(tiny_model_dir: Path) -> None:
    """Checked by the forward passes themselves (a hook on each real model), not by timing:
    one untimed pass each, then old first in odd rounds and new first in even ones."""
    from bench.model_ab import side_by_side
    from training.speed import load

    passes: list[str] = []
    models = {name: load(tiny_model_dir) for name in ("old", "new")}
    for name, (model, _) in models.items():
        model.register_forward_hook(lambda *_a, name=name: passes.append(name))
    records = side_by_side(models, ["good", "bad", "ok"], rounds=4)
    assert passes == ["old", "new", "old", "new", "new", "old", "old", "new", "new", "old"]
    assert [r["order"] for r in records] == [["old", "new"], ["new", "old"]] * 2
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert all(r["old"] > 0 and r["new"] > 0 for r in records)


# 5. the library's input errors are one line


def test_an_unreadable_adapter(tmp_path: Path, stubs: dict[str, Calls]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in (["calibrate", "--adapter", str(empty)],
                    ["interpolate", "--to", str(empty), "--out", str(tmp_path / "o")],
                    ["interpolate", "--from", str(empty), "--to", str(default_adapter_dir()),
                     "--out", str(tmp_path / "o")],
                    ["train", "--out", str(tmp_path / "o"), "--init", str(empty)],
                    ["device-pack", "--out", str(tmp_path / "p"), "--baseline", str(empty)]):
        result = run(*command, "--no-vader")
        one_line_exit_2(result, "cannot read adapter in")
    assert not any(stub.calls for stub in stubs.values())


def test_an_adapter_in_parts_keeps_the_join_hint(tmp_path: Path, stubs: dict[str, Calls]) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(default_adapter_dir(), adapter)
    split_file(adapter / "adapter.safetensors", 2 * 1024 * 1024)
    result = run("calibrate", "--adapter", str(adapter), "--no-vader")
    one_line_exit_2(result, "model join")
    assert not stubs["calibrate"].calls


def test_interpolate_adapters_of_other_labels(tmp_path: Path, stubs: dict[str, Calls]) -> None:
    other = tmp_path / "other"
    shutil.copytree(default_adapter_dir(), other)
    meta = json.loads((other / "meta.json").read_text())
    meta["labels"] = ["a", "b", "c"]
    (other / "meta.json").write_text(json.dumps(meta))
    result = run("interpolate", "--to", str(other), "--out", str(tmp_path / "o"), "--no-vader")
    one_line_exit_2(result, "the adapters differ in 'labels'")
    assert not stubs["interpolate"].calls
    stubs["interpolate"].effect = ValueError("a LoRA module has different shapes")
    result = run("interpolate", "--to", str(default_adapter_dir()), "--out",
                 str(tmp_path / "o"), "--no-vader")
    one_line_exit_2(result, "different shapes")


@pytest.mark.parametrize("command", ["eval", "train", "calibrate", "interpolate", "speed",
                                     "device-pack", "verdict"])
def test_a_bad_data_source(tmp_path: Path, stubs: dict[str, Calls], model_dir: Path,
                           command: str) -> None:
    error = DataSourceError("cannot read the ICWSM 2014 ground truth from bogus.tar.gz")
    for stub in stubs.values():
        stub.effect = error
    args = {"eval": ["--model", str(model_dir)], "speed": ["--model", str(model_dir)],
            "verdict": ["--model", str(model_dir)], "calibrate": [],
            "train": ["--out", str(tmp_path / "o")], "device-pack": ["--out", str(tmp_path / "p")],
            "interpolate": ["--to", str(default_adapter_dir()), "--out", str(tmp_path / "o")]}
    result = run(command, *args[command], "--no-vader")
    one_line_exit_2(result, "cannot read the ICWSM 2014 ground truth from bogus.tar.gz")
    assert not (tmp_path / "p").exists()


def test_a_model_that_cannot_load(model_dir: Path, stubs: dict[str, Calls]) -> None:
    from contract.errors import ModelLoadError

    stubs["eval"].effect = ModelLoadError(f"{model_dir}: labels are not negative/positive")
    result = run("eval", "--model", str(model_dir), "--no-vader")
    one_line_exit_2(result, "labels are not negative/positive")


# 6. calibrate and speed need the train extra


@pytest.mark.parametrize("command", ["calibrate", "speed"])
def test_calibrate_and_speed_need_the_train_extra(monkeypatch: pytest.MonkeyPatch,
                                                  stubs: dict[str, Calls], model_dir: Path,
                                                  command: str) -> None:
    monkeypatch.setattr("training.cli.TRAIN_DATA_PACKAGES", ("no_such_package_bertstream",))
    args = ["--model", str(model_dir)] if command == "speed" else []
    result = run(command, *args, "--no-vader")
    one_line_exit_2(result, f"model {command} needs the train extra")
    assert not stubs[command].calls


# 7. a malformed parts manifest


def _manifest(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(range(256)) * 10)
    split_file(path, 1000)
    manifest = manifest_path(path)
    return manifest, json.loads(manifest.read_text())


@pytest.mark.parametrize("damage", [
    lambda s: s["parts"][0].pop("bytes"), lambda s: s["parts"][1].pop("sha256"),
    lambda s: s["parts"][0].pop("name"), lambda s: s["parts"][0].update(bytes="10"),
    lambda s: s.update(parts={"a": 1}), lambda s: s.update(parts=["x"]), lambda s: s.pop("bytes"),
    lambda s: s.pop("sha256"), lambda s: s.pop("parts"), lambda s: s.update(name=None),
    lambda s: s.update(bytes=True), lambda s: s["parts"][0].update(name="../x"),
])
def test_a_malformed_manifest(tmp_path: Path, damage: Any) -> None:
    manifest, spec = _manifest(tmp_path)
    damage(spec)
    manifest.write_text(json.dumps(spec))
    with pytest.raises(PartsError):
        join_parts(tmp_path)
    assert manifest.exists()
    result = run("join", str(tmp_path))
    one_line_exit_2(result, str(manifest))
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_manifest_not_an_object(tmp_path: Path) -> None:
    manifest, _ = _manifest(tmp_path)
    manifest.write_text("[1, 2]")
    with pytest.raises(PartsError, match="not a parts manifest"):
        join_parts(tmp_path)
