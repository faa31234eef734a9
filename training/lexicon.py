"""Short template texts built from sentiment lexicons (``--lexicon N``).

The training sources are reviews of a few domains (hotels, books, laptops,
films); a word of praise or blame that they rarely hold is a word the model
has to guess. ``--lexicon N`` adds N texts per language of the form
"<aspect> <degree> <word>" (``客服十分有效！``, ``The seat was really
comfortable.``) and their negations, where each word and its polarity come
from published lexicons, and the aspects are the service domains a review
stream carries (delivery, shopping, apps, transport, customer service,
hotels, films).

Words (the lexicons must not contradict each other, and the word must be an
adjective):

- zh: HowNet's sentiment word set and Tsinghua's (Li Jun) praise/degrade
  lexicon, as shipped in cntext 2.2.1 (``cntext/io/data/*.yaml``). A word is
  positive when it is in a positive list and in no negative list (and the
  reverse; one character must be in both lexicons); jieba 0.42.1's
  dictionary must tag it ``a`` (adjective).
- en: vaderSentiment 3.3.2's ``vader_lexicon.txt`` (mean valence ≥ 1.0 or
  ≤ −1.0, at least 8 of its 10 raters on that side) and textblob 0.20.1's
  ``en-sentiment.xml`` (an adjective whose senses with a polarity agree in
  sign with vader's); words ending in "-ed" are left out.

Forms and labels: the plain form carries the word's label; "not <positive
word>" is negative; "not <negative word> at all" (``一点也不粗糙``) is
positive. Texts equal to a dev, test or behavioural-suite text are dropped;
the templates and aspect lists are written here, not taken from the suite.

``--wide-lexicon`` adds English adjectives from two more lexicons shipped
in the same cntext wheel, NRC's emotion lexicon (Mohammad & Turney 2013)
and the Lexicoder Sentiment Dictionary 2015 (Young & Soroka): a word both
list with the same polarity, tagged ``JJ`` first by textblob's tagger
lexicon (``en-lexicon.txt``), not ending in "-ed", not already a vader
word, and not a word of any English suite item (so the suite's words stay
unseen).

``--absence N`` adds N texts per language that say a thing is absent
(``房间找不出一点瑕疵。``, ``Couldn't find a single highlight in the movie.``):
no fault is praise, no merit is blame, so the label is the opposite of the
noun's. The nouns and frames are hand-written here; nouns and verbs of the
suite's own double negatives (毛病, 问题, 差评, 找不到; "complaint",
"issue", "fault") are left out so that those items stay unseen.
``--deeds N`` adds N texts per language that say someone did or did not do
a thing (``The host thanked us.``, ``司机没在车里抽烟。``): a good deed done is
praise and left undone is blame, a bad deed the reverse. The deeds, agents
and frames are hand-written here; no deed uses a verb of any suite item of
its language, so the suite's negations (``They didn't apologise for the
mistake.``, ``出了错也不道歉。``) stay unseen.
"""

from __future__ import annotations

import ast
import random
import xml.etree.ElementTree as ET  # noqa: S405 - a file from a pinned wheel, not untrusted input
import zipfile
from collections.abc import Callable, Container
from pathlib import Path

from training.data import DataSourceError, Example, _pip_download, normalise, package_dir

CNTEXT_WHEEL = "cntext-2.2.1-py3-none-any.whl"
TEXTBLOB_WHEEL = "textblob-0.20.1-py3-none-any.whl"
JIEBA_SDIST = "jieba-0.42.1.tar.gz"

#: Aspects by domain; ``{a}`` in a template.
ASPECTS: dict[str, tuple[str, ...]] = {
    "zh": ("房间", "前台", "早餐", "卫生间", "味道", "配送", "骑手", "分量", "包装", "质量",
           "物流", "做工", "卖家", "商品", "界面", "软件", "更新", "操作", "司机", "车厢",
           "航班", "列车", "座位", "客服", "售后", "服务", "态度", "工作人员", "剧情", "演员",
           "画面", "这家店", "这次体验", "环境"),
    "en": ("room", "staff", "breakfast", "bathroom", "food", "delivery", "driver", "portion",
           "packaging", "quality", "seller", "product", "app", "interface", "update", "train",
           "flight", "bus", "seat", "customer service", "support team", "agent", "service",
           "movie", "plot", "acting", "place", "experience", "whole thing", "order"),
}
#: (kind, template) per language: "plain" carries the word's label, "negated"
#: (only with positive words) is negative, "negated_neg" (only with negative
#: words) is positive. ``{d}`` is a degree word, ``{w}`` the word.
FORMS: dict[str, tuple[tuple[str, str], ...]] = {
    "zh": (
        ("plain", "{a}{d}{w}。"), ("plain", "{a}{d}{w}！"), ("plain", "{a}{d}{w}"),
        ("plain", "觉得{a}{d}{w}。"),
        ("negated", "{a}不{w}。"), ("negated", "{a}不太{w}。"), ("negated", "{a}一点也不{w}。"),
        ("negated", "{a}不够{w}"),
        ("negated_neg", "{a}一点也不{w}。"), ("negated_neg", "{a}一点都不{w}！"),
        ("negated_neg", "{a}完全不{w}。"),
    ),
    "en": (
        ("plain", "The {a} was {d}{w}."), ("plain", "The {a} is {d}{w}!"),
        ("plain", "{d}{w} {a}."), ("plain", "Found the {a} {d}{w}."),
        ("negated", "The {a} was not {w}."), ("negated", "The {a} wasn't {d}{w}."),
        ("negated", "The {a} is not {w} at all."), ("negated", "Not a {w} {a}."),
        ("negated_neg", "The {a} was not {w} at all."), ("negated_neg", "The {a} wasn't {w} at all."),
        ("negated_neg", "The {a} is never {w}."),
    ),
}
DEGREES: dict[str, tuple[str, ...]] = {
    "zh": ("", "很", "非常", "特别", "真", "挺", "相当", "十分"),
    "en": ("", "very ", "really ", "so ", "quite ", "extremely "),
}
#: Share of texts per kind; labels come out balanced.
SHARES = {"plain": 0.6, "negated": 0.2, "negated_neg": 0.2}

#: Nouns of faults (0) and merits (1) a review names; ``{n}`` in ABSENCE_FORMS.
NOUNS: dict[str, dict[int, tuple[str, ...]]] = {
    "zh": {0: ("缺点", "瑕疵", "差错", "故障", "噪音", "污渍", "破损", "漏洞", "槽点", "隐患",
               "失误", "纰漏", "短板", "疏漏"),
           1: ("优点", "亮点", "诚意", "惊喜", "新意", "长处", "耐心", "效率", "性价比", "特色",
               "责任心", "品质")},
    "en": {0: ("flaw", "defect", "glitch", "stain", "scratch", "delay", "bug", "mistake",
               "hiccup", "weakness", "drawback", "downside", "shortcoming"),
           1: ("highlight", "strength", "upside", "redeeming quality", "charm", "improvement",
               "effort", "perk", "selling point", "bright spot")},
}
#: Frames that say the noun is absent: the text's label is the opposite of the noun's.
ABSENCE_FORMS: dict[str, tuple[str, ...]] = {
    "zh": ("{a}找不出一点{n}。", "{a}完全看不到{n}。", "{a}压根没发现什么{n}。",
           "说实话，{a}看不出有什么{n}。", "{a}没有半点{n}。", "{a}谈不上有什么{n}。"),
    "en": ("Couldn't find a single {n} in the {a}.", "I saw no {n} in the {a} at all.",
           "Didn't notice any {n} with the {a}.", "The {a} had not one {n}.",
           "There's no {n} to speak of in the {a}.", "Honestly, the {a} showed no {n}."),
}
#: Who acts; ``{a}`` in DEED_FORMS (English: lower case, capitalised at the start).
AGENTS: dict[str, tuple[str, ...]] = {
    "zh": ("司机", "房东", "卖家", "快递员", "服务员", "前台", "导游", "客服", "店家",
           "收银员", "骑手", "乘务员"),
    "en": ("the host", "the driver", "the seller", "the courier", "the waiter",
           "the receptionist", "our guide", "the cashier", "the landlord", "the crew",
           "the shop assistant", "the rider"),
}
#: (done, not done) forms of good (1) and bad (0) deeds; ``{p}`` and ``{b}`` in DEED_FORMS.
DEEDS: dict[str, dict[int, tuple[tuple[str, str], ...]]] = {
    "zh": {
        1: (("主动打了招呼", "主动打招呼"), ("给我们升级了房型", "给我们升级房型"),
            ("耐心听完了我们的意见", "耐心听完我们的意见"), ("给我们打了折", "给我们打折"),
            ("记住了我们的名字", "记住我们的名字"), ("仔细核对了一遍", "仔细核对一遍"),
            ("帮我们把行李搬上了楼", "帮我们把行李搬上楼"), ("额外赠送了一份小菜", "额外赠送小菜"),
            ("提醒了我们带好证件", "提醒我们带好证件"), ("当场调换了坏掉的零件", "当场调换坏掉的零件")),
        0: (("对我们甩了脸色", "对我们甩脸色"), ("冲顾客发了脾气", "冲顾客发脾气"),
            ("临时取消了订单", "临时取消订单"), ("把责任推给了我们", "把责任推给我们"),
            ("把订单搞混了", "把订单搞混"), ("偷偷加了价", "偷偷加价"), ("在车里抽了烟", "在车里抽烟"),
            ("把座位弄脏了", "把座位弄脏"), ("弄坏了箱子", "弄坏箱子"), ("撒了谎", "撒谎")),
    },
    "en": {
        1: (("thanked us", "thank us"), ("greeted us by name", "greet us by name"),
            ("upgraded our booking", "upgrade our booking"),
            ("listened to every concern", "listen to every concern"),
            ("honoured the warranty", "honour the warranty"),
            ("followed up the next morning", "follow up the next morning"),
            ("remembered our usual order", "remember our usual order"),
            ("warned us about the traffic", "warn us about the traffic"),
            ("offered us a free drink", "offer us a free drink"),
            ("carried our bags upstairs", "carry our bags upstairs"),
            ("double-checked everything", "double-check everything")),
        0: (("overcharged us", "overcharge us"), ("hung up on me", "hang up on me"),
            ("ignored our messages", "ignore our messages"),
            ("cancelled without warning", "cancel without warning"),
            ("scratched the screen", "scratch the screen"),
            ("shouted at the customers", "shout at the customers"),
            ("blamed us for their error", "blame us for their error"),
            ("misplaced our booking", "misplace our booking"),
            ("mixed up the orders", "mix up the orders"), ("lied about the price", "lie about the price"),
            ("ripped the box open", "rip the box open"), ("insulted my friend", "insult my friend")),
    },
}
#: Frames by whether the deed was done: {a} agent, {p} done form, {b} base form.
DEED_FORMS: dict[str, dict[bool, tuple[str, ...]]] = {
    "zh": {True: ("{a}{p}。", "这次{a}{p}。", "那天{a}{p}。"),
           False: ("{a}没{b}。", "{a}没有{b}。", "{a}并没有{b}。")},
    "en": {True: ("{a} {p}.", "{a} {p} this time.", "On our last trip {a} {p}."),
           False: ("{a} didn't {b}.", "{a} did not {b}.", "{a} never {p}.")},
}


def download_lexicons(dest: Path) -> Path:
    """Fetch the lexicon archives (cntext and textblob wheels, jieba's sdist) into ``dest`` once."""
    dest.mkdir(parents=True, exist_ok=True)
    _pip_download("cntext==2.2.1", "--only-binary", dest / CNTEXT_WHEEL)
    _pip_download("textblob==0.20.1", "--only-binary", dest / TEXTBLOB_WHEEL)
    _pip_download("jieba==0.42.1", "--no-binary", dest / JIEBA_SDIST)
    return dest


def zh_words(folder: Path, min_freq: int = 300, min_freq_single: int = 900) -> dict[str, int]:
    """Chinese adjectives with their polarity (1/0) where HowNet and Tsinghua's lexicon do not contradict.

    Rare words are left out (jieba's frequency below ``min_freq``, or
    ``min_freq_single`` for one character, where rare ones are mostly
    literary); one character must be in both lexicons.
    """
    import tarfile

    import yaml

    try:
        with zipfile.ZipFile(folder / CNTEXT_WHEEL) as whl:
            hownet = yaml.safe_load(whl.read("cntext/io/data/zh_common_HowNet.yaml"))["Dictionary"]
            tsinghua = yaml.safe_load(
                whl.read("cntext/io/data/zh_common_TsinghuaPraiseDegrade.yaml"))["Dictionary"]
        with tarfile.open(folder / JIEBA_SDIST) as tar:
            member = tar.extractfile("jieba-0.42.1/jieba/dict.txt")
            assert member is not None
            jieba_dict = member.read().decode("utf-8")
    except (OSError, KeyError, TypeError, zipfile.BadZipFile, tarfile.TarError, yaml.YAMLError) as exc:
        raise DataSourceError(f"cannot read the zh lexicons in {folder}: {exc}") from exc
    adjectives = set()
    for line in jieba_dict.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "a" and int(parts[1]) >= (
                min_freq_single if len(parts[0]) == 1 else min_freq):
            adjectives.add(parts[0])
    h_pos, h_neg = set(hownet["pos"]), set(hownet["neg"])
    t_pos, t_neg = set(tsinghua["praise"]), set(tsinghua["degrade"])
    pos, neg = h_pos | t_pos, h_neg | t_neg
    words = {w: 1 for w in pos - neg} | {w: 0 for w in neg - pos}
    # one character is ambiguous more often: both lexicons must list it
    agreed = (h_pos & t_pos) | (h_neg & t_neg)
    return {w: label for w, label in sorted(words.items())
            if w in adjectives and len(w) <= 4 and (len(w) > 1 or w in agreed)}


def en_words(folder: Path, vader_lexicon: Path | None = None, min_valence: float = 1.0,
             min_raters: int = 8) -> dict[str, int]:
    """English adjectives with their polarity (1/0) where vader and textblob agree.

    ``vader_lexicon``: default, the installed vaderSentiment's ``vader_lexicon.txt``.
    """
    try:
        with zipfile.ZipFile(folder / TEXTBLOB_WHEEL) as whl:
            root = ET.fromstring(whl.read("textblob/en/en-sentiment.xml"))  # noqa: S314 - pinned wheel
        vader_file = vader_lexicon or package_dir("vaderSentiment") / "vader_lexicon.txt"
        vader = vader_file.read_text(encoding="utf-8")
    except (OSError, KeyError, ET.ParseError, zipfile.BadZipFile) as exc:
        raise DataSourceError(f"cannot read the en lexicons: {exc}") from exc
    polarity: dict[str, list[float]] = {}
    for node in root:
        if node.get("pos") == "JJ" and float(node.get("polarity", "0")):
            polarity.setdefault(node.get("form", ""), []).append(float(node.get("polarity", "0")))
    words: dict[str, int] = {}
    for line in vader.splitlines():
        parts = line.split("\t")
        # participles ("impressed", "annoyed") describe the writer, not the aspect
        if (len(parts) < 4 or not parts[0].isalpha() or parts[0] not in polarity
                or parts[0].endswith("ed")):
            continue
        mean, ratings = float(parts[1]), ast.literal_eval(parts[3])
        textblob_sign = sum(polarity[parts[0]]) > 0
        if mean >= min_valence and sum(r > 0 for r in ratings) >= min_raters and textblob_sign:
            words[parts[0]] = 1
        elif mean <= -min_valence and sum(r < 0 for r in ratings) >= min_raters and not textblob_sign:
            words[parts[0]] = 0
    return dict(sorted(words.items()))


def en_wide_words(folder: Path, base: Container[str] = ()) -> dict[str, int]:
    """English adjectives NRC and LSD2015 agree on (1/0), less ``base`` and the suite's words.

    See the module docstring (``--wide-lexicon``).
    """
    import re

    import yaml

    from training.behaviour import load_suite

    try:
        with zipfile.ZipFile(folder / CNTEXT_WHEEL) as whl:
            nrc = yaml.safe_load(whl.read("cntext/io/data/en_common_NRC.yaml"))["Dictionary"]
            lsd = yaml.safe_load(whl.read("cntext/io/data/en_common_LSD2015.yaml"))["Dictionary"]
        with zipfile.ZipFile(folder / TEXTBLOB_WHEEL) as whl:
            tagged = whl.read("textblob/en/en-lexicon.txt").decode("utf-8")
    except (OSError, KeyError, TypeError, zipfile.BadZipFile, yaml.YAMLError) as exc:
        raise DataSourceError(f"cannot read the wide en lexicons in {folder}: {exc}") from exc
    first_tag: dict[str, str] = {}
    for line in tagged.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            first_tag.setdefault(parts[0], parts[1])
    votes: dict[str, set[tuple[str, int]]] = {}
    for name, lexicon in (("nrc", nrc), ("lsd", lsd)):
        for key, label in (("positive", 1), ("negative", 0)):
            for word in lexicon[key]:
                if isinstance(word, str) and word.isalpha():
                    votes.setdefault(word.lower(), set()).add((name, label))
    suite = {w for item in load_suite() if item.lang == "en"
             for w in re.findall(r"[a-z]+", item.text.lower())}
    out = {}
    for word, cast in sorted(votes.items()):
        labels = {label for _, label in cast}
        if (len(cast) == 2 and len(labels) == 1 and first_tag.get(word) == "JJ"
                and not word.endswith("ed") and word not in base and word not in suite):
            out[word] = labels.pop()
    return out


def _distinct(draw: Callable[[], str], want: int, seen: set[str],
              exclude: Container[str]) -> list[str]:
    """Up to ``want`` texts from ``draw()`` whose normalised form is neither in ``seen`` nor ``exclude``.

    Adds each kept text's form to ``seen``; gives up after ``want * 20`` draws
    (the templates cannot always make that many).
    """
    out: list[str] = []
    for _ in range(want * 20):
        if len(out) >= want:
            break
        text = draw()
        key = normalise(text)
        if key not in seen and key not in exclude:
            seen.add(key)
            out.append(text)
    return out


def lexicon_texts(words: dict[str, int], lang: str, n: int, seed: int = 13,
                  exclude: Container[str] = ()) -> list[Example]:
    """``n`` distinct template texts for ``lang`` from ``words`` (word -> 1/0), seeded.

    Fewer come back when the words and forms cannot make ``n`` distinct texts.
    """
    rng = random.Random(f"lexicon-{lang}-{seed}")
    by_label = {label: sorted(w for w, lab in words.items() if lab == label) for label in (0, 1)}
    if not by_label[0] or not by_label[1]:
        return []
    forms: dict[str, list[str]] = {}
    for kind, template in FORMS[lang]:
        forms.setdefault(kind, []).append(template)
    # (kind, word label, text label): plain splits its share evenly between labels
    plan = [("plain", 1, 1, SHARES["plain"] / 2), ("plain", 0, 0, SHARES["plain"] / 2),
            ("negated", 1, 0, SHARES["negated"]), ("negated_neg", 0, 1, SHARES["negated_neg"])]
    out: list[Example] = []
    seen: set[str] = set()
    for kind, word_label, label, share in plan:

        def draw(kind: str = kind, word_label: int = word_label) -> str:
            word = rng.choice(by_label[word_label])
            template = rng.choice(forms[kind])
            degree = rng.choice(DEGREES[lang]) if "{d}" in template else ""
            text = template.format(a=rng.choice(ASPECTS[lang]), d=degree, w=word)
            return text[0].upper() + text[1:]  # "{d}{w} {a}." starts lower-case

        out += [Example(text, label, lang, "lexicon")
                for text in _distinct(draw, round(n * share), seen, exclude)]
    rng.shuffle(out)
    return out


def absence_texts(lang: str, n: int, seed: int = 13,
                  exclude: Container[str] = ()) -> list[Example]:
    """``n`` distinct texts for ``lang`` saying a fault or a merit is absent, balanced and seeded.

    No fault (``{a}找不出一点瑕疵。``) is positive; no merit is negative.
    """
    rng = random.Random(f"absence-{lang}-{seed}")
    out: list[Example] = []
    seen: set[str] = set()
    for noun_label in (0, 1):

        def draw(noun_label: int = noun_label) -> str:
            return rng.choice(ABSENCE_FORMS[lang]).format(
                a=rng.choice(ASPECTS[lang]), n=rng.choice(NOUNS[lang][noun_label]))

        want = n // 2 + (n % 2 if noun_label else 0)
        out += [Example(text, 1 - noun_label, lang, "absence")
                for text in _distinct(draw, want, seen, exclude)]
    rng.shuffle(out)
    return out


def deed_texts(lang: str, n: int, seed: int = 13, exclude: Container[str] = ()) -> list[Example]:
    """``n`` distinct texts for ``lang`` saying someone did or did not do a good or a bad
    deed, seeded; the four kinds in equal shares (labels balanced).

    Done carries the deed's label (``The host thanked us.``), not done the opposite
    (``The host didn't thank us.``, ``卖家没有偷偷加价。``).
    """
    rng = random.Random(f"deeds-{lang}-{seed}")
    out: list[Example] = []
    seen: set[str] = set()
    cells = [(deed, done) for deed in (1, 0) for done in (True, False)]
    for i, (deed_label, done) in enumerate(cells):

        def draw(deed_label: int = deed_label, done: bool = done) -> str:
            past, base = rng.choice(DEEDS[lang][deed_label])
            text = rng.choice(DEED_FORMS[lang][done]).format(
                a=rng.choice(AGENTS[lang]), p=past, b=base)
            return text[0].upper() + text[1:]

        want = n // 4 + (1 if i < n % 4 else 0)
        label = deed_label if done else 1 - deed_label
        out += [Example(text, label, lang, "deeds") for text in _distinct(draw, want, seen, exclude)]
    rng.shuffle(out)
    return out


def with_lexicon(splits: dict[str, list[Example]], per_lang: int, folder: Path | None,
                 seed: int = 13, absence_per_lang: int = 0,
                 wide: bool = False, deeds_per_lang: int = 0) -> dict[str, list[Example]]:
    """``splits`` with ``per_lang`` lexicon texts per language added to "train".

    ``folder`` holds the archives of :func:`download_lexicons`.
    ``absence_per_lang``: as many :func:`absence_texts` per language too (they
    need no archive), and ``deeds_per_lang`` :func:`deed_texts`. ``wide``: the
    English words include :func:`en_wide_words`.
    Texts equal to a dev, test or suite text are left out.
    """
    if per_lang <= 0 and absence_per_lang <= 0 and deeds_per_lang <= 0:
        return splits
    if per_lang > 0 and folder is None:
        raise ValueError("lexicon texts need the folder of download_lexicons")
    from training.behaviour import load_suite

    exclude = {normalise(i.text) for i in load_suite()}
    for name in ("dev", "test"):
        exclude |= {normalise(ex.text) for ex in splits.get(name, [])}
    out = dict(splits)
    added = []
    if per_lang > 0 and folder is not None:
        en = en_words(folder)
        if wide:
            en |= en_wide_words(folder, en)
        for lang, words in (("zh", zh_words(folder)), ("en", en)):
            added += lexicon_texts(words, lang, per_lang, seed=seed, exclude=exclude)
    for lang in ("zh", "en"):
        added += absence_texts(lang, absence_per_lang, seed=seed, exclude=exclude)
        added += deed_texts(lang, deeds_per_lang, seed=seed, exclude=exclude)
    out["train"] = splits["train"] + added
    return out
