"""A small random BERT written to disk and loaded through ``from_pretrained``.

The tests and the benchmark's ``--model tiny`` never need the bundled model:
they write a config and a vocabulary, initialise random weights with a fixed
seed and save a normal Hugging Face directory, exactly what a user would point
``BERTSTREAM_MODEL`` at.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a an is was very good bad great terrible hotel room service clean dirty movie "
    "film love hate not and but it this that i you we they fun boring happy sad lol omg "
    "today phone app update battery food coffee train late again best worst ever so just"
).split()
_CJK_EXTRA = list("这家酒店的服务很好房间也很干净差脏电影喜欢讨厌")


def write_tiny_bert(
    path: Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 2,
    max_positions: int = 128,
    labels: tuple[str, ...] = ("negative", "positive"),
    seed: int = 0,
    cjk: int = 600,
    poison: str | None = None,
) -> Path:
    """Write a random BertForSequenceClassification + WordPiece tokenizer to ``path``.

    ``cjk``: how many common CJK ideographs (from U+4E00) the vocabulary holds,
    so Chinese text is not all [UNK]. ``poison``: a word the tokenizer knows
    but the model does not (its id is past the embedding table), so any text
    containing it fails (screened before the forward pass, where the model
    would raise an IndexError) while other texts run fine.
    """
    import torch
    from transformers import (  # type: ignore[attr-defined]
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
    )

    path.mkdir(parents=True, exist_ok=True)
    ideographs = [chr(c) for c in range(0x4E00, 0x4E00 + cjk)] + _CJK_EXTRA
    vocab = list(dict.fromkeys(SPECIAL + list(string.ascii_lowercase) + list(string.digits)
                               + list(string.punctuation) + WORDS + ideographs
                               + ["，", "。", "！"]))
    if poison:
        vocab.append(poison)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5 takes the vocabulary as a dict (``vocab=``), not a file path.
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)},
                                  do_lower_case=True, model_max_length=max_positions)
    tokenizer.save_pretrained(str(path))
    config = BertConfig(
        vocab_size=len(vocab) - (1 if poison else 0),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        max_position_embeddings=max_positions,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    # Larger random head weights so probabilities differ visibly between texts.
    torch.nn.init.normal_(model.classifier.weight, std=2.0)
    model.save_pretrained(str(path))
    (path / "bertstream_tiny_model.json").write_text(json.dumps({"seed": seed}), encoding="utf-8")
    return path
