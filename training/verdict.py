"""The adoption rule: when a new sentiment adapter may replace the bundled one.

Every candidate since the behavioural suite exists has been held to the same
four checks against the adapter it would replace, written down before its
one look at test and the suite:

- (b) neither language's suite accuracy is lower;
- (c) neither language has more suite errors at a calibrated score >= 0.9;
- (d) neither held-out figure (test zh; test en on the original sources, so
  that the figure stays comparable across data additions) is more than half
  a point lower;
- (e) the two suites together have at least four errors fewer.

Only a candidate that passes all four is adopted (then its serving speed is
measured side by side). The two reports must be measured alike: both on the
test split, at the same truncation length (``max_len``), with the same split
seed and the same held-out sources (:func:`comparable`); otherwise there is
no verdict. Here the rule is code, so ``bertstream model
verdict`` and the GPU trainer apply it the same way and a verdict is never a
judgement made by eye.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: The English sources the held-out figure of check (d) is measured on: the
#: ones the bundled model was first trained with (later sources add their own rows).
ORIGINAL_EN = ("rotten_tomatoes", "vader_movies", "vader_amazon", "vader_tweets")
LANGS = ("en", "zh")
#: Check (d): how far a held-out figure may fall.
HELDOUT_SLACK = 0.005
#: Check (e): how many suite errors fewer, both languages together.
FEWER_ERRORS = 4
_EPS = 1e-9
#: What a report must record, and both reports share, for the rule to compare them.
MEASURED_ALIKE = ("split", "max_len", "seed", "sources")


class IncomparableReports(ValueError):
    """The two reports were not measured alike (or one does not say how it was)."""


def comparable(baseline: Mapping[str, Any], candidate: Mapping[str, Any]) -> None:
    """Raise :class:`IncomparableReports` unless both reports are test-split reports
    measured at the same ``max_len``, split seed and held-out sources.

    A report without these fields (written by a ``model eval`` before they
    were recorded) is refused: re-run ``bertstream model eval --json-out``.
    """
    sides = (("baseline", baseline), ("candidate", candidate))
    for name, report in sides:
        absent = [k for k in MEASURED_ALIKE if report.get(k) is None]
        if absent:
            raise IncomparableReports(
                f"the {name} report does not record its {', '.join(absent)} (written before "
                f"reports recorded how they were measured): re-run `bertstream model eval "
                f"--json-out FILE` for it")
    for name, report in sides:
        if report["split"] != "test":
            raise IncomparableReports(
                f"the {name} report is on the {report['split']!r} split; the rule reads test "
                f"(`bertstream model eval --split test`)")
    for key in MEASURED_ALIKE[1:]:
        if baseline[key] != candidate[key]:
            shown = ((f"{baseline[key]} vs {candidate[key]}") if key != "sources"
                     else _sources_differ(baseline[key], candidate[key]))
            raise IncomparableReports(
                f"the reports were measured differently: {key} {shown} (baseline vs "
                f"candidate); evaluate both the same way")


def _sources_differ(b: Mapping[str, int], c: Mapping[str, int]) -> str:
    keys = sorted(set(b) | set(c))
    return "; ".join(f"{k} {b.get(k, 0)} vs {c.get(k, 0)}" for k in keys if b.get(k) != c.get(k))


@dataclass(frozen=True)
class Check:
    """One check of the rule: its letter, whether it holds, and the figures behind it."""

    name: str
    holds: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    """The rule applied to a candidate against a baseline."""

    baseline: dict[str, float]
    candidate: dict[str, float]
    checks: tuple[Check, ...]

    @property
    def adopt(self) -> bool:
        return all(c.holds for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"adopt": self.adopt, "baseline": self.baseline, "candidate": self.candidate,
                "checks": [asdict(c) for c in self.checks]}


def figures(report: Mapping[str, Any]) -> dict[str, float]:
    """The figures the rule reads, from an eval report (``EvalReport.as_dict()``).

    Raises ValueError when the report lacks the suite or a held-out group the
    rule needs (an eval run with ``--no-suite``, or without the original sources).
    """
    heldout, suite = report.get("heldout") or {}, report.get("suite")
    if not suite or any(lang not in suite for lang in LANGS):
        raise ValueError("the report has no behavioural suite for both languages")
    if "zh" not in heldout:
        raise ValueError("the report has no Chinese held-out figure")
    groups = [heldout[f"en/{s}"] for s in ORIGINAL_EN if f"en/{s}" in heldout]
    if len(groups) != len(ORIGINAL_EN):
        missing = [s for s in ORIGINAL_EN if f"en/{s}" not in heldout]
        raise ValueError(f"the report lacks the English held-out sources {missing}")
    n_en = sum(g["n"] for g in groups)
    out: dict[str, float] = {
        "test_zh": round(float(heldout["zh"]["acc"]), 4),
        "test_en_original": round(sum(g["acc"] * g["n"] for g in groups) / n_en, 4),
    }
    errors = 0
    for lang in LANGS:
        row = suite[lang]
        out[f"suite_{lang}"] = round(float(row["acc"]), 4)
        out[f"confident_{lang}"] = int(row["confident_errors"])
        errors += round(row["n"] * (1.0 - row["acc"]))
    out["suite_errors"] = errors
    return out


def judge(baseline: Mapping[str, Any], candidate: Mapping[str, Any]) -> Verdict:
    """Apply checks (b)-(e) to two eval reports (``EvalReport.as_dict()`` each).

    Raises :class:`IncomparableReports` (a ValueError) unless they were
    measured alike (:func:`comparable`), ValueError when one lacks a figure.
    """
    comparable(baseline, candidate)
    b, c = figures(baseline), figures(candidate)

    def pair(key: str, fmt: str = ".4f") -> str:
        return f"{key} {c[key]:{fmt}} vs {b[key]:{fmt}}"

    checks = (
        Check("b: neither suite lower",
              all(c[f"suite_{g}"] >= b[f"suite_{g}"] - _EPS for g in LANGS),
              "; ".join(pair(f"suite_{g}") for g in LANGS)),
        Check("c: no language with more confident suite errors",
              all(c[f"confident_{g}"] <= b[f"confident_{g}"] for g in LANGS),
              "; ".join(pair(f"confident_{g}", "d") for g in LANGS)),
        Check(f"d: neither held-out more than {HELDOUT_SLACK * 100:g} point lower",
              all(c[k] >= b[k] - HELDOUT_SLACK - _EPS for k in ("test_zh", "test_en_original")),
              "; ".join(pair(k) for k in ("test_zh", "test_en_original"))),
        Check(f"e: suites together at least {FEWER_ERRORS} errors fewer",
              c["suite_errors"] <= b["suite_errors"] - FEWER_ERRORS,
              pair("suite_errors", "d")),
    )
    return Verdict(b, c, checks)


def format_verdict(verdict: Verdict, baseline_name: str = "baseline",
                   candidate_name: str = "candidate") -> str:
    """The figures side by side, each check, and the verdict, as text."""
    width = max(len(baseline_name), len(candidate_name), 9)
    lines = [f"{'figure':<18} {baseline_name:>{width}} {candidate_name:>{width}}"]
    for key, value in verdict.baseline.items():
        new = verdict.candidate[key]
        if isinstance(value, int):
            lines.append(f"{key:<18} {value:>{width}d} {int(new):>{width}d}")
        else:
            lines.append(f"{key:<18} {value:>{width}.4f} {new:>{width}.4f}")
    lines.append("")
    lines += [f"{'holds ' if c.holds else 'FAILS '} {c.name} ({c.detail})" for c in verdict.checks]
    lines.append("verdict: " + ("adopt (then measure the serving speed side by side)"
                                if verdict.adopt else "keep the baseline"))
    return "\n".join(lines)
