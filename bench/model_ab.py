"""Serving speed of two sentiment model directories, side by side (fp32, CPU).

    python -m bench.model_ab OLD_MODEL_DIR NEW_MODEL_DIR [--rounds 3] [--texts 512]

Both models score the same held-out test texts (seed 13, shuffled). Each
first makes one untimed warm-up pass (the first pass pays one-off costs);
then every round times both, the order reversed each round (old new, new
old, ...), so neither the warm-up nor a drift of the machine favours one
side; an even ``--rounds`` puts each first equally often. Prints texts/s
per round with its order and the new/old ratio per round. Needs the
``train`` extra. Use ``bertstream model path --adapter DIR`` to assemble an
adapter's directory.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _positive(value: str) -> int:
    """An argparse type: an integer of at least one."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return number


def _model_dir(value: str) -> Path:
    """An argparse type: a model directory (one with config.json)."""
    path = Path(value)
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{value} holds no config.json, so it is not a model directory (an adapter? use "
            f"`bertstream model path --adapter {value}`)")
    return path


def side_by_side(models: Mapping[str, tuple[Any, Any]], texts: Sequence[str],
                 rounds: int) -> list[dict[str, Any]]:
    """Texts/s of each (model, tokenizer) per round, after one untimed warm-up pass each.

    The order is reversed every round (A B, B A, A B, ...). Gives one record per
    round: ``{"round": 1, "order": ["old", "new"], "old": texts/s, "new": texts/s}``.
    """
    from training.speed import texts_per_second

    for model, tokenizer in models.values():
        texts_per_second(model, tokenizer, texts, 32)  # warm-up, not timed
    names = list(models)
    records: list[dict[str, Any]] = []
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]
        record: dict[str, Any] = {"round": index + 1, "order": order}
        for name in order:
            model, tokenizer = models[name]
            record[name] = texts_per_second(model, tokenizer, texts, 32)
        records.append(record)
    return records


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Measure and print; gives {"old": [...], "new": [...]} texts/s per round."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", type=_model_dir)
    ap.add_argument("new", type=_model_dir)
    ap.add_argument("--rounds", type=_positive, default=3)
    ap.add_argument("--texts", type=_positive, default=512)
    ap.add_argument("--threads", type=_positive, default=2)
    args = ap.parse_args(argv)  # a bad argument exits 2 before the slow imports

    import torch

    from training.data import SplitSpec, load_examples
    from training.speed import load

    torch.set_num_threads(args.threads)
    test = list(load_examples(None, SplitSpec(seed=13))["test"])
    random.Random(13).shuffle(test)
    texts = [e.text for e in test[: args.texts]]
    models = {"old": load(args.old), "new": load(args.new)}
    print("one untimed warm-up pass per model; the order alternates each round")
    records = side_by_side(models, texts, args.rounds)
    for record in records:
        print(f"round {record['round']} ({' then '.join(record['order'])}): "
              + ", ".join(f"{name} {record[name]:.1f}" for name in models) + " texts/s")
    out = {name: [record[name] for record in records] for name in models}
    print({name: [round(x, 1) for x in xs] for name, xs in out.items()})
    print("new/old per round:", [round(n / o, 3) for n, o in zip(out["new"], out["old"], strict=True)])
    return out


if __name__ == "__main__":
    main()
