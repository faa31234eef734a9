"""Language detection measured: the character-class rule against ``langid``.

    python -m bench.lang_detect [--out bench/results/lang-YYYY-MM-DD.json]

The labelled set is the behavioural suite (zh and en), the demo texts (zh
and en) and ``bench/lang/labelled.jsonl`` (code-switched zh/en posts, texts
with a single English or Chinese word, other languages, emoji-only). What
counts as ``mixed`` is stated in ``contract.lang.detect_lang``; a text
without letters (emoji, digits) counts as ``other`` whatever its set says. ``langid``
(a pip package that ships its model) only names one language; it is scored
as zh/en/other with ``mixed`` counted as wrong, and also on the texts that
are not mixed alone. Also prints each detector's cost per text.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.lang import detect_lang

ROOT = Path(__file__).resolve().parent.parent

LETTERS = re.compile(r"[^\W\d_]")
SETS = (ROOT / "training/suite/behaviour.jsonl", ROOT / "worker/data/demo_texts.jsonl",
        ROOT / "bench/lang/labelled.jsonl")


def load() -> list[tuple[str, str]]:
    rows = []
    for path in SETS:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                # A text with no letters at all (emoji, digits) is in no language.
                lang = obj["lang"] if LETTERS.search(obj["text"]) else "other"
                rows.append((obj["text"], lang))
    return rows


def score(name: str, detect: Callable[[str], str], rows: list[tuple[str, str]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    got = [detect(text) for text, _ in rows]
    us = (time.perf_counter() - t0) / len(rows) * 1e6
    hits: Counter[str] = Counter()
    totals = Counter(lang for _, lang in rows)
    errors = []
    for (text, want), have in zip(rows, got, strict=True):
        if want == have:
            hits[want] += 1
        else:
            errors.append({"text": text, "want": want, "got": have})
    return {"detector": name, "accuracy": sum(hits.values()) / len(rows),
            "per_lang": {k: f"{hits[k]}/{totals[k]}" for k in sorted(totals)},
            "us_per_text": round(us, 1), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = load()
    results = [score("character-class rule (contract.lang)", detect_lang, rows)]
    try:
        import langid.langid
    except ImportError as exc:
        print(f"langid cannot be imported ({exc}; pip install langid): measuring the rule alone")
    else:
        identifier = langid.langid.LanguageIdentifier.from_modelstring(
            langid.langid.model, norm_probs=False)

        def by_langid(text: str) -> str:
            code = identifier.classify(text)[0]
            return code if code in ("zh", "en") else "other"

        results.append(score("langid 1.1.6", by_langid, rows))
        unmixed = [r for r in rows if r[1] != "mixed"]
        results.append(score("rule, without the mixed texts", detect_lang, unmixed))
        results.append(score("langid, without the mixed texts", by_langid, unmixed))
    print(f"{len(rows)} labelled texts: {dict(Counter(lang for _, lang in rows))}")
    print("| detector | accuracy | per language | µs per text |\n|---|---|---|---|")
    for r in results:
        per = ", ".join(f"{k} {v}" for k, v in r["per_lang"].items())
        print(f"| {r['detector']} | {r['accuracy']:.3f} | {per} | {r['us_per_text']} |")
    for r in results[:2]:
        print(f"\n{r['detector']}: {len(r['errors'])} errors")
        for e in r["errors"][:15]:
            print(f"  want {e['want']:5} got {e['got']:5} {e['text'][:70]}")
    if args.out:
        args.out.write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n",
                            encoding="utf-8")


if __name__ == "__main__":
    main()
