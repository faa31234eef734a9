"""The contrast-tail screen's clause split (training/contrast_tail.py)."""

from __future__ import annotations

import pytest

from training.contrast_tail import tail


@pytest.mark.parametrize("text, lang, expected", [
    ("房间不错，但是服务太差了。", "zh", "服务太差了。"),      # 但是, not 但 then 是…
    ("价格贵，不过质量好，可是物流慢", "zh", "物流慢"),        # the last marker
    ("Great screen, but the battery dies fast.", "en", "the battery dies fast."),
    ("Slow start. However, it gets good.", "en", "it gets good."),
    ("Nothing to contrast here.", "en", None),
    ("Buttery and rich.", "en", None),                        # a word, not a marker
    ("不错，但", "zh", None),                                  # nothing after it
    ("Good, but", "fr", None),                                # no markers for the language
])
def test_tail_is_the_clause_after_the_last_marker(text: str, lang: str,
                                                  expected: str | None) -> None:
    assert tail(text, lang) == expected
