"""The model runner, split into pre / core / post.

- ``encode`` (pre, CPU): tokenize each text alone, truncated to the model's
  maximum, remembering which were truncated; ``offsets`` gives the character
  span of every token of a whole text (the windows of a long text are cut
  from them, worker/windows.py).
- ``collate`` (pre): pad one planned batch into a typed :class:`PaddedBatch`,
  on the side (right, or left for models that read a text's last position such
  as XLNet) where a batch gives every text its results alone, checked at load.
- ``forward`` (core, device): one batched forward pass, probabilities back
  (logits divided by the model's calibration temperature when it has one):
  a softmax, or one sigmoid per label for a multi-label head.
- ``decode`` (post): probabilities to label, score and every label's;
  ``neutral`` when the top probability is below the optional neutral band.

A runner is built once per worker process and injected into the task; it is
never built at import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from contract.errors import ConfigError, ModelLoadError
from worker.device import Placement
from worker.model_checks import SIGMOID, batching_refusal, check_labels, output_kind
from worker.sentiment.calibration import CALIBRATION_FILE, load_temperature

log = logging.getLogger(__name__)

#: The label given when the top probability is below ``neutral_below``.
NEUTRAL = "neutral"
#: On CUDA a batch's width is rounded up to a multiple of this (within max_length).
_CUDA_WIDTH_STEP = 8
#: Two texts of different lengths: at load, batched together, each must score as alone.
_PROBE_TEXTS = ("ok", "fine " * 16)
#: How far (in a probability) the batched probe may differ from alone: float32 is exact
#: but for summation order; half precision is not, and only a gross difference tells.
_PROBE_TOLERANCE = {torch.float32: 1e-4}
_PROBE_TOLERANCE_HALF = 0.05
#: A model whose config has no position table (XLNet) and whose tokenizer no limit.
_NO_LIMIT_DEFAULT = 512
#: The most tokens one text (or window) takes when BERTSTREAM_MAX_LENGTH is 0: a
#: long-context model's own maximum (131072 for many decoders) would let one text take
#: the memory of many batches, and warm-up run that width at start. It equals the
#: default token budget, so one text fits one default batch; a longer limit, up to the
#: model's own, must be asked for with BERTSTREAM_MAX_LENGTH.
LONGEST_DEFAULT = 8192


@dataclass(frozen=True)
class Encoded:
    """One tokenized text: token ids with special tokens, and a truncation flag."""

    ids: list[int]
    truncated: bool


@dataclass
class PaddedBatch:
    """Tensors for one forward pass, plus which flush items the rows are."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    rows: list[int]
    real_tokens: int

    @property
    def padded_tokens(self) -> int:
        """rows x padded length."""
        return int(self.input_ids.numel())


@dataclass(frozen=True)
class Prediction:
    """The decoded output for one text."""

    label: str
    score: float
    scores: dict[str, float]


class NonFiniteScores(ModelLoadError):
    """The model gives NaN or infinite probabilities for plain short texts at this precision."""


class Runner(Protocol):
    """What the batcher needs from a model."""

    name: str
    revision: str | None
    max_length: int
    #: Special tokens encode adds to every text ([CLS] and [SEP]: 2).
    special_tokens: int

    def encode(self, texts: Sequence[str]) -> list[Encoded]: ...

    def offsets(self, text: str) -> list[tuple[int, int]]: ...

    def collate(self, encoded: Sequence[Encoded], rows: list[int]) -> PaddedBatch: ...

    def forward(self, batch: PaddedBatch) -> torch.Tensor: ...

    def decode(self, probs: torch.Tensor) -> list[Prediction]: ...


#: Files besides config.json and the weights that change how texts are scored: the
#: tokenizer's (a fast one's, a slow one's vocabulary, SentencePiece and tiktoken models).
REVISION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "*.model",
                  "*.spm", "*.tiktoken")


def directory_revision(path: Path) -> str:
    """A short content revision of a model directory.

    Uses ``bertstream_model.json``'s ``revision`` when present; otherwise
    hashes the bytes of config.json, the calibration file, the tokenizer
    files (:data:`REVISION_FILES`) and the weight files. Weights fine-tuned
    again keep their file's size (and config.json), so only their bytes tell
    two trainings apart; a copy of the directory on another host (new mtimes)
    keeps its revision. Hashing reads the weights once more at load, from the
    page cache transformers just filled.
    """
    meta = path / "bertstream_model.json"
    if meta.is_file():
        rev = json.loads(meta.read_text(encoding="utf-8")).get("revision")
        if rev:
            return str(rev)[:64]
    digest = hashlib.sha256()
    names = {"config.json", CALIBRATION_FILE}
    for pattern in (*REVISION_FILES, "*.safetensors", "*.bin"):
        names.update(f.name for f in path.glob(pattern))
    for name in sorted(names):
        f = path / name
        if f.is_file():
            content = hashlib.sha256()
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    content.update(chunk)
            digest.update(f"{name}:{content.hexdigest()}\n".encode())
    return digest.hexdigest()[:12]


class HFRunner:
    """A Hugging Face sequence-classification model on one device."""

    def __init__(
        self,
        model_dir: Path,
        placement: Placement,
        *,
        name: str | None = None,
        max_length: int = 0,
        neutral_below: float = 0.0,
    ) -> None:
        """Load tokenizer and model from ``model_dir`` (``from_pretrained``).

        ``max_length`` caps the tokens of one text at the model's own maximum;
        0 takes that maximum, at most :data:`LONGEST_DEFAULT`. A tokenizer with
        more tokens than the model's embedding table is served (a warning is
        logged); texts using those tokens fail alone (:meth:`token_id_error`).
        A ``calibration.json`` in ``model_dir`` gives the temperature the
        logits are divided by. ``neutral_below`` > 0: a text whose top
        probability is below it is labelled ``neutral``. Raises
        :class:`ModelLoadError` when ``model_dir`` is no directory, lacks a part
        (:data:`MODEL_PARTS`, named in the message), is not a loadable
        sequence-classification model with a fast tokenizer that has a vocabulary,
        has a regression head or labels a row cannot hold, fails on a padded
        batch of two texts (a decoder without ``pad_token_id``), or its
        calibration file is unreadable (worker/model_checks.py); :class:`ConfigError`
        when a softmax head's ``neutral_below`` is at most 1/(number of labels), a band
        no top probability can fall below.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.placement = placement
        self.model_dir = Path(model_dir)
        check_model_dir(self.model_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), dtype=placement.dtype, output_loading_info=True
            )
        except Exception as exc:  # noqa: BLE001 - transformers raises anything (RuntimeError
            # for a size mismatch, SafetensorError for a cut file); all mean "cannot load"
            raise ModelLoadError(_load_refusal(self.model_dir, exc)) from exc
        check_vocabulary(tokenizer, self.model_dir)
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            # transformers fills them with random values and only logs it: a worker
            # would serve random labels. A headless encoder is the usual case.
            prefix = f"{getattr(model, 'base_model_prefix', '')}."
            head = [k for k in missing if not k.startswith(prefix)]
            shown = (head or missing)[:6]
            more = f" and {len(missing) - len(shown)} more" if len(missing) > len(shown) else ""
            what = ("has no trained classification head" if head
                    else "lacks weights of its encoder")
            raise ModelLoadError(
                f"{model_dir} {what} (missing: {', '.join(shown)}{more}): it is not a "
                f"sequence-classification model; its random weights would give random "
                f"labels{_rebuild_hint(self.model_dir)}")
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(f"{model_dir}: a fast (Rust) tokenizer is required")
        #: SOFTMAX or SIGMOID (multi-label): how launch() turns logits into probabilities.
        self.output = output_kind(model.config, self.model_dir)
        try:
            self.temperature = load_temperature(self.model_dir) or 1.0
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        self.neutral_below = neutral_below
        self.model = model.to(placement.device).eval()
        #: launch() returns before the device finishes (CUDA): batches can overlap.
        self.asynchronous = placement.is_cuda
        self.name = name or self.model_dir.name
        self.revision: str | None = directory_revision(self.model_dir)
        if placement.quantize:
            # Weights int8 (below, once padding is checked on the exact model),
            # activations quantized per batch at run time: ~2-3x faster on CPU;
            # results differ slightly from fp32 and depend a little on
            # batch-mates, so the rows say so in model_revision.
            self.revision = f"{self.revision}+int8"
        if neutral_below > 0:
            self.revision = f"{self.revision}+neutral{neutral_below:g}"
        limit = _model_max_length(model, tokenizer)
        self.max_length = _serving_length(self.model_dir, limit, max_length)
        special = int(tokenizer.num_special_tokens_to_add(pair=False))
        self.special_tokens = special
        if self.max_length <= special:
            # The Rust tokenizer cannot cut below its special tokens and would
            # silently not truncate at all; long texts would then fail the model.
            raise ConfigError(
                f"BERTSTREAM_MAX_LENGTH={max_length} leaves no room for text: the model adds "
                f"{special} special tokens; use 0 (the model's maximum, at most "
                f"{LONGEST_DEFAULT}) or more than {special}")
        #: Rows of the input embedding table: a token id at or above it cannot be looked up.
        self.vocab_size = _embedding_rows(model)
        self.pad_id = _pad_id(model.config, tokenizer, self.vocab_size)
        if self.vocab_size and len(tokenizer) > self.vocab_size:
            # transformers loads such a pair without a word; a text using one of the extra
            # tokens is failed before the forward pass (token_id_error), never run.
            log.warning("%s: its tokenizer has %d tokens but the model's embedding table only "
                        "%d rows: texts using a token id of %d or more will fail; resize the "
                        "model's token embeddings to the tokenizer or use the tokenizer it "
                        "was trained with", self.model_dir, len(tokenizer), self.vocab_size,
                        self.vocab_size)
        self.labels = [
            str(model.config.id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)
        ]
        check_labels(self.labels, self.model_dir)
        # The top of n softmax probabilities is at least 1/n; independent sigmoids have no floor.
        floor = 1 / len(self.labels) if self.output != SIGMOID else 0.0
        if 0 < neutral_below <= floor:
            # The top of n probabilities is at least 1/n: such a band labels nothing
            # neutral, yet every row would say +neutral<p> in its model_revision.
            raise ConfigError(
                f"BERTSTREAM_NEUTRAL_BELOW={neutral_below:g} can never label a text neutral: "
                f"the top probability of {len(self.labels)} labels is at least {floor:.3g}; "
                f"use a value above {floor:.3g}, or 0 to turn the band off")
        self.uses_token_types = getattr(model.config, "type_vocab_size", 0) > 1
        # A private copy: truncation is a setting of the Rust tokenizer object.
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._tok.no_padding()
        self._tok.enable_truncation(self.max_length)
        self._whole = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._whole.no_padding()
        self._whole.no_truncation()
        #: Pad on the left (XLNet reads a text's last position); chosen by _choose_padding.
        self.pad_left = False
        self._choose_padding()
        if placement.quantize:
            self.model = quantize_int8(self.model)

    def _choose_padding(self) -> None:
        """Pad on the side where a batch of two texts of different lengths gives each its
        probabilities alone (right, else left); raise :class:`ModelLoadError` when
        neither does, or the batch fails.

        A model that cannot batch (a decoder without ``pad_token_id``) would fail
        every batch of the worker, each then bisected down to single texts; one
        that reads padding as text would silently score short texts wrong.
        """
        encoded = self.encode(list(_PROBE_TEXTS))
        tolerance = _PROBE_TOLERANCE.get(self.placement.dtype, _PROBE_TOLERANCE_HALF)
        off = {}
        try:
            alone = torch.cat([self.forward(self.collate(encoded, [i])) for i in (0, 1)])
            if not bool(torch.isfinite(alone).all()):
                raise NonFiniteScores(self._non_finite_refusal())
            for left in (False, True):
                self.pad_left = left
                off[left] = float((self.forward(self.collate(encoded, [0, 1])) - alone)
                                  .abs().max())
                if off[left] <= tolerance:
                    return
        except NonFiniteScores:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the model raises, it cannot batch
            raise ModelLoadError(batching_refusal(self.model, self.model_dir, exc,
                                                  _one_line(exc))) from exc
        raise ModelLoadError(
            f"{self.model_dir}: padding changes its results: a batch of two texts of "
            f"different lengths scores them differently from each alone (by up to "
            f"{min(off.values()):.2g} in a probability, padded on either side); "
            f"{type(self.model).__name__} cannot be served in batches")

    def _non_finite_refusal(self) -> str:
        """Why a model whose probabilities for two plain probe texts are NaN or infinite
        is not served: every text would fail (or, unchecked, be stored as NaN)."""
        dtype = str(self.placement.dtype).removeprefix("torch.")
        if self.placement.dtype == torch.float16:
            hint = "float16 overflows past 65504: set BERTSTREAM_DTYPE=bfloat16 or float32"
        else:
            hint = "its weights hold NaN or infinite values; retrain or re-export it"
        return (f"{self.model_dir}: the model gives NaN or infinite scores for plain short "
                f"texts at {dtype}: {hint}")

    def token_id_error(self, ids: Sequence[int]) -> str | None:
        """Why the model cannot take ``ids`` (a token id beyond its embedding table), or None.

        Such an id comes from a tokenizer with tokens the model lacks (added tokens
        without resized embeddings, a larger vocabulary file). On the CPU the model
        raises an IndexError; on CUDA it is a device-side assert that breaks every later
        CUDA call of the process, so it is checked here, on the host, first.
        """
        top = max(ids, default=-1)
        if not self.vocab_size or top < self.vocab_size:
            return None
        token = self._whole.id_to_token(top)
        named = f" ({token[:40]!r})" if token is not None else ""
        return (f"token id {top}{named} is outside the model's embedding table of "
                f"{self.vocab_size} rows: its tokenizer has tokens the model lacks; resize the "
                f"model's token embeddings to the tokenizer (and fine-tune them), or use the "
                f"tokenizer the model was trained with")

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Tokenize each text alone (no padding); flags texts cut at max_length."""
        encodings = self._tok.encode_batch(list(texts))
        return [Encoded(list(e.ids), bool(e.overflowing)) for e in encodings]

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """The character span of every token of ``text``, uncut, without special tokens."""
        return [(int(a), int(b)) for a, b in
                self._whole.encode(text, add_special_tokens=False).offsets]

    def collate(self, encoded: Sequence[Encoded], rows: list[int]) -> PaddedBatch:
        """Pad ``rows`` of ``encoded`` to their longest into CPU tensors (pinned on CUDA)."""
        width = max(len(encoded[r].ids) for r in rows)
        if self.placement.is_cuda:
            # Widths in steps of 8 suit the tensor cores and leave fewer shapes to warm up.
            width = max(width, min(-(-width // _CUDA_WIDTH_STEP) * _CUDA_WIDTH_STEP,
                                   self.max_length))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        real = 0
        for i, r in enumerate(rows):
            seq = encoded[r].ids
            at = slice(width - len(seq), width) if self.pad_left else slice(0, len(seq))
            ids[i, at] = torch.tensor(seq, dtype=torch.long)
            mask[i, at] = 1
            real += len(seq)
        types = torch.zeros_like(ids) if self.uses_token_types else None
        if self.placement.is_cuda:
            # Pinned host memory lets the copy to the GPU run asynchronously.
            ids, mask = ids.pin_memory(), mask.pin_memory()
            types = types.pin_memory() if types is not None else None
        return PaddedBatch(ids, mask, types, list(rows), real)

    def warm_up(self, token_budget: int, max_batch_size: int) -> int:
        """Run one batch of every power-of-two shape the planner can produce; give the count.

        The first pass of a new shape on a GPU pays one-off costs (kernels
        loaded and chosen, allocator blocks created) many times the pass
        itself; a worker pays them here, at start, instead of on the first
        requests. Widths run from 8 to ``max_length``, rows from 1 to
        ``max_batch_size`` within ``token_budget`` tokens.
        """
        widths = sorted({*(1 << k for k in range(3, 16) if (1 << k) < self.max_length),
                         self.max_length})
        fill = self.pad_id + 1 if self.pad_id + 1 < self.vocab_size else 0
        count = 0
        for width in widths:
            rows = 1
            while rows <= max_batch_size and rows * width <= max(token_budget, width):
                ids = torch.full((rows, width), fill, dtype=torch.long)
                mask = torch.ones_like(ids)
                types = torch.zeros_like(ids) if self.uses_token_types else None
                self.forward(PaddedBatch(ids, mask, types, list(range(rows)), rows * width))
                count += 1
                rows *= 2
        return count

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        """Run one batch; gives float32 probabilities on the CPU, one row per text."""
        return self.fetch(self.launch(batch))

    def launch(self, batch: PaddedBatch) -> Any:
        """Start one batch and return without waiting for the device.

        On CUDA the kernels and the copy of the probabilities back into
        pinned host memory are queued on the current stream; :meth:`fetch`
        waits for them. On the CPU the work is done here.
        """
        if batch.input_ids.numel():
            # On the host tensors, before any reaches the device: an id beyond the table
            # is a sticky device-side assert on CUDA (callers screen texts first).
            why = self.token_id_error([int(batch.input_ids.max())])
            if why is not None:
                raise ValueError(why)
        dev = self.placement.device
        inputs: dict[str, Any] = {
            "input_ids": batch.input_ids.to(dev, non_blocking=True),
            "attention_mask": batch.attention_mask.to(dev, non_blocking=True),
        }
        if batch.token_type_ids is not None:
            inputs["token_type_ids"] = batch.token_type_ids.to(dev, non_blocking=True)
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float()
            if self.temperature != 1.0:
                logits = logits / self.temperature
            probs = (torch.sigmoid(logits) if self.output == SIGMOID
                     else torch.softmax(logits, dim=-1))
            if not self.placement.is_cuda:
                return probs
            host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
            host.copy_(probs, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return host, done

    def fetch(self, handle: Any) -> torch.Tensor:
        """The CPU probabilities of a :meth:`launch`, once the device has finished."""
        if isinstance(handle, tuple):
            host, done = handle
            done.synchronize()
            return host
        return handle

    def decode(self, probs: torch.Tensor) -> list[Prediction]:
        """Probabilities to predictions (argmax label, its probability, all of them).

        Below the neutral band the label is ``neutral``; the score stays the
        top probability and ``scores`` the model's. A multi-label head's are
        independent sigmoids: they need not sum to 1.
        """
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            label = NEUTRAL if row[best] < self.neutral_below else self.labels[best]
            out.append(
                Prediction(label, float(row[best]),
                           {label: float(p) for label, p in zip(self.labels, row, strict=True)})
            )
        return out


def _serving_length(model_dir: Path, limit: int, max_length: int) -> int:
    """The tokens one text takes: ``max_length`` (BERTSTREAM_MAX_LENGTH; 0: the model's
    own ``limit``, up to :data:`LONGEST_DEFAULT`), never more than ``limit``. A cap the
    user did not choose is logged, so that a length is never lowered without a word."""
    if max_length and max_length > limit:
        log.warning("%s: BERTSTREAM_MAX_LENGTH=%d is more than the model takes (%d "
                    "tokens); texts are cut (or windowed) at %d",
                    model_dir, max_length, limit, limit)
    if not max_length and limit > LONGEST_DEFAULT:
        log.info("%s: the model takes up to %d tokens; texts are cut (or windowed) at "
                 "%d, the default most; set BERTSTREAM_MAX_LENGTH (up to %d) for more",
                 model_dir, limit, LONGEST_DEFAULT, limit)
    return min(limit, max_length) if max_length else min(limit, LONGEST_DEFAULT)


def _load_refusal(model_dir: Path, exc: BaseException) -> str:
    """Why ``model_dir`` could not be loaded (one line), in the user's terms where
    transformers' words mislead: a head whose size config.json contradicts, a
    SentencePiece tokenizer without the package that converts it."""
    reason = _mismatch_reason(model_dir) if "ignore_mismatched_sizes" in str(exc) else None
    if reason is None and any(w in str(exc).lower() for w in ("tiktoken", "sentencepiece")):
        reason = _sentencepiece_reason(model_dir)
    if reason is not None:
        return f"cannot load a model from {model_dir}: {reason}{_rebuild_hint(model_dir)}"
    return f"cannot load a model from {model_dir}: {_one_line(exc)}{_rebuild_hint(model_dir)}"


def _mismatch_reason(model_dir: Path) -> str | None:
    """Which weights have another shape than config.json gives them, and, for the
    classification head, how many labels it was trained with (transformers only says
    "You set `ignore_mismatched_sizes` to `False`" and prints a table). Loads the
    directory once more, keeping nothing; None when that fails too."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report was printed by the first try
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception:  # noqa: BLE001 - the first error stands then
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
    mismatched = sorted((str(k), list(a), list(b)) for k, a, b in info.get("mismatched_keys") or ())
    if not mismatched:
        return None
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    del model
    shown = "; ".join(f"{key} is {trained} in the weights but {wanted} by config.json"
                      for key, trained, wanted in mismatched[:3])
    more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
    labels = int(config.num_labels)
    head = [trained for key, trained, wanted in mismatched
            if not key.startswith(prefix) and trained and wanted and wanted[0] == labels]
    hint = (f"; config.json's id2label names {labels} labels but the trained classification "
            f"head has {head[0][0]} outputs: give id2label the labels the model was trained "
            f"with, in their order" if head else
            "; config.json does not describe these weights: use the config.json saved with them")
    return f"its weights do not fit its config.json ({shown}{more}){hint}"


def _sentencepiece_reason(model_dir: Path) -> str | None:
    """A tokenizer that is a SentencePiece model alone (no tokenizer.json) needs the
    sentencepiece package to be converted; without it transformers ends up asking for
    tiktoken. None when that is not the case."""
    import importlib.util

    if (model_dir / "tokenizer.json").is_file() or importlib.util.find_spec("sentencepiece"):
        return None
    pieces = sorted(f.name for pattern in ("*.model", "*.spm") for f in model_dir.glob(pattern))
    if not pieces:
        return None
    return (f"its tokenizer is the SentencePiece model {pieces[0]} without a tokenizer.json, "
            f"and converting it needs the sentencepiece package: pip install sentencepiece "
            f"protobuf, or save the fast tokenizer with the model (tokenizer.save_pretrained "
            f"writes tokenizer.json)")


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line: its class when the message is empty, newlines folded."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


#: A model directory's parts, each as the files that hold it (any one will do; a name with
#: ``*`` is a pattern), and how a refusal names it. Weights are those a PyTorch model loads;
#: the tokenizer files are the common ones (a fast tokenizer's, or the vocabulary of a slow
#: one, which transformers converts).
MODEL_PARTS = (
    (("config.json",), "config.json"),
    (("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
      "pytorch_model.bin.index.json"), "weights file (model.safetensors or pytorch_model.bin)"),
    (("tokenizer.json", "vocab.txt", "vocab.json", "*.model", "*.spm", "*.tiktoken"),
     "tokenizer file (tokenizer.json, vocab.txt, vocab.json or a SentencePiece *.model)"),
)


def check_model_dir(model_dir: Path) -> None:
    """Raise :class:`ModelLoadError` (one line) unless ``model_dir`` is a directory holding
    every part of :data:`MODEL_PARTS`: checked before transformers loads it, which reads a
    missing path as a Hub repo id and answers a partial folder misleadingly."""
    if not model_dir.is_dir():
        what = "not a directory" if model_dir.exists() else "no such directory"
        raise ModelLoadError(f"cannot load a model from {model_dir}: {what} (a model is a "
                             f"sequence-classification directory, or 'default')")
    missing_parts = _missing_parts(model_dir)
    if missing_parts:
        raise ModelLoadError(_not_a_model_dir(model_dir, missing_parts))


def check_vocabulary(tokenizer: Any, model_dir: Path) -> None:
    """Raise :class:`ModelLoadError` when ``tokenizer`` knows its special tokens only:
    transformers builds such a tokenizer from a vocabulary that holds no more (or from
    none), and every text would then be read as [UNK]."""
    specials = len(set(tokenizer.all_special_ids))
    if len(tokenizer) <= specials:
        raise ModelLoadError(f"{model_dir}: its tokenizer has no vocabulary beyond its "
                             f"{specials} special tokens; every text would read as unknown "
                             f"tokens{_rebuild_hint(model_dir)}")


def _missing_parts(model_dir: Path) -> list[str]:
    """The parts of :data:`MODEL_PARTS` that ``model_dir`` has no file of."""
    def has(name: str) -> bool:
        return (any(f.is_file() for f in model_dir.glob(name)) if "*" in name
                else (model_dir / name).is_file())

    return [what for names, what in MODEL_PARTS if not any(has(n) for n in names)]


def _not_a_model_dir(model_dir: Path, missing: list[str]) -> str:
    """One line: ``model_dir`` is not a model directory, and which parts it lacks.

    Checked before transformers loads it: from an empty directory it answers with
    advice to install sentencepiece, and without tokenizer files it builds a tokenizer
    of the special tokens alone.
    """
    lacks = "no " + (missing[0] if len(missing) == 1
                     else ", no ".join(missing[:-1]) + " and no " + missing[-1])
    return (f"{model_dir} is not a model directory: {lacks}; a Hugging Face "
            f"sequence-classification model folder holds config.json, the weights and the "
            f"tokenizer files{_rebuild_hint(model_dir)}")


def _rebuild_hint(model_dir: Path) -> str:
    """For a model assembled into the cache (its ``.complete`` marker), how to get a fresh one."""
    if (model_dir / ".complete").is_file() and (model_dir / "bertstream_model.json").is_file():
        return f"; it was assembled into the cache: delete {model_dir} to rebuild it"
    return ""


def quantize_int8(model: Any) -> Any:
    """``model`` with every ``nn.Linear`` dynamically quantized to int8 (CPU).

    torch marks ``torch.ao.quantization`` deprecated in favour of the separate
    torchao package but still ships it (2.13); its warning is silenced here
    and a torch without it gives a clear error instead of an AttributeError.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DeprecationWarning + UserWarning
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(
            f"BERTSTREAM_DTYPE=int8 needs torch.ao.quantization, missing in torch "
            f"{torch.__version__}: {exc}") from exc


class NullRunner:
    """A model that does nothing: every text is ``positive`` with score 1.

    Used to measure what queueing, batching and persistence cost per text
    (the pipeline ceiling in the benchmark).
    """

    name = "null"
    revision: str | None = "0"
    max_length = 512
    special_tokens = 2

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        """Whitespace words stand in for tokens (bounded by max_length)."""
        out = []
        for t in texts:
            n = len(t.split()) + 2
            out.append(Encoded([0] * min(n, self.max_length), n > self.max_length))
        return out

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """The span of every whitespace word."""
        return [m.span() for m in re.finditer(r"\S+", text)]

    def collate(self, encoded: Sequence[Encoded], rows: list[int]) -> PaddedBatch:
        """No tensors are built; only the row bookkeeping."""
        empty = torch.empty(0, dtype=torch.long)
        return PaddedBatch(empty, empty, None, list(rows), sum(len(encoded[r].ids) for r in rows))

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        """A fixed distribution per row."""
        probs = torch.zeros((len(batch.rows), 2))
        probs[:, 1] = 1.0
        return probs

    def decode(self, probs: torch.Tensor) -> list[Prediction]:
        """Always ``positive``."""
        return [Prediction("positive", 1.0, {"negative": 0.0, "positive": 1.0})] * len(probs)


def _pad_id(config: Any, tokenizer: Any, vocab_size: int) -> int:
    """The token id a batch is padded with: the config's ``pad_token_id`` when it is a
    token, else the tokenizer's, else 0.

    The config's first: a decoder finds each text's last token as the last one
    that is not that id, and many decoder tokenizers name no pad token (or
    another); an encoder masks its padding, whatever the id.
    """
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and 0 <= pad < (vocab_size or pad + 1):
        return pad
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def _embedding_rows(model: Any) -> int:
    """Rows of ``model``'s input (token) embedding table; the config's ``vocab_size``
    when the model does not expose it, 0 when neither is known."""
    try:
        rows = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):
        rows = None
    if isinstance(rows, int) and rows > 0:
        return rows
    return int(getattr(model.config, "vocab_size", 0) or 0)


def _model_max_length(model: Any, tokenizer: Any) -> int:
    """The most tokens (with special tokens) one text may have for ``model``.

    The position table's size, less the positions it never uses, capped by
    the tokenizer's ``model_max_length`` when that is a real limit. A model
    with no table (XLNet's config says -1: relative positions, no limit)
    takes the tokenizer's limit, else :data:`_NO_LIMIT_DEFAULT`.
    """
    positions = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    limit = positions - _unused_positions(model, positions) if positions > 0 else None
    tok_limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    if isinstance(tok_limit, int) and 0 < tok_limit < 100_000:
        limit = min(limit, tok_limit) if limit is not None else tok_limit
    return limit if limit is not None else _NO_LIMIT_DEFAULT


def _unused_positions(model: Any, positions: int) -> int:
    """How many rows at the start of the model's position table no token ever takes.

    RoBERTa and its kin (XLM-R, CamemBERT, ...) number positions from
    ``padding_idx + 1``: their position embedding, an ``nn.Embedding`` with
    a ``padding_idx``, has ``padding_idx + 1`` fewer usable rows than
    ``max_position_embeddings`` (roberta-base: 514, 512 tokens). BERT's has
    no ``padding_idx`` and numbers positions from 0.
    """
    for name, module in model.named_modules():
        if (name.rsplit(".", 1)[-1] == "position_embeddings"
                and isinstance(module, torch.nn.Embedding)
                and module.num_embeddings == positions and module.padding_idx is not None):
            return int(module.padding_idx) + 1
    return 0
