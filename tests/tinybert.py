"""The tests' tiny random models: BERT (see worker/tinybert.py, shared with the benchmark),
and an XLM-RoBERTa with a SentencePiece-style tokenizer."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from worker.tinybert import WORDS, write_tiny_bert

__all__ = ["ARCHITECTURES", "DECODERS", "write_tiny_bert", "write_tiny_model", "write_tiny_xlmr"]

#: Digit runs the vocabulary holds only without the word-start mark "▁": a number at
#: the start of a word, encoded alone, is a lone "▁" and the run (two tokens, one start).
XLMR_DIGIT_RUNS = ["1234", "567", "890"]


def write_tiny_xlmr(path: Path, *, max_positions: int = 34, seed: int = 0) -> Path:
    """Write a random XLMRobertaForSequenceClassification and a Unigram tokenizer to ``path``.

    Like XLM-R's: ``<s> X </s>`` framing, Metaspace pre-tokenizer, ``<pad>``
    = 1 (positions are numbered from 2, so ``max_positions - 2`` tokens fit),
    and no ``model_max_length`` (the tokenizer reports HF's "no limit").
    """
    import torch
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import (  # type: ignore[attr-defined]
        PreTrainedTokenizerFast,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces = ([(s, 0.0) for s in specials] + [("▁", -6.0)]
              + [("▁" + w, -4.0) for w in WORDS] + [(d, -5.0) for d in XLMR_DIGIT_RUNS]
              + [(c, -9.0) for c in string.ascii_lowercase + string.digits + ".!?,。！？"]
              + [(c, -9.0) for c in "这家酒店的服务很好房间也干净"])
    tok = Tokenizer(Unigram(pieces, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
        sep_token="</s>", pad_token="<pad>", unk_token="<unk>",
    ).save_pretrained(str(path))
    config = XLMRobertaConfig(
        vocab_size=len(pieces), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=max_positions, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(seed)
    XLMRobertaForSequenceClassification(config).save_pretrained(str(path))
    return path


#: Architectures :func:`write_tiny_model` builds, each with its own kind of tokenizer.
ARCHITECTURES = ("bert", "distilbert", "roberta", "electra", "albert", "xlmr", "xlnet",
                 "gpt2", "llama", "qwen2")
#: The decoders among them: they classify from the last token that is not padding.
DECODERS = ("gpt2", "llama", "qwen2")


def write_tiny_model(path: Path, arch: str, *, labels: tuple[str, ...] = ("negative", "positive"),
                     problem_type: str | None = None, pad: bool = True, seed: int = 0,
                     max_length: int | None = 64, **config_items: Any) -> Path:
    """Write a random ``arch`` sequence-classification model (hidden 32, 2 layers) and a
    fast tokenizer of its usual kind to ``path``, saved with ``save_pretrained``.

    ``labels``: ``id2label`` in order (one label: a regression head). ``problem_type``:
    the config's (``multi_label_classification``, ``regression``). ``pad=False``: a
    decoder without a padding token in its tokenizer and config, as GPT-2 ships.
    ``max_length``: the tokenizer's ``model_max_length`` (None: no limit, HF's
    sentinel). ``config_items`` override the config's.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    specials: dict[str, int | None] = {"pad_token_id": 1}
    if arch == "xlmr":
        write_tiny_xlmr(path, seed=seed)  # its tokenizer; the model is replaced below
        vocab_size = AutoConfig.from_pretrained(str(path)).vocab_size
    else:
        path.mkdir(parents=True, exist_ok=True)
        vocab_size, specials = _write_tokenizer(path, arch, pad=pad, max_length=max_length)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": vocab_size, "max_position_embeddings": 64}
    shapes = {
        "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64,
                       "vocab_size": vocab_size, "max_position_embeddings": 64},
        "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
                 "vocab_size": vocab_size},
        "albert": {**small, "embedding_size": 16},
        "electra": {**small, "embedding_size": 16},
        "llama": {**small, "num_key_value_heads": 1},
        "qwen2": {**small, "num_key_value_heads": 1},
        "xlmr": {**small, "max_position_embeddings": 34, "type_vocab_size": 1},
        # XLNet has no position table (relative positions) and reads the last position.
        "xlnet": {"d_model": 32, "n_layer": 2, "n_head": 2, "d_inner": 64,
                  "vocab_size": vocab_size},
    }
    model_type = {"xlmr": "xlm-roberta"}.get(arch, arch)
    config = AutoConfig.for_model(
        model_type, **shapes.get(arch, small), **specials,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        problem_type=problem_type, **config_items)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    # Larger random weights so probabilities differ visibly between texts.
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(str(path))
    return path


def _write_tokenizer(path: Path, arch: str, *, pad: bool,
                     max_length: int | None) -> tuple[int, dict[str, int | None]]:
    """Save ``arch``'s kind of fast tokenizer to ``path``; its size and special ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE, Unigram
    from transformers import (  # type: ignore[attr-defined]
        BertTokenizerFast,
        DistilBertTokenizerFast,
        PreTrainedTokenizerFast,
    )

    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    limit: dict[str, Any] = {"model_max_length": max_length} if max_length else {}
    if arch in ("bert", "distilbert", "electra"):
        vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                   + list(string.ascii_lowercase + string.digits
                                          + string.punctuation) + WORDS))
        cls = DistilBertTokenizerFast if arch == "distilbert" else BertTokenizerFast
        cls(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True,
            **limit).save_pretrained(str(path))
        return len(vocab), {"pad_token_id": 0}
    if arch in ("albert", "xlnet"):
        # SentencePiece-style: ALBERT frames a text [CLS] X [SEP], XLNet X <sep> <cls>
        # (and pads on the left).
        specials = ["<pad>", "<unk>", "[CLS]", "[SEP]"]
        pieces = ([(s, 0.0) for s in specials] + [("▁", -6.0)] + [("▁" + w, -4.0) for w in WORDS]
                  + [(c, -9.0) for c in string.ascii_lowercase + string.digits + ".!?,"])
        tok = Tokenizer(Unigram(pieces, unk_id=1, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        frame = ("[CLS] $A [SEP]", "[CLS] $A [SEP] $B [SEP]") if arch == "albert" else (
            "$A [SEP] [CLS]", "$A [SEP] $B [SEP] [CLS]")
        tok.post_processor = processors.TemplateProcessing(
            single=frame[0], pair=frame[1], special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]",
                                pad_token="<pad>", unk_token="<unk>",
                                padding_side="left" if arch == "xlnet" else "right",
                                **limit).save_pretrained(str(path))
        return len(pieces), {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    # Byte-level BPE, trained on the word list: RoBERTa's and the decoders' kind.
    names = {"roberta": ["<s>", "<pad>", "</s>", "<unk>"],
             "gpt2": ["<|endoftext|>"], "llama": ["<s>", "</s>"],
             "qwen2": ["<|endoftext|>"]}[arch]
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=names, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids: dict[str, int] = {}
    for n in names:
        found = tok.token_to_id(n)
        assert found is not None, n
        ids[n] = found
    kwargs: dict[str, str] = {}
    special: dict[str, int | None] = {}
    if arch == "roberta":
        tok.post_processor = processors.RobertaProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"]))
        kwargs = {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>",
                  "sep_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        special = {"pad_token_id": ids["<pad>"], "bos_token_id": ids["<s>"],
                   "eos_token_id": ids["</s>"]}
    elif arch == "llama":
        # Llama prepends <s> and pads with </s> (its fine-tunes set pad = eos).
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])])
        kwargs = {"bos_token": "<s>", "eos_token": "</s>"}
        special = {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"]}
    else:
        eos = names[0]
        kwargs = {"bos_token": eos, "eos_token": eos}
        special = {"bos_token_id": ids[eos], "eos_token_id": ids[eos]}
    eos_name = kwargs["eos_token"]
    if pad and arch != "roberta":
        kwargs["pad_token"] = eos_name
        special["pad_token_id"] = ids[eos_name]
    elif arch != "roberta":
        special["pad_token_id"] = None
    PreTrainedTokenizerFast(tokenizer_object=tok, **limit,
                            **kwargs).save_pretrained(str(path))
    return tok.get_vocab_size(), special
