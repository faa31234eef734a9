"""The language of a text, as stored per row: ``zh``, ``en``, ``mixed`` or ``other``.

A character-class rule, not a statistical detector: it counts Han characters
(each one roughly a word) against runs of Latin letters (words), and looks
for the scripts and letters that mark other languages (kana, hangul,
Cyrillic, Arabic; function words of other Latin-script languages). It
measured better than ``langid`` on a labelled zh/en/mixed set and costs
microseconds a text (``bench/lang_detect.py`` has the comparison).
"""

from __future__ import annotations

import re
import unicodedata

LANG_ZH = "zh"
LANG_EN = "en"
LANG_MIXED = "mixed"
LANG_OTHER = "other"

#: Share of the minor of Chinese/English words a text needs to be ``mixed``.
MIXED_SHARE = 0.15
#: Han characters per Chinese word (on average), to weigh them against English words.
HAN_PER_WORD = 1.5

#: Runs of Han characters (counted by their lengths: one string a run, not a character).
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]+")
_KANA_HANGUL = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uac00-\ud7af\u1100-\u11ff]")
_OTHER_SCRIPT = re.compile(r"[\u0370-\u03ff\u0400-\u04ff\u0590-\u05ff\u0600-\u06ff"
                           r"\u0900-\u097f\u0e00-\u0e7f]")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+(?:'[A-Za-z]+)?")
_ASCII_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")  # _LATIN_WORD on lowercased ASCII text
#: ASCII letters to lowercase, every other ASCII character to a space.
_ASCII_LOWER_LETTERS = {c: (c | 0x20 if chr(c).isalpha() else 0x20) for c in range(128)}
_ACCENTED = re.compile(r"[\u00c0-\u024f]")
#: Frequent English words that are rarely words of other Latin-script languages.
_ENGLISH = frozenset("""
the and but not is are was were been am does did have has had you she it we they my your
our their this that these those of to for with from by very too really just good bad
great nice love like hate it's don't can't won't will would could should there what when
who how all at be can get got one out up ok okay thanks best worst ever again
""".split())
#: Frequent words of French, Spanish, German, Italian, Portuguese and Dutch
#: that are not English words.
_FOREIGN = frozenset("""
le la les des du un une et est était très pas je vous avec pour sur dans que qui nous mais
el los las del y muy pero por para una más está fue sin
der das und ist sehr nicht ich mit für auf ein eine aber auch wir sie gerne wieder
il lo gli di che è molto non ma della sono anche
um uma não muito mas com ao os às foi
het een zijn niet voor maar ook wat bij naar
""".split())


def detect_lang(text: str) -> str:
    """``zh``, ``en``, ``mixed`` or ``other`` (see the module docstring).

    ``mixed``: at least two English words and two Han characters, and the
    smaller of the two at least 15% of the words (a lone brand name or
    loanword does not make a text mixed).
    """
    text = unicodedata.normalize("NFKC", text)
    if text.isascii():  # no Han, kana, hangul, accents or other scripts: skip their scans
        # Without an apostrophe the words are the runs of letters: one translate and a split.
        lowered = (_ASCII_WORD.findall(text.lower()) if "'" in text
                   else text.translate(_ASCII_LOWER_LETTERS).split())
        if not lowered:
            return LANG_OTHER
        english, foreign = _function_words(lowered)
        return LANG_EN if foreign <= english else LANG_OTHER
    if len(_KANA_HANGUL.findall(text)) >= 2:
        return LANG_OTHER
    han = sum(map(len, _HAN.findall(text)))
    words = _LATIN_WORD.findall(text)
    others = len(_OTHER_SCRIPT.findall(text))
    if han == 0 and not words:
        return LANG_OTHER
    if others >= han + len(words):
        return LANG_OTHER
    if words and not han:
        return LANG_EN if _english(words) else LANG_OTHER
    zh_words = han / HAN_PER_WORD
    en_words = len(words)
    if en_words >= 2 and han >= 2 and min(zh_words, en_words) / (zh_words + en_words) >= MIXED_SHARE:
        return LANG_MIXED
    if zh_words >= en_words:
        return LANG_ZH
    return LANG_EN if _english(words) else LANG_OTHER


def _english(words: list[str]) -> bool:
    """Latin words read as English: no more foreign function words than English
    ones, and no accented letters unless an English word is there too."""
    english, foreign = _function_words(" ".join(words).lower().split())  # one lower() call
    if foreign > english:
        return False
    return english > 0 or not any(_ACCENTED.search(w) for w in words)


def _function_words(lowered: list[str]) -> tuple[int, int]:
    """How many of the lowercased ``lowered`` words are English, and how many foreign,
    function words."""
    return sum(map(_ENGLISH.__contains__, lowered)), sum(map(_FOREIGN.__contains__, lowered))
