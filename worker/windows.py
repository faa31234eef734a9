"""Long texts scored whole: windows cut at sentence boundaries, and their scores combined.

A text longer than the model's maximum is not cut at the maximum (its
ending would never count). It is split into windows that fit, and every
window is scored like any other text; the flush plans the windows into
its token-budget batches with the rest (worker/flush.py).

The rules (docs/architecture.md, "Long texts"):

- Sentences end after a run of ``。！？``, after ``!``, ``?`` or ``.`` when
  followed by whitespace or the end of the text, and at line breaks; the
  whitespace after the end belongs to the sentence it ends.
- A window is a run of whole sentences of at most ``max_length`` tokens
  with the special tokens. A sentence longer than that is cut at token
  boundaries into pieces that fit.
- Overlap: a window starts with the last sentence of the window before it
  when that sentence has at most :func:`overlap_tokens` tokens and leaves
  room for the next sentence (pieces of a cut sentence never overlap).
- A window's span leaves out the whitespace at its edges: encoded alone, a
  trailing space is a token of its own for some tokenizers (SentencePiece's
  lone ``▁``), one the plan did not count, and the window would overflow.
  A sentence's tokens are those that end in it (a SentencePiece word's token
  starts at the space before it, in the sentence before).
- Each window is measured: its text encoded alone. One that comes out longer
  than planned (it starts inside a word, as Chinese text after ``。`` or
  digits glued to a word: SentencePiece adds a ``▁`` at the start of any
  text) ends one sentence or piece earlier and the next window starts there;
  a window of one sentence or piece is cut shorter. No sliver is left over.
- A window's tokens are those of its text encoded alone, so scoring
  ``text[start_char:end_char]`` alone gives exactly the window's scores.
- Combined score: the mean of the windows' probabilities weighted by each
  window's tokens (the stored ``tokens``); the label is the arg-max of that
  mean (``neutral`` below the neutral band, as for one pass).
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.runner import NEUTRAL, Encoded, Prediction, Runner

log = logging.getLogger(__name__)

#: A sentence repeated at the start of the next window has at most this many tokens...
OVERLAP_MAX_TOKENS = 64
#: ... and at most this fraction of a window, so most of each window is new text.
OVERLAP_MAX_SHARE = 0.25
#: How many times a window whose text re-tokenizes longer than planned is re-cut.
_MAX_RECUTS = 3

# A run of Chinese terminators, or of ! ? . before whitespace or the end, or a
# line break; with the whitespace that follows.
_SENTENCE_END = re.compile(r"[。！？]+\s*|[!?.]+(?:\s+|$)|\n\s*")


@dataclass
class Window:
    """One window of a long text: its character span, tokens, and outcome once scored."""

    n: int
    start: int
    end: int
    encoded: Encoded
    #: A prediction, or the reason the model failed on this window; None until scored.
    outcome: Prediction | str | None = None
    batch_size: int | None = None

    @property
    def tokens(self) -> int:
        """Tokens of the window with its special tokens (the weight of its scores)."""
        return len(self.encoded.ids)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text``; they tile the text."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() > start:
            spans.append((start, m.end()))
            start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def overlap_tokens(budget: int) -> int:
    """The most tokens of a sentence repeated from one window into the next."""
    return min(OVERLAP_MAX_TOKENS, int(budget * OVERLAP_MAX_SHARE))


@dataclass(frozen=True)
class _Unit:
    """A sentence, or a piece of one (too long for a window, or alone longer than counted)."""

    start: int
    end: int
    tokens: int
    piece: bool
    #: Index of its first token in the text's offsets, and of its sentence.
    first: int
    sentence: int


def _units(text: str, offsets: Sequence[tuple[int, int]]) -> list[_Unit]:
    """The sentences of ``text`` with the tokens counted in each."""
    # A token counts where it ends: SentencePiece's "▁word" starts at the space
    # that ends the sentence before. An empty span counts at its character.
    ends = [max(b, a + 1) for a, b in offsets]
    units = []
    for n, (a, b) in enumerate(sentence_spans(text)):
        first, last = bisect_right(ends, a), bisect_right(ends, b)
        units.append(_Unit(a, b, last - first, False, first, n))
    return units


def _cut(text: str, unit: _Unit, k: int, starts: Sequence[int]) -> tuple[_Unit, _Unit] | None:
    """``unit`` cut after its first ``k`` tokens, into two pieces; None if it cannot be cut.

    Tokens that share a start (SentencePiece's lone "▁" and the word after
    it, a character's byte tokens) cannot be cut apart: the cut moves to
    fewer tokens, or else more, so that neither piece is empty or blank.
    """
    for n in [*range(min(k, unit.tokens - 1), 0, -1), *range(k + 1, unit.tokens)]:
        cut = starts[unit.first + n]
        if text[unit.start:cut].strip() and text[cut:unit.end].strip():
            return (_Unit(unit.start, cut, n, True, unit.first, unit.sentence),
                    _Unit(cut, unit.end, unit.tokens - n, True, unit.first + n, unit.sentence))
    return None


def _push(todo: list[_Unit], unit: _Unit) -> None:
    """Put ``unit`` back on the ``todo`` stack, joined to the rest of its sentence."""
    if todo and todo[-1].sentence == unit.sentence:
        rest = todo.pop()
        unit = _Unit(unit.start, rest.end, unit.tokens + rest.tokens, True, unit.first,
                     unit.sentence)
    todo.append(unit)


def plan_windows(text: str, offsets: Sequence[tuple[int, int]], budget: int,
                 measure: Callable[[str], int] | None = None) -> list[tuple[int, int]]:
    """Character spans of the windows of ``text`` (``budget``: text tokens a window holds).

    ``offsets`` are the character spans of the text's tokens (no special
    tokens). Windows follow the rules of this module's docstring; together
    they cover the whole text but the whitespace between them, and only an
    overlap sentence is in two. ``measure``: the tokens of a text encoded
    alone, without special tokens; when given, every window is measured and
    one that comes out over ``budget`` is planned again (:func:`_shorten`).
    """
    overlap = overlap_tokens(budget)
    starts = [a for a, _ in offsets]
    todo = _units(text, offsets)[::-1]  # a stack: the next unit on top
    windows: list[tuple[int, int]] = []
    current: list[_Unit] = []
    kept = used = 0  # kept: the overlap sentence at the start of ``current`` (0 or 1)
    while todo or len(current) > kept:
        if todo:
            unit = todo.pop()
            if unit.tokens > budget:  # a window's worth of it; the rest stays to do
                parts = _cut(text, unit, budget, starts)
                if parts:
                    unit, rest = parts
                    todo.append(rest)
            if not current or used + unit.tokens <= budget:
                current.append(unit)
                used += unit.tokens
                continue
            _push(todo, unit)
        if measure is not None:
            current = _shorten(text, current, kept, budget, measure, starts, todo)
        windows.append(_trim(text, current[0].start, current[-1].end))
        last, nxt = current[-1], todo[-1] if todo else None
        keep = (nxt is not None and not last.piece and not nxt.piece
                and last.tokens <= overlap and last.tokens + nxt.tokens <= budget
                and len(current) > 1)
        current, used = ([last], last.tokens) if keep else ([], 0)
        kept = len(current)
    return windows


def _shorten(text: str, current: list[_Unit], kept: int, budget: int,
             measure: Callable[[str], int], starts: Sequence[int],
             todo: list[_Unit]) -> list[_Unit]:
    """``current``'s units that, encoded alone as one window, fit ``budget``.

    The plan counts a text's tokens in the whole text; a window that starts
    inside a word (Chinese text after ``。``, digits glued to a word) encodes
    differently alone (SentencePiece adds a ``▁`` at the start of any text).
    Such a window ends one unit earlier (that unit goes back to ``todo`` and
    starts the next window), drops its overlap sentence when that is all it
    has besides one unit, or has its one unit cut shorter, until it fits:
    no window is left to be re-cut into a sliver later.
    """
    current = list(current)
    while True:
        a, b = _trim(text, current[0].start, current[-1].end)
        over = measure(text[a:b]) - budget
        if over <= 0:
            return current
        if len(current) - kept > 1:
            _push(todo, current.pop())
        elif kept:
            current, kept = current[1:], 0
        else:
            parts = _cut(text, current[0], current[0].tokens - over, starts)
            if parts is None:  # one token, or tokens that cannot be parted: _fit cuts it
                return current
            current = [parts[0]]
            _push(todo, parts[1])


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` without the whitespace at its edges (as is when all whitespace)."""
    span = text[start:end]
    stripped = span.strip()
    if not stripped:
        return start, end
    start += len(span) - len(span.lstrip())
    return start, start + len(stripped)


def split_windows(runner: Runner, text: str,
                  offsets: Sequence[tuple[int, int]] | None = None) -> list[Window]:
    """The windows of ``text``, each encoded alone and fitting ``runner.max_length``.

    ``offsets``: the text's token spans when already known (``runner.offsets``).
    The plan measures each window's text encoded alone (one tokenizer call a
    window, and one per window planned again), so a window that starts inside
    a word is planned to fit. One that still comes out longer (a single token
    or unpartable tokens over the limit) is planned again on its own tokens,
    with a warning; after a few tries it is kept cut (``encoded.truncated``,
    and the text's row says ``truncated``).
    """
    budget = runner.max_length - runner.special_tokens
    if offsets is None:
        offsets = runner.offsets(text)
    plan = plan_windows(text, offsets, budget, lambda span: len(runner.offsets(span)))
    spans = _fit(runner, text, 0, plan, budget, 0)
    return [Window(n, a, b, enc) for n, (a, b, enc) in enumerate(spans)]


def _fit(runner: Runner, text: str, base: int, spans: list[tuple[int, int]], budget: int,
         depth: int) -> list[tuple[int, int, Encoded]]:
    """Encode the ``spans`` of ``text`` (offset by ``base``), re-cutting any that overflow."""
    out: list[tuple[int, int, Encoded]] = []
    encoded = runner.encode([text[a:b] for a, b in spans])
    for (a, b), enc in zip(spans, encoded, strict=True):
        if not enc.truncated or depth >= _MAX_RECUTS:
            out.append((base + a, base + b, enc))
            continue
        sub = text[a:b]
        # Not silent: each re-cut leaves a short window the plan did not make.
        log.warning("a window of %d characters encodes longer than planned (over %d tokens); "
                    "cut again (try %d of %d)", b - a, runner.max_length, depth + 1,
                    _MAX_RECUTS)
        # One token less each time, down to one: a budget of 0 could plan nothing.
        again = plan_windows(sub, runner.offsets(sub), max(1, budget - depth - 1))
        out.extend(_fit(runner, sub, base + a, again, budget, depth + 1))
    return out


def combine(windows: Sequence[Window], neutral_below: float = 0.0) -> Prediction | str:
    """The text's result from its windows' outcomes: the token-weighted mean of their
    probabilities, labelled by its arg-max; or the first window's failure reason."""
    for w in windows:
        if not isinstance(w.outcome, Prediction):
            reason = w.outcome if w.outcome is not None else "not scored"
            return f"window {w.n + 1} of {len(windows)} failed: {reason}"
    scored = [(w.tokens, w.outcome.scores) for w in windows
              if isinstance(w.outcome, Prediction)]
    total = sum(t for t, _ in scored)
    labels = list(scored[0][1])
    mean = {label: sum(t * scores[label] for t, scores in scored) / total for label in labels}
    best = max(labels, key=mean.__getitem__)
    label = NEUTRAL if mean[best] < neutral_below else best
    return Prediction(label, mean[best], mean)
