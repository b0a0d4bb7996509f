"""What report.html shows: baseline and lineage comparisons with intervals, the majority-class floor,
spelled-out node names, "-" where a model has no node output, small-segment warnings, a table of
contents whose links resolve, and the footer saying what made the report."""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import shlex
import sys
from collections import Counter
from importlib import metadata

import pyarrow as pa
import pytest
from eval_world import WANDS, make_predictions
from sklearn import metrics as skm

from evaluation.command import EvaluateConfig, run
from evaluation.inputs import predictions_from_judgments
from schemas import storage
from schemas.config import ConfigError, load_config
from schemas.tables import CATALOG, GOLD_NODES, JUDGMENTS, QUERIES, RELEVANCE

HEAD_QUERIES = ("q0", "q1")  # a segment of two queries: its intervals must carry the warning


def without_node(table: pa.Table, node: str) -> pa.Table:
    """The predictions with `node` taken out of every row's node_decisions (a model without that head)."""
    decisions = [[(key, value) for key, value in row if key != node] for row in table["node_decisions"].to_pylist()]
    index = table.schema.get_field_index("node_decisions")
    return table.set_column(index, table.schema.field(index), pa.array(decisions, table.schema.field(index).type))


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage_data")
    queries = world.queries.to_pydict()
    queries["segment"] = ["head" if q in HEAD_QUERIES else "tail" for q in queries["query_id"]]
    for table, rows in ((JUDGMENTS, world.judgments), (GOLD_NODES, world.gold_nodes), (CATALOG, world.catalog),
                        (QUERIES, pa.Table.from_pydict(queries, schema=QUERIES.arrow_schema()))):
        storage.write_table(table, rows, root)
    models = {
        "rater": predictions_from_judgments(world.judgments, WANDS, "rater"),  # one-hot labels, no node outputs
        "sft": make_predictions(world.gold, seed=11, accuracy=0.55, name="sft"),
        "grpo": make_predictions(world.gold, seed=12, accuracy=0.75, name="grpo"),
        "student": without_node(make_predictions(world.gold, seed=13, accuracy=0.7, name="student"), "qa"),
    }
    for name, table in models.items():
        storage.write_table(RELEVANCE, table, root / name)
    return root, models


def evaluate_to(root, out, *overrides):
    predictions = [f"predictions.{name}={root / name}" for name in ("rater", "sft", "grpo", "student")]
    config = load_config(EvaluateConfig, overrides=[
        *predictions, "gold_source=nodes", f"gold_nodes={root}", f"queries={root}", f"catalog={root}",
        "n_bootstrap=100", f"out={out}", *overrides,
    ])
    return run(config)


@pytest.fixture(scope="module")
def default_report(data, tmp_path_factory):
    root, _ = data
    out = tmp_path_factory.mktemp("default_report")
    result = evaluate_to(root, out)
    return result, (out / "report.html").read_text(encoding="utf-8"), out


def tables(page: str) -> list[list[list[str]]]:
    """Every <table> of the page as rows of unescaped cell texts (header row first)."""
    return [
        [[html.unescape(cell) for cell in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)] for row in re.findall(r"<tr>(.*?)</tr>", table)]
        for table in re.findall(r"<table>(.*?)</table>", page)
    ]


def table_after(page: str, heading: str) -> list[list[str]]:
    """The first table after the heading whose text is `heading`."""
    start = page.index(f">{html.escape(heading)}</h")
    return tables(page[start:])[0]


def macro_f1(world, table: pa.Table) -> float:
    predicted = dict(zip(zip(table["query_id"].to_pylist(), table["product_id"].to_pylist()), table["label"].to_pylist()))
    keys = list(world.gold)
    return skm.f1_score([world.gold[k] for k in keys], [predicted[k] for k in keys], average="macro")


def test_lineage_is_compared_stage_by_stage_with_paired_intervals(default_report, data, world):
    result, page, _ = default_report
    _, models = data
    assert result.baseline == "rater" and result.lineage == ("sft", "grpo", "student")
    lineage = table_after(page, "Lineage: sft -> grpo -> student")
    assert [row[:2] for row in lineage[1:]] == [["sft", "grpo"], ["grpo", "student"]]
    sft_to_grpo = macro_f1(world, models["grpo"]) - macro_f1(world, models["sft"])
    cell = lineage[1][lineage[0].index("macro_f1 difference")]
    estimate, low, high = (float(x) for x in re.fullmatch(r"([+-][\d.]+) \[([-\d.]+), ([-\d.]+)\]", cell).groups())
    assert estimate == pytest.approx(sft_to_grpo, abs=5e-4) and low < estimate < high
    assert result.lineage_comparisons[0].verdict in html.unescape(page)
    against = table_after(page, "Comparisons against the baseline rater")
    assert [row[:2] for row in against[1:]] == [["rater", "sft"], ["rater", "grpo"], ["rater", "student"]]
    assert all(re.fullmatch(r"[+-][\d.]+ \[[-\d.]+, [-\d.]+\]", row[4]) for row in against[1:])


def test_comparisons_difference_the_reasoning_nodes_both_models_write(default_report):
    result, page, _ = default_report
    nodes = tables(page[page.index(f">{html.escape('Lineage: sft -> grpo -> student')}</h"):])[1]
    header = nodes[0]
    assert header[:2] == ["stage before", "stage"] and "qa" in header and [row[:2] for row in nodes[1:]] == [["sft", "grpo"], ["grpo", "student"]]
    models = {model.name: model for model in result.models}
    for node in header[2:]:
        k = models["sft"].node_names.index(node)
        gained = models["grpo"].metrics["node_accuracy"].estimate[k] - models["sft"].metrics["node_accuracy"].estimate[k]
        estimate, low, high = (float(x) for x in re.fullmatch(r"([+-][\d.]+) \[([-\d.]+), ([-\d.]+)\]", nodes[1][header.index(node)]).groups())
        assert estimate == pytest.approx(gained, abs=5e-4) and low <= estimate <= high
    assert nodes[2][header.index("qa")] == "-"  # the student writes no qa
    assert "(model - baseline; a fall" not in html.unescape(page)  # the baseline, the rater, writes no reasoning


def test_a_chosen_baseline_and_lineage(data, tmp_path):
    root, _ = data
    result = evaluate_to(root, tmp_path, "baseline=grpo", "lineage=sft,grpo,student")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    against = table_after(page, "Comparisons against the baseline grpo")
    assert [row[:2] for row in against[1:]] == [["grpo", "rater"], ["grpo", "sft"], ["grpo", "student"]]
    lineage = table_after(page, "Lineage: sft -> grpo -> student")
    assert [row[:2] for row in lineage[1:]] == [["sft", "grpo"], ["grpo", "student"]]
    # grpo -> student is in both tables: one comparison, the same numbers
    assert result.lineage_comparisons[1] is result.comparisons[2]


@pytest.mark.parametrize("override,message", [
    ("baseline=gpt", r"baseline 'gpt' is not one of the models \['rater', 'sft', 'grpo', 'student'\]"),
    ("lineage=sft,gpt", r"lineage names \['gpt'\], which are not models"),
    ("lineage=sft,grpo,sft", r"names a model twice"),
    ("lineage=sft", r"has one stage; name at least two"),
])
def test_baseline_and_lineage_must_name_models(override, message):
    predictions = [f"predictions.{name}=x" for name in ("rater", "sft", "grpo", "student")]
    with pytest.raises(ConfigError, match=message):
        load_config(EvaluateConfig, overrides=[*predictions, "gold=g", override])


def test_majority_class_row(default_report, world):
    _, page, _ = default_report
    gold = [world.gold[k] for k in world.gold]
    majority = Counter(gold).most_common(1)[0][0]
    side_by_side = table_after(page, "Models side by side")
    column = side_by_side[0].index(f"majority class ({majority})")
    rows = {row[0]: row for row in side_by_side[1:]}
    expected_f1 = skm.f1_score(gold, [majority] * len(gold), average="macro")
    assert rows["macro_f1"][column].startswith(f"{expected_f1:.3f} [")
    assert rows["accuracy"][column].startswith(f"{Counter(gold)[majority] / len(gold):.3f} [")
    assert rows["roc_auc"][column].startswith("0.500")  # one score for every pair ranks nothing


def test_node_names_are_spelled_out_and_a_missing_node_is_not_applicable(default_report):
    _, page, _ = default_report
    side_by_side = {row[0]: row[1:] for row in table_after(page, "Models side by side")[1:]}
    ms = side_by_side["node accuracy: ms (subject match)"]
    qa = side_by_side["node accuracy: qa (query attributes, the facets the query constrains (key=value; ... or none))"]
    # columns: rater, sft, grpo, student, majority class
    assert ms[0] == qa[0] == "-" and ms[4] == qa[4] == "-"  # the rater and the majority class output no nodes
    assert qa[3] == "-" and re.fullmatch(r"[\d.]+ \[[\d.]+, [\d.]+\]", ms[3])  # the student has no qa head
    per_node = tables(page[page.index(">Model student</h2>"):])[3]  # per label, confusion, binary, per node
    assert per_node[0][0] == "node"
    rows = {row[0]: row for row in per_node[1:]}
    assert rows["qa (query attributes, the facets the query constrains (key=value; ... or none))"][2] == "-"
    assert "0.000 [0.000, 0.000]" not in rows["ms (subject match)"][2]
    assert "Per-node accuracy" not in page[page.index(">Model rater</h2>"):page.index(">Model sft</h2>")]


def test_segments_with_few_queries_are_marked(default_report):
    _, page, _ = default_report
    segments = tables(page[page.index(">Model sft</h2>"):])[4]
    header, rows = segments[0], {row[1]: row for row in segments[1:]}
    assert header[:4] == ["kind", "segment", "gold pairs", "queries"]
    assert rows["head"][3] == str(len(HEAD_QUERIES)) and rows["tail"][3] == "28"
    assert all(cell.endswith(" ⚠") for cell in rows["head"][4:])
    assert not any("⚠" in cell for cell in rows["tail"][4:])
    assert "⚠ fewer than 10 queries" in page


def test_contents_link_to_every_section(default_report):
    _, page, _ = default_report
    nav = re.search(r"<nav>(.*?)</nav>", page).group(1)
    links = re.findall(r"<a href='#([^']+)'>(.*?)</a>", nav)
    sections = re.findall(r"<h2 id='([^']+)'>(.*?)</h2>", page)
    assert links == sections
    assert page.index("<nav>") < page.index("<h2")
    titles = [html.unescape(title) for _, title in sections]
    assert titles[:5] == ["Setup", "Models side by side", "Comparisons against the baseline rater",
                          "Lineage: sft -> grpo -> student", "Agreement with human judgments"]
    assert len(set(anchor for anchor, _ in sections)) == len(sections)
    markdown = (default_report[2] / "report.md").read_text(encoding="utf-8")
    assert "- [Lineage: sft -> grpo -> student](#lineage-sft---grpo---student)" in markdown  # GitHub's slug


def test_footer_says_what_made_the_report(default_report):
    _, page, out = default_report
    footer = html.unescape(re.search(r"<footer>(.*?)</footer>", page).group(1))
    provenance = json.loads((out / "metrics.json").read_text())["provenance"]
    assert provenance["version"] == metadata.version("relevance-labeling")
    assert provenance["command"].endswith(shlex.join(sys.argv[1:]))
    made = dt.datetime.fromisoformat(provenance["created"])
    assert abs(dt.datetime.now(dt.UTC) - made) < dt.timedelta(minutes=10)
    assert footer == (f"Made by relevance-labeling {provenance['version']} at {provenance['created']} with: "
                      f"{provenance['command']}")
    assert page.rindex("<footer>") > page.rindex("</table>")
