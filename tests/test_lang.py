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


@pytest.mark.parametrize("text, lang", [
    ("THE ROOM WAS SPOTLESS", "en"),
    ("don't like it, won't come back", "en"),
    ("Das Essen ist sehr gut und nicht teuer", "other"),
    ("rock'n'roll", "en"),
    ("12345 !!!", "other"),
    ("𠀀𠀁 好的 ok", "zh"),  # Han beyond the BMP counts
])
def test_ascii_and_counting_cases(text: str, lang: str) -> None:
    assert detect_lang(text) == lang


def _plain_rule(text: str) -> str:
    """The rule as first written (one regex match a character or word, per-word loops):
    the oracle for the faster code paths in ``contract.lang``."""
    import re
    import unicodedata

    from contract import lang as L

    han_char = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]")

    def english(words: list[str]) -> bool:
        lowered = [w.lower() for w in words]
        en = sum(w in L._ENGLISH for w in lowered)
        if sum(w in L._FOREIGN for w in lowered) > en:
            return False
        return en > 0 or not any(L._ACCENTED.search(w) for w in words)

    text = unicodedata.normalize("NFKC", text)
    if len(L._KANA_HANGUL.findall(text)) >= 2:
        return "other"
    han = len(han_char.findall(text))
    words = L._LATIN_WORD.findall(text)
    others = len(L._OTHER_SCRIPT.findall(text))
    if (han == 0 and not words) or others >= han + len(words):
        return "other"
    if words and not han:
        return "en" if english(words) else "other"
    zh_words, en_words = han / L.HAN_PER_WORD, len(words)
    if en_words >= 2 and han >= 2 and min(zh_words, en_words) / (zh_words + en_words) >= L.MIXED_SHARE:
        return "mixed"
    if zh_words >= en_words:
        return "zh"
    return "en" if english(words) else "other"


def test_the_fast_paths_agree_with_the_plain_rule() -> None:
    import random

    from bench.lang_detect import load
    from bench.workload import social_texts

    rng = random.Random(7)
    pool = ("abcdeéüİßΣAZ' ,.!你好的是很Дあ한ा𠀀"
            + "".join(chr(c) for c in range(0x20, 0x250, 7)))
    words = "the le et und not pas très is sehr good bad Très don't it's".split()
    texts = social_texts(2_000) + [row[0] for row in load()]
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(5_000)]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
              + rng.choice(["", " 好", " 你好的", "é", "!"]) for _ in range(3_000)]
    differ = [t for t in texts if detect_lang(t) != _plain_rule(t)]
    assert not differ, differ[:5]
