"""The benchmark workload: social-media-like texts, mixed Chinese and English.

Lengths follow what feeds and comment streams look like: most posts are
short (a few words to a sentence), a long tail runs to several paragraphs
and past the model's 512-token limit. A fixed seed makes every run, and
every stage of one run, see the same texts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

_EN = (
    "the new update broke my battery life again and support is not answering "
    "honestly the best coffee in town staff were friendly and fast "
    "train was late for the third time this week what is going on "
    "loved the movie but the ending felt rushed would still watch it twice "
    "this phone camera is amazing in low light totally worth the price "
    "worst customer service ever waited an hour for nothing "
    "cannot believe how good the concert was last night "
    "the hotel room was clean quiet and the view was great "
    "app keeps crashing when i open the settings page please fix "
    "delivery arrived early and the food was still hot thanks"
).split()
_ZH = (
    "这家酒店的服务很好房间也很干净早餐种类不多但味道不错"
    "电影的结局太仓促了有点失望不过演员的表演很出色"
    "快递又晚到了三天客服一直不回复消息真的很生气"
    "手机的拍照效果非常好夜景模式特别清楚性价比很高"
    "今天的咖啡太好喝了店员也很热情下次还会再来"
    "软件更新以后耗电特别快希望尽快修复这个问题"
)
_TAGS = ["#fail", "#love", "lol", "😂", "🔥", "!!", "...", "@support", "http://t.co/x1"]


def social_lengths(n: int, seed: int = 0) -> list[int]:
    """Target lengths in words/characters: ~60% short, ~30% medium, ~10% long tail."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.60:
            out.append(rng.randint(3, 20))
        elif u < 0.90:
            out.append(rng.randint(20, 60))
        elif u < 0.98:
            out.append(rng.randint(60, 250))
        else:
            out.append(rng.randint(250, 900))
    return out


def social_texts(n: int, seed: int = 0, zh_share: float = 0.4) -> list[str]:
    """``n`` deterministic texts: English by words, Chinese by characters, ~40% Chinese."""
    rng = random.Random(seed + 1)
    texts = []
    for length in social_lengths(n, seed):
        if rng.random() < zh_share:
            start = rng.randrange(len(_ZH))
            text = "".join(_ZH[(start + k) % len(_ZH)] for k in range(length))
        else:
            start = rng.randrange(len(_EN))
            text = " ".join(_EN[(start + k) % len(_EN)] for k in range(length))
        if rng.random() < 0.3:
            text += " " + rng.choice(_TAGS)
        texts.append(text)
    return texts


def long_texts(n: int, count_tokens: Callable[[str], int], seed: int = 0,
               tokens: tuple[int, int] = (500, 5_000), zh_share: float = 0.4) -> list[str]:
    """``n`` long posts (articles, threads) of ``tokens`` model tokens (a uniform draw per
    text, counted with ``count_tokens``), in sentences: English ending in ``.``, ``!``
    or ``?``, Chinese in ``。``, ``！`` or ``？``, with a paragraph break now and then."""
    rng = random.Random(seed + 2)
    out = []
    for _ in range(n):
        target = rng.randint(*tokens)
        zh = rng.random() < zh_share
        parts: list[str] = []
        used = 0
        while used < target:
            size = rng.randint(6, 40)
            if zh:
                start = rng.randrange(len(_ZH))
                sentence = "".join(_ZH[(start + k) % len(_ZH)] for k in range(size))
                sentence += rng.choice("。。。！？")
            else:
                start = rng.randrange(len(_EN))
                sentence = " ".join(_EN[(start + k) % len(_EN)] for k in range(size))
                sentence = sentence.capitalize() + rng.choice("...!?") + " "
            if rng.random() < 0.1:
                sentence += "\n\n"
            parts.append(sentence)
            used += count_tokens(sentence)
        out.append("".join(parts).strip())
    return out


def with_long_texts(texts: Sequence[str], long: Sequence[str],
                    seed: int = 0) -> tuple[list[str], set[int]]:
    """``texts`` with ``len(long)`` of them, at seeded places, replaced by ``long``;
    gives the new list and the places of the long texts."""
    rng = random.Random(seed + 3)
    places = rng.sample(range(len(texts)), len(long))
    mixed = list(texts)
    for place, text in zip(places, long, strict=True):
        mixed[place] = text
    return mixed, set(places)
