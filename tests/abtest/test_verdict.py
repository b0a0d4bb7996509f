"""The verdict at the top of the A/B report (ship / no ship / inconclusive, harms called out first) and
the reason behind every n/a cell, on hand-built results whose answer is known."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import math
import re

import pyarrow as pa

from abtest.analysis import INCONCLUSIVE, NO_SHIP, SHIP, ExperimentResult, MetricResult, decide
from abtest.report import write_reports
from abtest.stats import srm
from schemas.provenance import Provenance

PROVENANCE = Provenance(version="9.9.9", command="relevance abtest --events e --assignment a", created="2024-03-15T08:00:00+00:00")
NAN = math.nan


def row(metric: str, tier: str, lift: float, significant: bool | None = None, ni_verdict: str | None = None,
        higher_is_better: bool = True, slice_kind: str = "all", slice_value: str = "all", **numbers) -> MetricResult:
    """One treatment-vs-control result with a relative lift `lift` on a control mean of 1.0; `significant`
    None for rows outside the corrected family (guardrails, segments)."""
    values = dict(
        control=1.0, treatment=1.0 + lift, effect=lift, effect_ci_low=lift - 0.02, effect_ci_high=lift + 0.02, se=0.01,
        statistic=lift / 0.01, df=1000.0, pvalue=0.001 if significant else 0.4, rel_effect=lift, rel_ci_low=lift - 0.02,
        rel_ci_high=lift + 0.02, rel_method="log", cuped=True, theta=0.5, variance_reduction=0.3, mde=0.03,
        mde_relative=0.03, seq_pvalue=0.2, seq_ci_low=lift - 0.05, seq_ci_high=lift + 0.05,
    ) | numbers
    guardrail = tier == "guardrail"
    return MetricResult(
        metric=metric, tier=tier, variant="treatment", control_variant="control", slice_kind=slice_kind,
        slice_value=slice_value, n_control=5000, n_treatment=5000, higher_is_better=higher_is_better,
        pvalue_adjusted=None if significant is None else (0.004 if significant else 0.4), significant=significant,
        ni_margin=0.02 if guardrail else None, ni_pvalue=(0.01 if ni_verdict == "pass" else 0.6) if guardrail else None,
        ni_verdict=ni_verdict, **values,
    )


def result(metrics: list[MetricResult], alarm: bool = False, segments: tuple[MetricResult, ...] = ()) -> ExperimentResult:
    users = {"control": 5000, "treatment": 4600 if alarm else 5000}
    return ExperimentResult(
        experiment_id="exp_verdict", control="control", variants=("control", "treatment"), alpha=0.05, correction="holm",
        metrics=tuple(metrics), srm=srm(users), srm_segments=(), segments=segments, days=(), exclusions=(),
        reconciliation={}, caps={}, first_day=dt.date(2024, 3, 1), last_day=dt.date(2024, 3, 14), quarantine=pa.table({}),
    )


def sections(page: str) -> list[str]:
    return [html.unescape(title) for title in re.findall(r"<h2>(.*?)</h2>", page)]


def test_a_guardrail_beyond_its_margin_is_no_ship_and_is_called_out_first(tmp_path):
    rows = [row("ctr", "primary", 0.05, significant=True), row("cvr", "secondary", 0.01, significant=False),
            row("gmv_per_user", "guardrail", -0.08, ni_verdict="fail")]
    decision = decide(rows, "treatment", srm_alarm=False, correction="holm")
    assert (decision.verdict, decision.harmed, decision.won) == (NO_SHIP, ("gmv_per_user",), ("ctr",))
    write_reports(result(rows), tmp_path, PROVENANCE)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert sections(page)[0] == "Verdict"
    verdict = re.search(r"<h2>Verdict</h2>(.*?)<h2>", page).group(1)
    assert verdict.startswith("<p><strong>NO SHIP</strong> for <code>treatment</code> against <code>control</code>: "
                              "guardrail gmv_per_user beyond its -2.0% margin.</p><p>Significant harms:</p><ul><li>")
    harms = re.findall(r"<li><strong>(.*?)</strong></li>", verdict)
    assert len(harms) == 1 and harms[0].startswith("gmv_per_user -8.0% [-10.0%, -6.0%]") and "guardrail fail" in harms[0]
    assert json.loads((tmp_path / "result.json").read_text())["decisions"][0]["verdict"] == "no ship"


def test_a_significant_secondary_harm_is_no_ship_whatever_the_primary_says():
    # the report: cvr -6.4%, significant after Holm, listed like any other line
    rows = [row("ctr", "primary", 0.04, significant=True), row("cvr", "secondary", -0.064, significant=True),
            row("gmv_per_user", "guardrail", 0.0, ni_verdict="pass")]
    decision = decide(rows, "treatment", srm_alarm=False, correction="holm")
    assert decision.verdict == NO_SHIP and decision.reasons == ("cvr significantly worse after Holm",)


def test_a_rise_of_a_lower_is_better_metric_is_a_harm():
    rows = [row("ctr", "primary", 0.04, significant=True), row("zero_results", "secondary", 0.1, significant=True,
                                                                 higher_is_better=False),
            row("gmv_per_user", "guardrail", 0.0, ni_verdict="pass")]
    assert decide(rows, "treatment", srm_alarm=False, correction="holm").harmed == ("zero_results",)
    lower_is_better_win = [row("latency", "primary", -0.1, significant=True, higher_is_better=False)]
    assert decide(lower_is_better_win, "treatment", srm_alarm=False, correction="holm").verdict == SHIP


def test_a_significant_primary_win_without_harm_is_ship(tmp_path):
    rows = [row("ctr", "primary", 0.05, significant=True), row("query_good_rate", "primary", 0.01, significant=False),
            row("cvr", "secondary", -0.01, significant=False), row("gmv_per_user", "guardrail", 0.01, ni_verdict="pass")]
    decision = decide(rows, "treatment", srm_alarm=False, correction="holm")
    assert (decision.verdict, decision.harmed, decision.won) == (SHIP, (), ("ctr",))
    write_reports(result(rows), tmp_path, PROVENANCE)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<p><strong>SHIP</strong> for <code>treatment</code> against <code>control</code>: ctr significantly better" in page
    assert "Significant harms" not in page


def test_nothing_significant_is_inconclusive(tmp_path):
    rows = [row("ctr", "primary", 0.01, significant=False), row("cvr", "secondary", -0.01, significant=False),
            row("gmv_per_user", "guardrail", 0.0, ni_verdict="pass")]
    decision = decide(rows, "treatment", srm_alarm=False, correction="holm")
    assert decision.verdict == INCONCLUSIVE and decision.reasons == ("no primary metric significantly better after Holm",)
    write_reports(result(rows), tmp_path, PROVENANCE)
    assert "<strong>INCONCLUSIVE</strong>" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_a_win_with_a_guardrail_not_shown_safe_is_inconclusive():
    rows = [row("ctr", "primary", 0.05, significant=True), row("gmv_per_user", "guardrail", -0.01, ni_verdict="inconclusive")]
    decision = decide(rows, "treatment", srm_alarm=False, correction="holm")
    assert decision.verdict == INCONCLUSIVE
    assert decision.reasons == ("ctr significantly better after Holm", "guardrail gmv_per_user not shown within its -2.0% margin")


def test_an_srm_alarm_makes_any_verdict_inconclusive_but_harms_are_still_called_out(tmp_path):
    rows = [row("ctr", "primary", 0.05, significant=True), row("cvr", "secondary", -0.064, significant=True)]
    report = result(rows, alarm=True)
    assert report.srm.alarm
    (decision,) = report.decisions()
    assert decision.verdict == INCONCLUSIVE and decision.harmed == ("cvr",) and "SRM alarm" in decision.reasons[0]
    write_reports(report, tmp_path, PROVENANCE)
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert markdown.index("**INCONCLUSIVE**") < markdown.index("Significant harms:") < markdown.index("## Sample ratio")
    assert "- **cvr -6.4% [-8.4%, -4.4%], p=0.001, significant after Holm**" in markdown


def test_every_n_a_cell_says_why(tmp_path):
    no_data = dict(control=NAN, treatment=NAN, effect=NAN, pvalue=NAN, rel_effect=NAN, rel_ci_low=NAN, rel_ci_high=NAN,
                   mde_relative=NAN, seq_pvalue=NAN, variance_reduction=NAN, note="no data: a denominator sums to zero in a variant")
    rows = [
        row("ctr", "primary", 0.05, significant=True),
        row("cvr", "secondary", NAN, significant=None, **no_data),
        # a control mean of 0: the absolute effect is fine, any change relative to it is not
        row("returns", "secondary", 0.0, significant=False, control=0.0, rel_effect=NAN, rel_ci_low=NAN, rel_ci_high=NAN,
            rel_method="undefined", mde_relative=NAN, effect=0.01),
        row("gmv_per_user", "guardrail", 0.0, ni_verdict="pass"),
    ]
    segments = (row("ctr", "primary", 0.02, slice_kind="user_type", slice_value="new"),)
    write_reports(result(rows, segments=segments), tmp_path, PROVENANCE)
    page = html.unescape((tmp_path / "report.html").read_text(encoding="utf-8"))
    checked = 0
    for table, notes in re.findall(r"<table>(.*?)</table>((?:<p class='note'>.*?</p>)*)", page):
        reasons = dict(re.findall(r"<p class='note'>\[(\d+)\] (.*?)</p>", notes))
        cells = re.findall(r"<td>(.*?)</td>", table)
        for cell in cells:
            if "n/a" in cell:
                number = re.fullmatch(r"n/a \[(\d+)\]", cell).group(1)  # never a bare n/a
                assert reasons[number]
                checked += 1
    assert checked >= 10
    metrics = page[page.index("<h2>Metrics</h2>"):page.index("<h2>Data checks</h2>")]
    assert "cvr: no data: a denominator sums to zero in a variant" in metrics
    assert "returns: the control mean is 0, so a change relative to it is undefined" in metrics
    assert "a guardrail is judged by its one-sided non-inferiority test" in metrics
    assert "segment rows are descriptive" in page[page.index("<h2>Segments</h2>"):]


def test_footer_says_what_made_the_report(tmp_path):
    write_reports(result([row("ctr", "primary", 0.05, significant=True)]), tmp_path, PROVENANCE)
    line = "Made by relevance-labeling 9.9.9 at 2024-03-15T08:00:00+00:00 with: relevance abtest --events e --assignment a"
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.endswith(f"<footer>{line}</footer></body></html>\n")
    assert (tmp_path / "report.md").read_text(encoding="utf-8").endswith(f"---\n\n{line}\n")
    assert json.loads((tmp_path / "result.json").read_text())["provenance"] == {
        "version": "9.9.9", "command": "relevance abtest --events e --assignment a", "created": "2024-03-15T08:00:00+00:00"}


def test_one_verdict_per_treatment_variant():
    rows = [dataclasses.replace(row("ctr", "primary", lift, significant=True), variant=variant)
            for variant, lift in (("a", 0.05), ("b", -0.05))]
    report = dataclasses.replace(result(rows), variants=("control", "a", "b"))
    assert {d.variant: d.verdict for d in report.decisions()} == {"a": SHIP, "b": NO_SHIP}
