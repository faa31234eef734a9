"""Adapter interpolation (`bertstream model interpolate`): exact in adapter form, picked on dev."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.data import Example
from training.interpolate import ALPHAS, dev_scores, interpolate, pick_alpha, write_interpolated
from worker.sentiment.adapter_file import Adapter, load_adapter, save_adapter
from worker.sentiment.assemble import default_adapter_dir
from worker.sentiment.lora import merge_into

BASE = {"package": "p", "version": "1", "file": "f"}
LABELS = {"0": "negative", "1": "positive"}


def _adapter(modules: list[str], rank: int, alpha: float, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for m in modules:
        lora[f"{m}.lora_a"] = torch.randn(rank, 6, generator=g)
        lora[f"{m}.lora_b"] = torch.randn(5, rank, generator=g)
    full = {"classifier.weight": torch.randn(2, 5, generator=g),
            "classifier.bias": torch.randn(2, generator=g)}
    meta = {"base": BASE, "labels": LABELS, "lora": {"rank": rank, "alpha": alpha}}
    return Adapter(lora, full, meta)


def _merged(adapter_lora: dict[str, torch.Tensor], full: dict[str, torch.Tensor],
            scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    state = {f"{m}.weight": torch.randn(5, 6, generator=g) for m in ("m1", "m2", "m3")}
    merge_into(state, adapter_lora, scale)
    state.update(full)
    return state


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_merged_model_is_the_interpolation_of_the_merged_models(alpha: float) -> None:
    # different ranks, scales and module sets: m1 only in a0, m3 only in a1
    a0 = _adapter(["m1", "m2"], rank=4, alpha=8.0, seed=1)
    a1 = _adapter(["m2", "m3"], rank=3, alpha=1.5, seed=2)
    lora, full = interpolate(a0, a1, alpha)
    assert lora["m2.lora_a"].shape == (7, 6) and lora["m1.lora_b"].shape == (5, 7)
    got = _merged(lora, full, 1.0)
    w0, w1 = _merged(a0.lora, a0.full, a0.scale), _merged(a1.lora, a1.full, a1.scale)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, (1 - alpha) * w0[name] + alpha * w1[name])


def test_written_adapter_round_trips_with_scale_one_and_both_lineages(tmp_path: Path) -> None:
    a0 = _adapter(["m1", "m2"], rank=4, alpha=8.0, seed=1)
    a1 = _adapter(["m1", "m2"], rank=4, alpha=8.0, seed=2)
    for name, a in (("a0", a0), ("a1", a1)):
        save_adapter(tmp_path / name, a.lora, a.full, {**a.meta, "steps": 7, "test": {"zh": 0.5}})
    out = write_interpolated(tmp_path / "a0", tmp_path / "a1", 0.25, tmp_path / "mix")
    mixed = load_adapter(out)
    assert mixed.scale == 1.0 and mixed.meta["lora"]["rank"] == 8
    assert mixed.meta["interpolation"]["alpha"] == 0.25
    assert mixed.meta["interpolation"]["to"]["steps"] == 7
    assert len(mixed.meta["interpolation"]["from"]["adapter_sha256"]) == 64
    # what was written (fp16) merges to the interpolation of what was read back (fp16)
    r0, r1 = load_adapter(tmp_path / "a0"), load_adapter(tmp_path / "a1")
    got = _merged(mixed.lora, mixed.full, mixed.scale)
    w0, w1 = _merged(r0.lora, r0.full, r0.scale), _merged(r1.lora, r1.full, r1.scale)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, 0.75 * w0[name] + 0.25 * w1[name], atol=2e-3, rtol=1e-3)


def test_the_bundled_adapter_with_itself_is_itself() -> None:
    bundled = load_adapter(default_adapter_dir())
    lora, full = interpolate(bundled, bundled, 0.37)
    modules = [k[: -len(".lora_a")] for k in bundled.lora if k.endswith(".lora_a")]
    assert modules and len(lora) == len(bundled.lora)
    for m in modules[:8]:
        want = bundled.scale * bundled.lora[f"{m}.lora_b"] @ bundled.lora[f"{m}.lora_a"]
        torch.testing.assert_close(lora[f"{m}.lora_b"] @ lora[f"{m}.lora_a"], want)
    for name, tensor in full.items():
        torch.testing.assert_close(tensor, bundled.full[name])


def test_what_cannot_be_interpolated_is_refused() -> None:
    a0 = _adapter(["m1"], rank=4, alpha=8.0, seed=1)
    with pytest.raises(ValueError, match="alpha"):
        interpolate(a0, a0, 1.5)
    other_base = Adapter(a0.lora, a0.full, {**a0.meta, "base": {**BASE, "version": "2"}})
    with pytest.raises(ValueError, match="base"):
        interpolate(a0, other_base, 0.5)
    fewer = Adapter(a0.lora, {"classifier.weight": a0.full["classifier.weight"]}, a0.meta)
    with pytest.raises(ValueError, match="full tensors"):
        interpolate(a0, fewer, 0.5)
    wide = _adapter(["m1"], rank=4, alpha=8.0, seed=3)
    wide.lora["m1.lora_a"] = torch.randn(4, 9)
    with pytest.raises(ValueError, match="m1"):
        interpolate(a0, wide, 0.5)


def test_a_full_tensor_trained_on_one_side_is_the_base_on_the_other() -> None:
    a0 = _adapter(["m1"], rank=4, alpha=8.0, seed=1)
    a1 = _adapter(["m1"], rank=4, alpha=8.0, seed=2)
    a1.full["m1.bias"] = torch.randn(5)
    base = {"m1.bias": torch.randn(5), "m1.weight": torch.randn(5, 6)}
    lora, full = interpolate(a0, a1, 0.25, base)
    torch.testing.assert_close(full["m1.bias"], 0.75 * base["m1.bias"] + 0.25 * a1.full["m1.bias"])
    _, back = interpolate(a1, a0, 0.25, base)  # either side
    torch.testing.assert_close(back["m1.bias"], 0.75 * a1.full["m1.bias"] + 0.25 * base["m1.bias"])
    with pytest.raises(ValueError, match="not in the base"):
        interpolate(a0, a1, 0.25, {"m1.weight": base["m1.weight"]})


def test_written_interpolation_fills_a_one_sided_tensor_from_the_real_base(tmp_path: Path) -> None:
    from training.interpolate import base_state

    bundled = load_adapter(default_adapter_dir())
    name = "bert.embeddings.position_embeddings.weight"
    assert name not in bundled.full
    base = base_state()[name]
    save_adapter(tmp_path / "gpu", bundled.lora, {**bundled.full, name: base + 1.0}, bundled.meta)
    mixed = load_adapter(write_interpolated(default_adapter_dir(), tmp_path / "gpu", 0.5,
                                            tmp_path / "mix"))
    torch.testing.assert_close(mixed.full[name].float(), base + 0.5, atol=2e-3, rtol=1e-3)


def test_pick_alpha_takes_the_lowest_nll_and_on_a_tie_the_smaller_alpha() -> None:
    assert pick_alpha({0.0: {"nll_mean": 0.30}, 0.5: {"nll_mean": 0.28},
                       1.0: {"nll_mean": 0.29}}) == 0.5
    assert pick_alpha({1.0: {"nll_mean": 0.28}, 0.25: {"nll_mean": 0.28}}) == 0.25


def test_the_cli_grid_is_the_modules_grid() -> None:
    # The CLI keeps its default as a literal (it imports no torch at start-up); the GPU
    # trainer's second chance uses ALPHAS: both must be the same grid.
    from training.cli import model_interpolate_command

    option = next(p for p in model_interpolate_command.params if p.name == "alphas")
    assert tuple(option.default) == ALPHAS  # type: ignore[arg-type]


def test_dev_scores_per_language() -> None:
    dev = [Example("a", 1, "en", "s"), Example("b", 0, "en", "s"), Example("c", 1, "zh", "s"),
           Example("d", 0, "zh", "s")]
    logits = torch.tensor([[0.0, 2.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    scores = dev_scores(dev, logits)
    assert scores["acc_en"] == 0.5 and scores["acc_zh"] == 1.0 and scores["acc_mean"] == 0.75
    assert scores["nll_mean"] == pytest.approx((scores["nll_en"] + scores["nll_zh"]) / 2, abs=1e-4)


def test_interpolate_main_scores_every_alpha_on_dev_and_writes_the_pick_calibrated(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real command's path on the tiny BERT: the fake assembly puts the adapter's classifier in."""
    from training import data
    from training.interpolate import interpolate_main
    from worker.sentiment import assemble

    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    hidden = weights["classifier.weight"].shape[1]
    built: list[Path] = []

    def fake_build(out: Path, adapter_dir: Path, revision: str, progress: bool = True) -> None:
        shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
        state = dict(weights)
        state.update(load_adapter(adapter_dir).full)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
        built.append(out)

    g = torch.Generator().manual_seed(5)
    for name, gain in (("a0", 0.1), ("a1", 3.0)):
        full = {"classifier.weight": torch.randn(2, hidden, generator=g) * gain,
                "classifier.bias": torch.zeros(2)}
        save_adapter(tmp_path / name, {}, full, {"base": BASE, "labels": LABELS,
                                                  "lora": {"rank": 16, "alpha": 32.0}})
    texts = ["good", "bad", "fine", "awful", "great", "poor", "好", "差"]
    dev = [Example(t, i % 2, "zh" if i >= 6 else "en", "s") for i, t in enumerate(texts)]
    monkeypatch.setattr(assemble, "build_model_dir", fake_build)
    monkeypatch.setattr(data, "load_examples",
                        lambda sdist, spec, more=None: {"train": [], "dev": dev, "test": []})
    result = interpolate_main(tmp_path / "a0", tmp_path / "a1", [1.0, 0.0, 0.5], tmp_path / "mix",
                              threads=1)
    grid = result["dev"]
    assert sorted(grid) == [0.0, 0.5, 1.0] and len(built) == 3
    assert not any(p.exists() for p in built)  # each candidate's model directory is deleted
    best = result["alpha"]
    assert grid[best]["nll_mean"] == min(s["nll_mean"] for s in grid.values())
    meta = json.loads((tmp_path / "mix" / "meta.json").read_text())
    assert meta["interpolation"]["alpha"] == best and set(meta["interpolation"]["dev"]) == {
        "0", "0.5", "1"}
    assert meta["calibration"]["temperature"] == grid[best]["temperature"]
    assert meta["calibration"]["fitted_on"] == "dev"
    want = (1 - best) * load_adapter(tmp_path / "a0").full["classifier.weight"] + \
        best * load_adapter(tmp_path / "a1").full["classifier.weight"]
    torch.testing.assert_close(load_adapter(tmp_path / "mix").full["classifier.weight"], want,
                               atol=2e-3, rtol=1e-3)


def test_interpolate_main_refuses_a_bad_alpha_before_reading_data(tmp_path: Path) -> None:
    from training.interpolate import interpolate_main

    with pytest.raises(ValueError, match="alpha"):
        interpolate_main(tmp_path, tmp_path, [0.5, 2.0], tmp_path / "out")
    with pytest.raises(ValueError, match="at least one"):
        interpolate_main(tmp_path, tmp_path, [], tmp_path / "out")


def test_the_command_is_served_under_model_and_checks_its_options(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from producer.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["model", "--help"])
    assert result.exit_code == 0 and "interpolate" in result.output
    result = runner.invoke(main, ["model", "interpolate", "--to", str(default_adapter_dir()),
                                  "--out", str(tmp_path / "o"), "--alpha", "1.5"])
    assert result.exit_code == 2 and "1.5" in result.output
    # An empty folder is no adapter: refused before anything loads.
    result = runner.invoke(main, ["model", "interpolate", "--to", str(tmp_path), "--out",
                                  str(tmp_path / "o")])
    assert result.exit_code == 2 and "cannot read adapter" in result.output
