"""Texts with nothing to read are refused, with a reason; emoji and CJK are not.

``str.strip`` keeps zero-width spaces, a BOM and control characters, so such
a text used to pass as non-empty and be stored ``done`` with a confident
label scored from the special tokens alone. Nor are letters and symbols that
show nothing (Hangul fillers, the blank Braille pattern, variation selectors
alone: Unicode's default-ignorable code points and a few blank symbols).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from contract.errors import InvalidInput
from contract.messages import make_item, validate_text
from contract.results import ResultStore
from contract.settings import Settings
from producer.client import Client
from worker.app import build_runner
from worker.flush import FlushProcessor

INVISIBLE = ["\u200b\u200b", "\ufeff", "\x07\x08", "\u200b \u2060\n\t", "\u202e", "\xad",
             "\u2063\u180e"]
#: Letters, symbols and marks of no Cc/Cf/Z category that show nothing.
BLANK = ["\u3164", "\u115f", "\u1160", "\u115f\u1160", "\uffa0", "\u2800\u2800", "\U0001d159",
         "\ufe0f", "\ufe00", "\U000e0100", "\U000e01ef", "\u034f", "\u17b4\u17b5", "\u180b",
         "\u180f", "\u2065", "\ufff0", "\U000e0002", "\U000e0fff", "\u3164 \u200b\u2800",
         "\u3164\ufe0f\u3164"]
VISIBLE = ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇨🇳", "🏳️\u200d🌈", "很好", "太差了！", "\ufeffgood",
           "good\u200b", "e\u0301", "\U0002fffd", "\u0301", "❤\ufe0f", "1\ufe0f\u20e3",
           "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "\u3164很好",
           "\u2800⠁", "\U0001fae9", "\u845b\U000e0100"]
REASON = ("text has no visible characters (only control, format, space or blank "
          "characters such as U+3164 HANGUL FILLER)")


@pytest.mark.parametrize("text", INVISIBLE)
def test_a_text_with_no_visible_character_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="text has no visible characters"):
        validate_text(text, Settings())


@pytest.mark.parametrize("text", BLANK)
def test_a_text_of_blank_letters_is_refused(text: str) -> None:
    """Category Lo, So or Mn, yet nothing on screen: such a text is as empty as ``"\\u200b"``."""
    with pytest.raises(InvalidInput, match="text has no visible characters"):
        validate_text(text, Settings())


@pytest.mark.parametrize("text", VISIBLE)
def test_emoji_cjk_and_texts_with_zero_width_characters_inside_are_accepted(text: str) -> None:
    assert validate_text(text, Settings()) == text


def test_empty_and_whitespace_keep_their_reason() -> None:
    for text in ("", "  \n\t"):
        with pytest.raises(InvalidInput, match="text is empty or whitespace only"):
            validate_text(text, Settings())
    with pytest.raises(InvalidInput, match="NUL"):
        validate_text("\x00", Settings())


def test_the_producer_refuses_them_by_index(redis_url: str) -> None:
    with Client(Settings(broker_url=redis_url, queue="bst-test-invisible")) as client:
        report = client.submit_many(["\u200b", "😀", "\u3164"])
    assert report.accepted == 1
    assert [(e.index, e.reason) for e in report.errors] == [
        (0, REASON), (2, REASON)]
    with pytest.raises(InvalidInput, match="no visible"):
        make_item("\x07", Settings(), id="x")


def test_the_worker_fails_them_and_texts_the_tokenizer_empties(
        tiny_model_dir: Path, store: ResultStore) -> None:
    """A worker validates what any producer sent; a visible text the tokenizer drops
    entirely (a lone combining accent) fails at encoding."""
    s = Settings(model=str(tiny_model_dir), database_url="sqlite://")
    processor = FlushProcessor(build_runner(s), store, s, worker_name="t@h")
    now = time.time()
    texts = {"zw": "\u200b\u200b\u200b", "bom": "\ufeff", "ctrl": "\x07\x08",
             "accent": "\u0301", "selector": "\ufe0f", "filler": "\u3164", "emoji": "😀",
             "family": "👨\u200d👩\u200d👧", "cjk": "很好", "marked": "\ufeffgood"}
    stats = processor.process([("m", [[{"id": k, "text": t, "submitted_at": now}
                                       for k, t in texts.items()]])])
    rows = {r.id: r for r in store.query(limit=None)}
    for key in ("zw", "bom", "ctrl", "selector", "filler"):
        assert rows[key].status == "failed" and rows[key].label is None
        assert "no visible characters" in (rows[key].error or "")
    assert rows["accent"].status == "failed" and rows["accent"].label is None
    assert "no content tokens" in (rows["accent"].error or "")
    for key in ("emoji", "family", "cjk", "marked"):
        assert rows[key].status == "done" and rows[key].label is not None
    assert stats.failed == 6
