"""The stored language: the character-class rule on hand-picked cases and the labelled set."""

from __future__ import annotations

import pytest

from contract.lang import detect_lang


@pytest.mark.parametrize("text, lang", [
    ("这家酒店的服务很好,房间也很干净。", "zh"),
    ("The room was spotless.", "en"),
    ("这个app真的很好用,UI也很clean", "mixed"),
    ("I love 这家酒店的早餐", "mixed"),
    ("这个iPhone壳质量不错", "zh"),  # one brand name does not make it mixed
    ("Our guide took us to the 故宫 and it was wonderful", "en"),
    ("このホテルはとても綺麗でした。", "other"),
    ("배송이 너무 늦어요", "other"),
    ("Le service était très lent et le repas froid.", "other"),
    ("Super Hotel, sehr freundliches Personal, gerne wieder.", "other"),
    ("👍👍👍", "other"),
    ("", "other"),
])
def test_cases(text: str, lang: str) -> None:
    assert detect_lang(text) == lang


def test_the_labelled_set_stays_above_98_percent() -> None:
    from bench.lang_detect import load, score

    result = score("rule", detect_lang, load())
    assert result["accuracy"] >= 0.98, result["errors"]
