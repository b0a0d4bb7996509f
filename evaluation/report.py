"""Reports of an `EvaluationResult`: Markdown, self-contained HTML, and JSON for machines.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered
twice: Markdown links the figures as PNG files under `plots/`, HTML embeds the same PNGs inline
(base64), so report.html can be mailed on its own. It opens with a table of contents (each section's
anchor is its GitHub-style slug, so the Markdown links resolve on GitHub too) and ends with a footer
saying which version of the tool made it, from which command line and when. Figures: a confusion
matrix per model, per-label F1 bars with intervals, the reliability diagram, and forest plots of the
differences against the baseline and along the lineage.

An "Agreement with human judgments" section gives each model's Cohen's kappa (unweighted, linear,
quadratic) and Krippendorff's alpha (ordinal, nominal) against gold, beside the judges' own agreement
where pairs have several judgments (the ceiling), the like-for-like comparison on those pairs (a model
against one judge, judges against each other, the gap), per-label one-vs-rest kappa, a figure, and per
model an agreement-by-segment table.

Cells that do not apply are "-" (a node the model never outputs, NDCG of a product-type segment);
"n/a" is a number that is undefined on these pairs (an AUC with one class). Intervals of a segment
or comparison with fewer than `FEW_QUERIES` queries carry a warning: a bootstrap over a handful of
queries cannot see how much queries vary.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.agreement import AGAINST_HUMANS, GAP, HUMANS  # noqa: E402
from evaluation.bootstrap import Interval  # noqa: E402
from evaluation.evaluate import DIFFERENCES, METRICS, Comparison, EvaluationResult, ModelEvaluation  # noqa: E402
from evaluation.metrics import ECE_BINS, MCNEMAR_EXACT_BELOW  # noqa: E402
from schemas.provenance import Provenance  # noqa: E402

SUMMARY = (
    "coverage", "accuracy", "coverage_adjusted_accuracy", "macro_f1", "binary_f1", "roc_auc", "pr_auc", "ndcg", "ece",
)
FEW_QUERIES = 10
FEW_QUERIES_MARK = "⚠"
AGREEMENT_ROWS = {
    "kappa": "Cohen's κ",
    "kappa_linear": "κ linear weights",
    "kappa_quadratic": "κ quadratic weights",
    "alpha_ordinal": "Krippendorff's α ordinal",
    "alpha_nominal": "α nominal",
}
CEILING_METRICS = ("kappa", "kappa_quadratic", "alpha_ordinal")  # the like-for-like table's columns


# ---------------------------------------------------------------- JSON


def to_jsonable(value):
    """Dataclasses, numpy arrays and scalars as plain JSON values (NaN as null)."""
    if is_dataclass(value):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


# ---------------------------------------------------------------- figures


def png_bytes(figure) -> bytes:
    """`figure` as PNG bytes (the figure is closed); every report inlines its plots this way."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def plot_confusion(model: ModelEvaluation) -> bytes:
    """Confusion matrix, colour = share of the gold row, text = counts."""
    counts = model.confusion
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.9 * len(model.labels)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for row in range(len(model.labels)):
        for column in range(len(model.labels)):
            axes.text(column, row, f"{counts[row, column]:d}", ha="center", va="center",
                      color="white" if shares[row, column] > 0.6 else "black")
    axes.set_xticks(range(len(model.labels)), model.labels, rotation=30, ha="right")
    axes.set_yticks(range(len(model.labels)), model.labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("gold")
    axes.set_title(f"{model.name}: confusion matrix")
    figure.colorbar(image, ax=axes, label="share of gold row")
    return png_bytes(figure)


def plot_class_f1(models: tuple[ModelEvaluation, ...]) -> bytes:
    """Per-label F1 bars of every model with their bootstrap intervals."""
    labels = models[0].labels
    width = 0.8 / len(models)
    figure, axes = plt.subplots(figsize=(1.5 + 1.4 * len(labels) + 0.3 * len(models), 3.6))
    for i, model in enumerate(models):
        f1 = model.metrics["f1"]
        x = np.arange(len(labels)) - 0.4 + width * (i + 0.5)
        errors = np.vstack([f1.estimate - f1.low, f1.high - f1.estimate])
        axes.bar(x, f1.estimate, width, yerr=np.nan_to_num(errors), capsize=3, label=model.name)
    axes.set_xticks(range(len(labels)), labels)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("F1")
    axes.set_title(f"per-label F1 ({models[0].metrics['f1'].level:.0%} query-bootstrap intervals)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return png_bytes(figure)


def plot_reliability(models: tuple[ModelEvaluation, ...]) -> bytes:
    """Accuracy against mean confidence per bin (top-label), one line per model; bar = pair share."""
    figure, (axes, counts) = plt.subplots(
        2, 1, figsize=(5.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for model in models:
        curve = model.reliability
        ece = model.metrics["ece"].estimate
        axes.plot(curve.mean_confidence, curve.accuracy, marker="o", label=f"{model.name} (ECE {ece:.3f})")
        shares = np.array(curve.count) / max(sum(curve.count), 1)
        counts.step(curve.upper, shares, where="pre", label=model.name)
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_title(f"reliability diagram ({ECE_BINS} equal-width bins)")
    axes.legend(fontsize="small")
    counts.set_xlabel("confidence of the predicted label")
    counts.set_ylabel("share of pairs")
    return png_bytes(figure)


def plot_forest(comparisons: tuple[Comparison, ...], k: int, title: str) -> bytes:
    """Differences (other - baseline) with their intervals; one row per comparison and metric."""
    rows = [
        (f"{c.other} - {c.baseline}: {_metric_name(metric, k)}", c.metrics[f"{metric}_difference"])
        for c in comparisons
        for metric in DIFFERENCES
    ]
    figure, axes = plt.subplots(figsize=(7, 0.9 + 0.35 * len(rows)))
    for y, (_, interval) in enumerate(rows):
        axes.errorbar(interval.estimate, y, xerr=[[interval.estimate - interval.low], [interval.high - interval.estimate]],
                      fmt="o", capsize=4, color="tab:blue")
    axes.axvline(0, color="grey", linestyle=":")
    axes.set_yticks(range(len(rows)), [name for name, _ in rows])
    axes.invert_yaxis()
    axes.set_xlabel(f"difference ({comparisons[0].metrics['macro_f1_difference'].level:.0%} paired query-bootstrap interval)")
    axes.set_title(title)
    return png_bytes(figure)


def plot_agreement(result: EvaluationResult) -> bytes:
    """Each agreement metric of every model against gold with its interval; the judges' own agreement
    (the ceiling) as a grey band where pairs have several judgments."""
    rows = list(AGREEMENT_ROWS)
    models = result.models
    height = 0.8 / len(models)
    figure, axes = plt.subplots(figsize=(7, 1.0 + 0.55 * len(rows) * max(1, len(models) / 2)))
    for y, name in enumerate(rows):
        ceiling = result.humans.get(f"{HUMANS}{name}")
        if ceiling is not None and not math.isnan(ceiling.estimate):
            axes.fill_betweenx([y - 0.45, y + 0.45], ceiling.low, ceiling.high, color="lightgrey",
                               label="judges among themselves (ceiling)" if y == 0 else None)
            axes.plot([ceiling.estimate] * 2, [y - 0.45, y + 0.45], color="grey")
        for i, model in enumerate(models):
            interval = model.metrics[name]
            offset = y - 0.4 + height * (i + 0.5)
            axes.errorbar(interval.estimate, offset, xerr=[[interval.estimate - interval.low], [interval.high - interval.estimate]],
                          fmt="o", capsize=3, color=f"C{i}", label=model.name if y == 0 else None)
    axes.axvline(0, color="grey", linestyle=":")
    axes.set_yticks(range(len(rows)), list(AGREEMENT_ROWS.values()))
    axes.invert_yaxis()
    axes.set_xlabel(f"agreement with gold ({result.level:.0%} query-bootstrap intervals); 0 = chance, 1 = perfect")
    axes.set_title("agreement with human judgments")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return png_bytes(figure)


def figures(result: EvaluationResult) -> dict[str, bytes]:
    """Every figure of the report as PNG bytes, by file stem."""
    images = {f"confusion_{i}": plot_confusion(model) for i, model in enumerate(result.models)}
    images["agreement"] = plot_agreement(result)
    images["class_f1"] = plot_class_f1(result.models)
    images["reliability"] = plot_reliability(result.models)
    if result.comparisons:
        images["forest"] = plot_forest(result.comparisons, result.k, f"models vs the baseline {result.baseline}")
    if result.lineage_comparisons:
        images["lineage_forest"] = plot_forest(result.lineage_comparisons, result.k, "each stage vs the one before")
    return images


# ---------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Block:
    """One piece of the report: kind 'h2'/'h3' (text), 'p' (text), 'ul' (rows of one item),
    'table' (header + rows), 'figure' (text = image stem, header = (caption,)), 'toc' (the links to
    every 'h2', made when rendered), 'footer' (text)."""

    kind: str
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


def fmt(interval: Interval, index: int | tuple[int, ...] | None = None, signed: bool = False) -> str:
    """`0.812 [0.790, 0.833]`; per-label metrics take `index` (a tuple for a matrix of them)."""
    pick = (lambda v: v) if index is None else (lambda v: v[index])
    estimate, low, high = pick(interval.estimate), pick(interval.low), pick(interval.high)
    if math.isnan(estimate):
        return "n/a"
    head = f"{estimate:+.3f}" if signed else f"{estimate:.3f}"
    return head if math.isnan(low) else f"{head} [{low:.3f}, {high:.3f}]"


def _decides(model, node: str) -> bool:
    """Whether the model emitted this node for any gold pair (a labeller without reasoning emits none:
    its node accuracy is not a number to show)."""
    if node not in model.node_names:
        return False
    gold_pairs, _, lacking = model.node_counts[model.node_names.index(node)]
    return lacking < gold_pairs


def _node_accuracy(model: ModelEvaluation, node: str) -> str:
    """The node's accuracy with its interval, or "-" where the model never outputs the node."""
    return fmt(model.metrics["node_accuracy"], model.node_names.index(node)) if _decides(model, node) else "-"


def _node_label(node: str, result: EvaluationResult) -> str:
    """`qs (query subject, ...)`: the graph's description next to the short name."""
    description = result.node_descriptions.get(node)
    return f"{node} ({description})" if description else node


def _few_queries(text: str, n_queries: int) -> str:
    """An interval's cell, marked when it rests on fewer than FEW_QUERIES queries."""
    return f"{text} {FEW_QUERIES_MARK}" if n_queries < FEW_QUERIES and text not in ("-", "n/a") else text


NOT_APPLICABLE_NOTE = "-: the model never outputs that node (not applicable, not 0)."
FEW_QUERIES_NOTE = (
    f"{FEW_QUERIES_MARK} fewer than {FEW_QUERIES} queries: a bootstrap over so few queries cannot see how much "
    "queries vary, so the interval is too narrow to trust."
)


def _metric_name(name: str, k: int) -> str:
    return f"ndcg@{k}" if name == "ndcg" else name


def _model_blocks(model: ModelEvaluation, index: int, result: EvaluationResult) -> list[Block]:
    m = model.metrics
    blocks = [
        Block("h2", f"Model {model.name}"),
        Block("p", (
            f"{model.n_covered} of {model.n_gold_pairs} gold pairs covered over {model.n_queries} queries; "
            f"{model.n_gold_pairs - model.n_covered} uncovered (scored as wrong only in coverage_adjusted_accuracy); "
            f"{model.n_predictions_without_gold} predictions without a gold label (counted, not scored). "
            f"NDCG@{result.k} averages {model.n_ndcg_queries} queries with some gain."
        )),
        Block("h3", "Per label"),
        Block(
            "table",
            header=("label", "gold pairs", "precision", "recall", "F1"),
            rows=tuple(
                (label, str(int(model.confusion[i].sum())),
                 fmt(m["precision"], i), fmt(m["recall"], i), fmt(m["f1"], i))
                for i, label in enumerate(model.labels)
            ),
        ),
        Block("h3", "Confusion matrix (rows gold, columns predicted)"),
        Block(
            "table",
            header=("gold \\ predicted", *model.labels),
            rows=tuple((label, *(str(v) for v in model.confusion[i])) for i, label in enumerate(model.labels)),
        ),
        Block("figure", f"confusion_{index}", header=(f"{model.name}: confusion matrix",)),
        Block("h3", f"Relevant ({', '.join(result.relevant)}) vs not"),
        Block(
            "table",
            header=("accuracy", "precision", "recall", "F1", "ROC-AUC", "PR-AUC"),
            rows=((fmt(m["binary_accuracy"]), fmt(m["binary_precision"]), fmt(m["binary_recall"]),
                   fmt(m["binary_f1"]), fmt(m["roc_auc"]), fmt(m["pr_auc"])),),
        ),
    ]
    if any(_decides(model, name) for name in model.node_names):
        blocks += [
            Block("h3", "Per-node accuracy (pairs with a gold node value)"),
            Block(
                "table",
                header=("node", "pairs with gold value", "accuracy", "prediction lacks the node"),
                rows=tuple(
                    (_node_label(name, result), str(model.node_counts[i, 0]), _node_accuracy(model, name),
                     str(model.node_counts[i, 2]))
                    for i, name in enumerate(model.node_names)
                ),
            ),
        ]
        if not all(_decides(model, name) for name in model.node_names):
            blocks.append(Block("p", NOT_APPLICABLE_NOTE))
    if model.segments:
        blocks += [
            Block("h3", "Segments"),
            Block(
                "table",
                header=("kind", "segment", "gold pairs", "queries", "coverage", "accuracy", "macro_f1", f"ndcg@{result.k}"),
                rows=tuple(
                    (kind, name, str(s.n_gold_pairs), str(s.n_queries),
                     *(_few_queries(cell, s.n_queries) for cell in (
                         fmt(s.metrics["coverage"]), fmt(s.metrics["accuracy"]), fmt(s.metrics["macro_f1"]),
                         fmt(s.metrics["ndcg"]) if "ndcg" in s.metrics else "-",
                     )))
                    for kind, name, s in model.segments
                ),
            ),
        ]
        if any(s.n_queries < FEW_QUERIES for _, _, s in model.segments):
            blocks.append(Block("p", FEW_QUERIES_NOTE))
        blocks += _segment_agreement_blocks(model)
    return blocks


def _metric(evaluation: ModelEvaluation, name: str, n_queries: int) -> str:
    """A metric's cell with its interval and the few-queries mark, "-" when the evaluation lacks it."""
    return _few_queries(fmt(evaluation.metrics[name]), n_queries) if name in evaluation.metrics else "-"


def _segment_agreement_blocks(model: ModelEvaluation) -> list[Block]:
    """Agreement with gold per segment, beside the judges' agreement in that segment (the ceiling)."""
    return [
        Block("h3", "Agreement by segment"),
        Block(
            "table",
            header=("kind", "segment", "gold pairs", "queries", "κ", "κ quadratic", "α ordinal",
                    "pairs judged several times", "judges' κ (ceiling)", "judges' α ordinal (ceiling)"),
            rows=tuple(
                (kind, name, str(s.n_gold_pairs), str(s.n_queries),
                 *(_metric(s, metric, s.n_queries) for metric in ("kappa", "kappa_quadratic", "alpha_ordinal")),
                 str(s.n_several_judged),
                 *(_metric(s, f"{HUMANS}{metric}", s.n_several_judged_queries) for metric in ("kappa", "alpha_ordinal")))
                for kind, name, s in model.segments
            ),
        ),
    ]


def _agreement_blocks(result: EvaluationResult) -> list[Block]:
    """Agreement with gold, the judges' ceiling, the like-for-like comparison and per-label kappa."""
    models, majority = result.models, result.majority
    judged, queries = majority.n_several_judged, majority.n_several_judged_queries
    ceiling = bool(result.humans)
    blocks = [
        Block("h2", "Agreement with human judgments"),
        Block("p", (
            "Chance-corrected agreement of each model's labels with the gold labels (0 = chance, 1 = perfect): Cohen's κ "
            "unweighted and with linear and quadratic weights over the label order "
            f"({' > '.join(result.labels)}: a near miss costs less than a far one), Krippendorff's α with ordinal and "
            f"nominal distances. {majority.name} is the chance floor (κ = 0)."
            + (f" Ceiling: the judges' agreement with each other on the {judged} gold pairs judged several times "
               f"({queries} queries), κ with pooled marginals (Fleiss' κ) and α of their judgments." if ceiling else
               " No gold pair has several judgments, so the judges' own agreement (the ceiling) is unknown; judge a sample "
               "of pairs twice or more to see it (the synthetic world: relevance generate --set extra_raters=2).")
        )),
        Block(
            "table",
            header=("metric", *(model.name for model in models), majority.name,
                    *(("judges among themselves (ceiling)",) if ceiling else ())),
            rows=tuple(
                (label, *(fmt(model.metrics[name]) for model in (*models, majority)),
                 *((_few_queries(fmt(result.humans[f"{HUMANS}{name}"]), queries),) if ceiling else ()))
                for name, label in AGREEMENT_ROWS.items()
            ),
        ),
        Block("figure", "agreement", header=("agreement with gold; grey: the judges among themselves",)),
    ]
    if ceiling:
        blocks += [
            Block("h3", "Against the judges, on the pairs judged several times"),
            Block("p", (
                "Gold is a majority of judges, which a model may match more often than one judge matches another; the "
                "like-for-like comparison pairs each judgment of these pairs with the model's label (a model against one "
                "judge) and sets it beside the judges against each other, both with pooled marginals, on the pairs the "
                "model covers. Gap: model minus judges, paired (the same resampled queries); below 0 the model agrees "
                "with a judge less than judges agree with each other."
            )),
            Block(
                "table",
                header=("model", "pairs", "queries", *(f"{AGREEMENT_ROWS[m]} {what}" for m in CEILING_METRICS
                                                       for what in ("vs a judge", "judges", "gap"))),
                rows=tuple(
                    (model.name, str(model.n_several_judged), str(model.n_several_judged_queries),
                     *(_few_queries(fmt(model.metrics[name], signed=name.endswith(GAP)), model.n_several_judged_queries)
                       if name in model.metrics else "-"
                       for m in CEILING_METRICS
                       for name in (f"{AGAINST_HUMANS}{m}", f"{HUMANS}{m}", f"{AGAINST_HUMANS}{m}{GAP}")))
                    for model in models
                ),
            ),
        ]
    blocks += [
        Block("h3", "Per label: one-vs-rest κ (the label or not)"),
        Block(
            "table",
            header=("label", "gold pairs", *(model.name for model in models), *(("judges (ceiling)",) if ceiling else ())),
            rows=tuple(
                (label, str(int(majority.confusion[i].sum())), *(fmt(model.metrics["class_kappa"], i) for model in models),
                 *((_few_queries(fmt(result.humans[f"{HUMANS}class_kappa"], i), queries),) if ceiling else ()))
                for i, label in enumerate(result.labels)
            ),
        ),
    ]
    if ceiling and (queries < FEW_QUERIES or any(model.n_several_judged_queries < FEW_QUERIES for model in models)):
        blocks.append(Block("p", FEW_QUERIES_NOTE))
    return blocks


def _comparison_blocks(
    comparisons: tuple[Comparison, ...], k: int, columns: tuple[str, str], figure: str, caption: str
) -> list[Block]:
    """Verdict lines and the table of paired differences of `comparisons`; `columns` names the
    compared models' columns (the one subtracted first)."""
    before, after = columns
    blocks = [
        Block("ul", rows=tuple((c.verdict,) for c in comparisons)),
        Block(
            "table",
            header=(before, after, "common pairs", "queries", "macro_f1 difference", "accuracy difference",
                    f"ndcg@{k} difference", f"McNemar: only {before} right / only {after} right", "McNemar p"),
            rows=tuple(
                (c.baseline, c.other, str(c.n_pairs), str(c.n_queries),
                 *(_few_queries(fmt(c.metrics[f"{metric}_difference"], signed=True), c.n_queries) for metric in DIFFERENCES),
                 f"{c.mcnemar.only_a} / {c.mcnemar.only_b}", f"{c.mcnemar.p_value:.3g} ({c.mcnemar.method})")
                for c in comparisons
            ),
        ),
    ]
    nodes = tuple(dict.fromkeys(node for c in comparisons for node in c.node_names))
    if nodes:
        blocks += [
            Block("p", f"Paired differences of reasoning-node accuracy ({after} - {before}; a fall is reasoning the later model "
                       "lost), on the nodes both models write:"),
            Block("table", header=(before, after, *nodes), rows=tuple(
                (c.baseline, c.other, *(_few_queries(fmt(c.metrics["node_accuracy_difference"], c.node_names.index(node), signed=True),
                                                     c.n_queries) if node in c.node_names else "-" for node in nodes))
                for c in comparisons)),
        ]
    if any(c.n_queries < FEW_QUERIES for c in comparisons):
        blocks.append(Block("p", FEW_QUERIES_NOTE))
    return blocks + [Block("figure", figure, header=(caption,))]


def report_blocks(result: EvaluationResult, provenance: Provenance) -> list[Block]:
    """The whole report as blocks (rendered by `render_markdown` and `render_html`)."""
    gold = result.gold
    level = f"{result.level:.0%}"
    majority = result.majority
    lineage = " -> ".join(result.lineage) if len(result.lineage) > 1 else "none (fewer than two models besides the baseline)"
    node_names = tuple(dict.fromkeys(n for model in result.models for n in model.node_names))
    blocks = [
        Block("toc"),
        Block("h2", "Setup"),
        Block("p", (
            f"Label set {result.label_set} ({', '.join(result.labels)}; relevant: {', '.join(result.relevant)}). "
            f"Gold: {gold.n_pairs} pairs from {gold.n_judgments} judgments by {', '.join(gold.annotators)}; "
            f"{gold.n_pairs_with_several_judgments} pairs have several judgments (majority vote, ties to the "
            f"lower-gain label: {gold.n_ties} ties). Intervals: {level} percentile intervals of {result.n_bootstrap} "
            f"bootstrap replicates resampling queries (seed {result.seed}). Baseline: {result.baseline} (every other "
            f"model is compared with it); lineage: {lineage} (each stage is compared with the one before it)."
        )),
        Block("ul", rows=tuple((f"{name}: {path}",) for name, path in result.sources.items())),
        Block("h2", "Models side by side"),
        Block(
            "table",
            header=("metric", *(model.name for model in result.models), majority.name),
            rows=tuple(
                (_metric_name(name, result.k), *(fmt(model.metrics[name]) for model in (*result.models, majority)))
                for name in SUMMARY
            ) + tuple(
                (f"node accuracy: {_node_label(node, result)}", *(_node_accuracy(model, node) for model in result.models), "-")
                for node in node_names
            ),
        ),
        Block("p", (
            f"{majority.name}: the most frequent gold label predicted for every gold pair, with the gold label shares "
            "as its probabilities; the floor a model has to clear. It is fitted on the evaluated gold pairs themselves, "
            "so it is a slightly optimistic floor." + (f" {NOT_APPLICABLE_NOTE}" if node_names else "")
        )),
        Block("figure", "class_f1", header=("per-label F1 with intervals",)),
        Block("figure", "reliability", header=("reliability diagram",)),
    ]
    if result.comparisons:
        blocks += [
            Block("h2", f"Comparisons against the baseline {result.baseline}"),
            *_comparison_blocks(result.comparisons, result.k, ("baseline", "model"), "forest",
                                "differences against the baseline"),
        ]
    if result.lineage_comparisons:
        blocks += [
            Block("h2", f"Lineage: {lineage}"),
            Block("p", "Each stage against the stage before it, on the pairs both cover (paired query bootstrap)."),
            *_comparison_blocks(result.lineage_comparisons, result.k, ("stage before", "stage"), "lineage_forest",
                                "differences between consecutive stages"),
        ]
    blocks += _agreement_blocks(result)
    for index, model in enumerate(result.models):
        blocks += _model_blocks(model, index, result)
    blocks += [
        Block("h2", "Methods"),
        Block("ul", rows=(
            ("Pairs are keyed by (query_id, product_id). Accuracy, F1, AUCs, NDCG and ECE use covered pairs; "
             "coverage and coverage_adjusted_accuracy use every gold pair.",),
            ("Macro-F1 averages the labels present in gold or predictions.",),
            (f"Binary view: relevant = {', '.join(result.relevant)}; ROC-AUC and PR-AUC (average precision) "
             "score pairs by the predicted probability of the relevant labels.",),
            (f"NDCG@{result.k}: each query's covered pairs ranked by predicted expected_gain, linear label gains, "
             "tied scores share their ranks' average discount; queries whose gold gains are all 0 are left out.",),
            (f"ECE: confidence of the predicted label, {ECE_BINS} equal-width bins.",),
            ("Agreement: Cohen's κ as statsmodels' cohens_kappa (weights over label positions), Krippendorff's α as the "
             "krippendorff package; the judges' ceiling from the coincidence matrix of pairs with several judgments "
             "(pooled marginals: Fleiss' κ when every pair has as many judgments). See evaluation/agreement.py.",),
            ("Intervals resample queries, not pairs; comparisons resample the same queries for both models "
             "(paired bootstrap on the pairs both models cover).",),
            (f"McNemar on accuracy: exact binomial below {MCNEMAR_EXACT_BELOW} discordant pairs, else chi-square with "
             "continuity correction; it treats pairs as independent, so trust the paired bootstrap first.",),
            *((f"{name}: {doc}",) for name, doc in METRICS.items()),
        )),
        Block("footer", provenance.line()),
    ]
    return blocks


# ---------------------------------------------------------------- rendering


def section_anchors(blocks: list[Block]) -> list[tuple[str, str]]:
    """(title, anchor) of every 'h2' block, the anchor slugged as GitHub slugs headings (lower case,
    punctuation dropped, each space a hyphen; a repeated slug gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    anchors = []
    for block in blocks:
        if block.kind == "h2":
            slug = re.sub(r"[^\w\- ]", "", block.text.lower()).replace(" ", "-")
            repeat = seen.get(slug, 0)
            seen[slug] = repeat + 1
            anchors.append((block.text, f"{slug}-{repeat}" if repeat else slug))
    return anchors


def render_markdown(blocks: list[Block], image_paths: dict[str, str], title: str) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    anchors = section_anchors(blocks)
    lines = [f"# {title}", ""]
    for block in blocks:
        if block.kind in ("h2", "h3"):
            lines += [f"{'#' * int(block.kind[1])} {block.text}", ""]
        elif block.kind == "p":
            lines += [block.text, ""]
        elif block.kind == "ul":
            lines += [f"- {row[0]}" for row in block.rows] + [""]
        elif block.kind == "toc":
            lines += ["Contents:", ""] + [f"- [{text}](#{anchor})" for text, anchor in anchors] + [""]
        elif block.kind == "table":
            lines.append("| " + " | ".join(cell(h) for h in block.header) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in block.rows]
            lines.append("")
        elif block.kind == "figure" and block.text in image_paths:
            lines += [f"![{block.header[0]}]({image_paths[block.text]})", ""]
        elif block.kind == "footer":
            lines += ["---", "", block.text, ""]
    return "\n".join(lines)


STYLE_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.2em}th,td{border:1px solid #ccc;padding:3px 8px;"
    "text-align:right;font-variant-numeric:tabular-nums}th:first-child,td:first-child{text-align:left}"
    "th{background:#f3f3f3}figure{margin:0.5em 0 1.5em}figcaption{color:#555;font-size:0.9em}"
    "nav{background:#f7f7f7;padding:0.5em 1em;margin-bottom:1.5em}"
    "footer{border-top:1px solid #ccc;margin-top:2em;padding-top:0.5em;color:#555;font-size:0.85em}"
)


def render_html(blocks: list[Block], images: dict[str, bytes], title: str) -> str:
    escape = html.escape
    anchors = section_anchors(blocks)
    next_anchor = iter(anchor for _, anchor in anchors)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{STYLE_CSS}</style></head><body><h1>{escape(title)}</h1>"]
    for block in blocks:
        if block.kind == "h2":
            parts.append(f"<h2 id='{escape(next(next_anchor))}'>{escape(block.text)}</h2>")
        elif block.kind in ("h3", "p"):
            parts.append(f"<{block.kind}>{escape(block.text)}</{block.kind}>")
        elif block.kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{escape(row[0])}</li>" for row in block.rows) + "</ul>")
        elif block.kind == "toc":
            links = "".join(f"<li><a href='#{escape(anchor)}'>{escape(text)}</a></li>" for text, anchor in anchors)
            parts.append(f"<nav><strong>Contents</strong><ul>{links}</ul></nav>")
        elif block.kind == "table":
            head = "".join(f"<th>{escape(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif block.kind == "figure" and block.text in images:
            data = base64.b64encode(images[block.text]).decode("ascii")
            parts.append(f"<figure><img alt='{escape(block.header[0])}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{escape(block.header[0])}</figcaption></figure>")
        elif block.kind == "footer":
            parts.append(f"<footer>{escape(block.text)}</footer>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(
    result: EvaluationResult, out: Path, title: str = "Relevance evaluation", provenance: Provenance | None = None
) -> dict[str, Path]:
    """Write report.md (+ plots/*.png), report.html (images inline) and metrics.json under `out`;
    `provenance` defaults to this process's command line, now."""
    out = Path(out)
    provenance = provenance or Provenance.now()
    (out / "plots").mkdir(parents=True, exist_ok=True)
    images = figures(result)
    image_paths = {}
    for stem, png in images.items():
        (out / "plots" / f"{stem}.png").write_bytes(png)
        image_paths[stem] = f"plots/{stem}.png"
    blocks = report_blocks(result, provenance)
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "metrics.json"}
    paths["markdown"].write_text(render_markdown(blocks, image_paths, title), encoding="utf-8")
    paths["html"].write_text(render_html(blocks, images, title), encoding="utf-8")
    document = {**to_jsonable(result), "provenance": to_jsonable(provenance)}
    paths["json"].write_text(json.dumps(document, indent=2, allow_nan=False), encoding="utf-8")
    return paths
