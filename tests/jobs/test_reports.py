"""The pages a user opens: index.html (every report, a verdict each), validation.html, churn.html.

A demo-like output folder is built once: a tests-size world validated (pandas), its A/B experiment
analysed, its synthetic rater evaluated, a hand-written training summary, and two nights of the
nightly job whose prepare and score steps are replaced by ones writing hand-made rows (export,
validation, churn and the night's index run for real). The verdict functions are checked on
hand-made inputs; the pages are opened in headless Chromium, when one is installed.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pytest

from jobs import nightly
from jobs.demo import POLICIES, DemoConfig, StageResult, demo_reports, nightly_policy, policy_labellers
from jobs.pages import suite_table
from jobs.report_index import (
    INDEX_PAGE,
    abtest_verdict,
    churn_verdict,
    datasets_verdict,
    evaluation_verdict,
    expectations_verdict,
    training_report,
    training_verdict,
    validation_verdict,
    write_index,
)
from schemas.expectations import validate_with_gx
from schemas.provenance import DISTRIBUTION, tool_version
from schemas.storage import write_table
from schemas.tables import JUDGMENTS, RELEVANCE

NIGHTS = ("2024-05-01", "2024-05-02")
GAINS = {"Exact": 1.0, "Partial": 0.5, "Irrelevant": 0.0}
# (query, product_id) -> label on each night: two of the four pairs change label on the second night.
LABELS = {("sofa", "p1"): ("Exact", "Exact"), ("sofa", "p2"): ("Partial", "Exact"), ("lamp", "p3"): ("Irrelevant", "Irrelevant"),
          ("lamp", "p4"): ("Exact", "Partial")}
VERSIONS = ("v1", "v2")
POLICY = "graph_grpo_policy"


def _night_rows(night: int) -> pa.Table:
    """RELEVANCE rows of a night: one-hot probabilities, so expected_gain is the label's gain."""
    day = dt.date.fromisoformat(NIGHTS[night])
    rows = [
        {"query": query, "query_id": f"q-{query}", "product_id": product_id, "label": labels[night], "label_set": "wands",
         "label_probs": [(name, float(name == labels[night])) for name in GAINS], "expected_gain": GAINS[labels[night]],
         "node_decisions": [], "reasoning": None, "product_content_hash": f"h-{product_id}", "model_name": POLICY,
         "model_version": VERSIONS[night], "scored_at": dt.datetime(2024, 5, 2, tzinfo=dt.UTC), "ds": day}
        for (query, product_id), labels in LABELS.items()
    ]
    return pa.Table.from_pylist(rows, schema=RELEVANCE.arrow_schema())


def _stub_prepare(config):
    """Stands in for Spark's prepare: writes prepare.json where prepare does, returns its report."""
    report = {"date": config.date, "search_impressions": {"rows_in": 10, "accepted": 10, "quarantined": 0}, "pairs": len(LABELS)}
    folder = Path(config.out) / "_prepare" / f"ds={config.date}"
    folder.mkdir(parents=True)
    (folder / "prepare.json").write_text(json.dumps(report))
    return report


def _stub_score(config):
    """Stands in for the scorer: writes the night's hand-made rows and score.json where scoring does."""
    night = NIGHTS.index(config.date)
    write_table(RELEVANCE, _night_rows(night), config.out)
    report = {"ds": config.date, "candidates": len(LABELS), "scored": len(LABELS), "reused": 0, "quarantined": 0, "model_name": POLICY,
              "model_version": VERSIONS[night]}
    folder = Path(config.out) / "_scoring" / f"ds={config.date}"
    folder.mkdir(parents=True)
    (folder / "score.json").write_text(json.dumps(report))
    return report


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, tiny_model):
    from abtest.run import config_from_manifest
    from abtest.run import run as abtest
    from evaluation.command import EvaluateConfig
    from evaluation.command import run as evaluate
    from evaluation.inputs import predictions_from_judgments
    from jobs.validate import ValidateConfig
    from jobs.validate import run as validate
    from jobs.world.run import GenerateConfig
    from jobs.world.run import run as generate
    from schemas.graph import LabelSet
    from schemas.storage import read_table
    from schemas.tables import QUERIES

    out = tmp_path_factory.mktemp("demo_out")
    world = out / "world"
    generate(GenerateConfig(out=world, preset="tests", seed=3))
    validate(ValidateConfig(data=str(world), out=str(out / "validation"), engine="pandas"))
    abtest(config_from_manifest(world / "world.json", out=out / "abtest"))
    label_set = json.loads((world / "world.json").read_text())["label_set"]
    rater = predictions_from_judgments(read_table(JUDGMENTS, world), LabelSet.load(label_set), model_name="synthetic_rater",
                                       queries=read_table(QUERIES, world))
    write_table(RELEVANCE, rater, out / "models" / "synthetic_rater")
    evaluate(EvaluateConfig(predictions={"synthetic_rater": str(out / "models" / "synthetic_rater")}, gold_source="nodes",
                            gold_nodes=str(world), queries=str(world), label_set=label_set, n_bootstrap=50, out=str(out / "evaluation")))
    (out / "sft").mkdir()
    (out / "sft" / "summary.json").write_text(json.dumps({"steps": 4, "val": {"label_macro_f1": 0.25}}))
    (out / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 4, "val/label_macro_f1": 0.25}) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nightly, "prepare", _stub_prepare)
        patch.setattr(nightly, "score", _stub_score)
        for day in NIGHTS:
            config = nightly.NightlyConfig(date=day, data=str(world), out=str(out / "nightly"), model=str(tiny_model))
            nightly.run_steps(config, config.score_config())
    write_index(out, "relevance demo: every report", demo_reports(out, [StageResult("a stage", 1.0, {})]))
    return out


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs.append(dict(attrs)["href"])


def _linked(page: Path) -> list[Path]:
    parser = _Links()
    parser.feed(page.read_text())
    return [page.parent / unquote(href) for href in parser.hrefs]


def test_the_demo_index_links_every_report_and_each_link_resolves(demo_out):
    linked = _linked(demo_out / INDEX_PAGE)
    missing = [str(path) for path in linked if not path.is_file()]
    assert not missing, missing
    names = {path.resolve().relative_to(demo_out.resolve()).as_posix() for path in linked}
    published = "nightly/published/relevance/ds=2024-05-02"
    for expected in ("validation/validation.html", "evaluation/report.html", "abtest/report.html", "sft/summary.json", "sft/metrics.jsonl",
                     "nightly/reports/ds=2024-05-02/index.html", f"{published}/validation.html", f"{published}/churn.html",
                     f"{published}/churn.png"):
        assert expected in names, expected
    text = (demo_out / INDEX_PAGE).read_text()
    assert f"Made by {DISTRIBUTION} {tool_version()} at " in text and "with: " in text
    assert "label changed on 50.0% of 4 pairs" in text


def test_a_night_writes_its_report_and_index_under_reports_once(demo_out):
    root = demo_out / "nightly"
    assert sorted(p.name for p in root.iterdir()) == ["prepared", "published", "reports", "scores"], "no nightly/nightly/"
    night = root / "reports" / "ds=2024-05-02"
    assert json.loads((night / "nightly.json").read_text())["date"] == "2024-05-02"
    linked = _linked(night / INDEX_PAGE)
    assert all(path.is_file() for path in linked)
    assert {path.name for path in linked} >= {"nightly.json", "prepare.json", "score.json", "validation.html", "churn.html", "churn.png",
                                              "manifest.json"}
    assert "4 candidate pairs: 4 scored, 0 reused, 0 quarantined; graph_grpo_policy, model_version v2" in (night / INDEX_PAGE).read_text()


def test_churn_pages_name_the_model_and_its_version(demo_out):
    published = demo_out / "nightly" / "published" / "relevance" / "ds=2024-05-02"
    for page in ("churn.md", "churn.html"):
        assert "graph_grpo_policy, model_version v1 → v2" in (published / page).read_text(), page


def test_the_validation_pages_show_each_expectation_and_what_it_observed(demo_out):
    summary = json.loads((demo_out / "validation" / "validation.json").read_text())
    page = (demo_out / "validation" / "validation.html").read_text()
    assert page.count("<code>expect_") == sum(t["expectations"] for t in summary["tables"].values())
    queries = summary["tables"]["queries"]["rows_in"]
    assert f"queries: {queries} in = {queries} accepted + 0 quarantined" in page
    assert f"0 of {queries} (0.00%)" in page, "unexpected rows of a row-wise expectation"
    published = (demo_out / "nightly" / "published" / "relevance" / "ds=2024-05-02" / "validation.html").read_text()
    assert "label_probs must sum to 1 within max_prob_sum_error=0.0001" in published


def test_a_failed_expectation_reads_failed_with_its_rows():
    import pandas as pd

    frame = pd.DataFrame({"query_id": ["q1", "q1", "q2"], "product_id": ["p1", "p2", "p1"], "label": ["Exact", "Partial", "Exact"],
                          "label_set": ["wands", "bogus", "bogus"], "annotator": ["a", "a", "a"], "is_weak": [False] * 3})
    suite = validate_with_gx(JUDGMENTS, frame, "pandas", example_columns=["query_id"], examples=2)
    row = next(r for r in suite_table(suite).split("<tr>") if "expect_column_values_to_be_in_set" in r and "label_set" in r)
    assert "<strong>FAILED</strong>" in row and "2 of 3 (66.67%)" in row and "q1" in row and "q2" in row


def _interval(estimate, low, high):
    return {"estimate": estimate, "low": low, "high": high, "level": 0.95}


def _ab_row(metric, tier, rel_effect, significant, slice_kind="all", effect=0.01):
    return {"metric": metric, "tier": tier, "variant": "treatment", "control_variant": "control", "slice_kind": slice_kind,
            "rel_effect": rel_effect, "effect": effect, "significant": significant, "pvalue_adjusted": 0.0123}


def test_verdict_lines_of_constructed_reports():
    models = [{"name": "a", "metrics": {"macro_f1": _interval(0.5, 0.4, 0.6)}}, {"name": "b", "metrics": {"macro_f1": _interval(0.8, 0.7, 0.9)}},
              {"name": "c", "metrics": {"macro_f1": _interval(None, None, None)}}]
    assert evaluation_verdict({"models": models}) == "best of 3 labellers: b, macro-F1 0.800 (95% CI 0.700–0.900)"

    srm_ok = {"alarm": False, "pvalue": 0.5}
    rows = [_ab_row("ctr", "primary", 0.09, True), _ab_row("ctr", "primary", 0.5, True, slice_kind="day"),
            _ab_row("gmv", "primary", None, False, effect=-1.5), _ab_row("cvr", "secondary", -0.06, True)]
    assert abtest_verdict({"srm": srm_ok, "metrics": rows}) == (
        "treatment vs control: ctr +9.0% (significant, adjusted p 0.012), gmv -1.5 (not significant, adjusted p 0.012)")
    assert abtest_verdict({"srm": {"alarm": True, "pvalue": 0.0001}, "metrics": rows}).startswith("SRM alarm (p 0.0001)")
    decisions = [{"variant": "treatment", "verdict": "no ship", "reasons": ["cvr significantly worse after Holm"],
                  "harmed": ["cvr"], "won": ["ctr"]}, {"variant": "v3", "verdict": "inconclusive", "reasons": [], "harmed": [], "won": []}]
    assert abtest_verdict({"decisions": decisions, "srm": srm_ok, "metrics": rows}) == (
        "treatment: no ship (harmed: cvr) (won: ctr); v3: inconclusive")

    tables = {"catalog": {"rows_in": 10, "accepted": 9, "quarantined": 1, "expectations_met": 9, "expectations": 9},
              "queries": {"rows_in": 5, "accepted": 5, "quarantined": 0, "expectations_met": 7, "expectations": 8}}
    assert validation_verdict({"tables": tables}) == "2 tables: 16 of 17 expectations met: 1 FAILED; 1 of 15 rows quarantined"
    assert expectations_verdict(23, 23) == "23 of 23 expectations met"

    assert churn_verdict({"first_night": True}) == "first night: nothing published earlier to compare with"
    churn = {"first_night": False, "previous_ds": "2024-05-01", "models": {
        "policy": {"label_changed": {"share": 0.125}, "pairs_both": 8}, "student": {"label_changed": {"share": None}, "pairs_both": 0}}}
    assert churn_verdict(churn) == "vs ds=2024-05-01: policy: label changed on 12.5% of 8 pairs; student: no pair in both nights"

    assert training_verdict({"steps": 20, "val": {"label_macro_f1": 0.6269}, "val_majority": {"label_macro_f1": 0.19}}) == (
        "20 steps, validation macro-F1 0.627, majority-label baseline 0.190")
    assert training_verdict({"steps": 3}) == "3 steps"
    assert training_verdict({"steps": 10, "val": {"label_macro_f1": 0.574}}, start_macro_f1=0.607) == (
        "10 steps, validation macro-F1 0.607 at its start -> 0.574 (-0.033)")
    examples = {"test": {"head": {"Exact": 1, "Partial": 2}}, "train": {"head": {"Exact": 5}, "tail": {"Irrelevant": 4}}}
    weak = {"train": {"head": {"weak:engaged": {"Exact": 2}}}}
    assert datasets_verdict({"written": 14, "examples": examples, "weak_examples": weak}) == "14 examples written: train 11, test 3"


HARNESS = """<!DOCTYPE html><html><body><pre id='out'></pre>{frames}<script>
// The harness's load event waits for every frame and every frame's images.
window.addEventListener('load', () => {{
  const results = {{}};
  for (const frame of document.querySelectorAll('iframe')) {{
    const page = frame.contentDocument;
    results[frame.dataset.page] = {{
      title: page.title,
      images: [...page.images].map(image => [(image.getAttribute('src') || '').slice(0, 60), image.complete && image.naturalWidth > 0]),
      nanCells: [...page.querySelectorAll('td, th')].map(cell => cell.textContent.trim()).filter(text => /\\bnan\\b/i.test(text)),
    }};
  }}
  document.getElementById('out').textContent = JSON.stringify(results);
}});
</script></body></html>"""


def _browser() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chromium-headless-shell"))), None)


def _pages(index: Path) -> list[Path]:
    """`index` and every page reachable from it by links."""
    pages, queue = [index.resolve()], [index]
    while queue:
        for path in _linked(queue.pop()):
            if path.suffix == ".html" and path.resolve() not in pages:
                pages.append(path.resolve())
                queue.append(path)
    return pages


def test_an_rl_run_verdict_reads_its_start_validation_from_its_metrics(tmp_path):
    rl, sft = tmp_path / "grpo", tmp_path / "sft"
    for run_dir, records in ((rl, [{"event": "start", "step": 0}, {"step": 0, "val/label_macro_f1": 0.607}, {"step": 1, "reward/outcome": 0.5},
                                   {"step": 10, "val/label_macro_f1": 0.574}]),
                             (sft, [{"event": "start", "step": 0}, {"step": 1, "train/loss": 2.0}])):
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({"steps": 10, "val": {"label_macro_f1": 0.574}}))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert training_report("Graph-GRPO", rl).verdict == "10 steps, validation macro-F1 0.607 at its start -> 0.574 (-0.033)"
    assert training_report("SFT", sft).verdict == "10 steps, validation macro-F1 0.574"



def _rl_run(out, start: float | None, end: float):
    run_dir = out / "grpo"
    run_dir.mkdir(parents=True)
    records = [{"event": "start", "step": 0}, *([{"step": 0, "val/label_macro_f1": start}] if start is not None else []),
               {"step": 10, "val/label_macro_f1": end}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (run_dir / "summary.json").write_text(json.dumps({"steps": 10, "val": {"label_macro_f1": end}}))
    return out


@pytest.mark.parametrize(("start", "end", "chosen"), [(0.607, 0.574, "sft_policy"), (0.607, 0.607, "graph_grpo_policy"),
                                                      (0.607, 0.650, "graph_grpo_policy"), (None, 0.574, "graph_grpo_policy")])
def test_the_nightly_stage_publishes_the_rl_policy_only_where_it_did_not_lower_validation(tmp_path, start, end, chosen):
    out = _rl_run(tmp_path, start, end)
    assert nightly_policy(out) == chosen
    labellers = policy_labellers(DemoConfig(), out)
    assert labellers[f"{chosen}_checked"] == (POLICIES[chosen], True)
    assert [name for name, (_, checked) in labellers.items() if not checked] == list(POLICIES)
    verdict = next(report.verdict for report in demo_reports(out, []) if report.title.startswith("Graph-GRPO"))
    assert verdict.endswith("not published: the nightly stage scores with the SFT policy") == (chosen == "sft_policy"), verdict


@pytest.mark.slow
def test_every_page_renders_in_a_browser_with_its_images_and_no_nan(demo_out, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    root = demo_out.resolve()
    pages = _pages(demo_out / INDEX_PAGE)
    frames = "".join(f"<iframe data-page='{page.relative_to(root)}' src='{page.as_uri()}'></iframe>" for page in pages)
    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS.format(frames=frames))
    # file:// pages may read each other only with this flag (the harness reads each iframe's document).
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=20000", "--dump-dom", harness.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)}).stdout
    found = re.search(r"<pre id=\"out\">(.*?)</pre>", dom, re.S)
    assert found and found.group(1), f"the harness did not report: {dom[:500]}"
    results = json.loads(html.unescape(found.group(1)))
    assert sorted(results) == sorted(str(page.relative_to(root)) for page in pages)
    for page, result in results.items():
        assert result["title"], f"{page}: no title"
        assert all(loaded for _, loaded in result["images"]), (page, result["images"])
        assert not result["nanCells"], (page, result["nanCells"])
    images = [src for result in results.values() for src, _ in result["images"]]
    assert "churn.png" in images and len(images) >= 3, "the check saw the pages' images"
