"""The tests' tiny random models: BERT (see worker/tinybert.py, shared with the benchmark),
and an XLM-RoBERTa with a SentencePiece-style tokenizer."""

from __future__ import annotations

import string
from pathlib import Path

from worker.tinybert import WORDS, write_tiny_bert

__all__ = ["write_tiny_bert", "write_tiny_xlmr"]

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
