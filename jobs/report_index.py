"""index.html: the page a command that writes reports leaves next to them, one row per report with a
one-line verdict and relative links to its files, and the tool version, command and time that made it.

Each verdict is computed from the JSON its report writes (evaluation/metrics.json, abtest/result.json,
a training run's summary.json, validation.json, churn.json, a night's step reports), so the index
restates no number of its own. A report whose JSON is missing is left out: the index lists what exists.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jobs.pages import MISSING, Html, link, page, table
from schemas.provenance import Provenance
from training.run_folder import METRICS_FILE, start_validation

INDEX_PAGE = "index.html"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Report:
    """One row of an index: what the report is, its verdict in one line, its files (main page first)."""

    title: str
    verdict: str
    files: tuple[Path, ...]


def _number(value: float | None, spec: str = ".3f") -> str:
    return MISSING if value is None else format(value, spec)


def _interval(metric: dict) -> str:
    return f"{_number(metric['estimate'])} ({metric['level']:.0%} CI {_number(metric['low'])}–{_number(metric['high'])})"


def evaluation_verdict(metrics: dict) -> str:
    """The labeller with the best macro-F1 (the synthetic rater counts: it is the bar the models chase)."""
    scored = [model for model in metrics["models"] if model["metrics"]["macro_f1"]["estimate"] is not None]
    if not scored:
        return f"no labeller of {len(metrics['models'])} has a macro-F1"
    best = max(scored, key=lambda model: model["metrics"]["macro_f1"]["estimate"])
    return f"best of {len(metrics['models'])} labellers: {best['name']}, macro-F1 {_interval(best['metrics']['macro_f1'])}"


def _effect(row: dict) -> str:
    if row.get("rel_effect") is not None:
        effect = f"{row['rel_effect']:+.1%}"
    else:
        effect = f"{row['effect']:+.4g}"
    significance = "significant" if row["significant"] else "not significant"
    return f"{row['metric']} {effect} ({significance}, adjusted p {_number(row['pvalue_adjusted'], '.2g')})"


def abtest_verdict(result: dict) -> str:
    """The result's own decisions (ship / no ship / inconclusive per variant, harms first) when it has them; else an
    SRM alarm; else each primary metric's effect."""
    if result.get("decisions"):
        return "; ".join(
            f"{decision['variant']}: {decision['verdict']}"
            + (f" (harmed: {', '.join(decision['harmed'])})" if decision["harmed"] else "")
            + (f" (won: {', '.join(decision['won'])})" if decision["won"] else "")
            for decision in result["decisions"]
        )
    if result["srm"]["alarm"]:
        return f"SRM alarm (p {result['srm']['pvalue']:.2g}): the split of users is off, no effect is trustworthy"
    primary = [row for row in result["metrics"] if row["tier"] == "primary" and row["slice_kind"] == "all"]
    if not primary:
        return "no primary metric"
    by_variant: dict[str, list[str]] = {}
    for row in primary:
        by_variant.setdefault(f"{row['variant']} vs {row['control_variant']}", []).append(_effect(row))
    return "; ".join(f"{pair}: {', '.join(effects)}" for pair, effects in by_variant.items())


def training_verdict(summary: dict, start_macro_f1: float | None = None) -> str:
    """Steps run and the validation split's label macro-F1, from the run's start when it validated there (an RL run
    from a policy: the change is what the run did), and the majority baseline's when reported."""
    parts = [f"{summary['steps']} steps"]
    validation = summary.get("val") or {}
    if "label_macro_f1" in validation:
        end = validation["label_macro_f1"]
        parts.append(f"validation macro-F1 {end:.3f}" if start_macro_f1 is None else
                     f"validation macro-F1 {start_macro_f1:.3f} at its start -> {end:.3f} ({end - start_macro_f1:+.3f})")
    majority = summary.get("val_majority") or {}
    if "label_macro_f1" in majority:
        parts.append(f"majority-label baseline {majority['label_macro_f1']:.3f}")
    return ", ".join(parts)


def expectations_verdict(met: int, expectations: int) -> str:
    return f"{met} of {expectations} expectations met" + ("" if met == expectations else f": {expectations - met} FAILED")


def validation_verdict(summary: dict) -> str:
    """`relevance validate`'s validation.json: expectations met over every table, and rows quarantined."""
    tables = summary["tables"].values()
    met, expectations = (sum(t[key] for t in tables) for key in ("expectations_met", "expectations"))
    rows_in, quarantined = (sum(t[key] for t in tables) for key in ("rows_in", "quarantined"))
    return f"{len(tables)} tables: {expectations_verdict(met, expectations)}; {quarantined} of {rows_in} rows quarantined"


def churn_verdict(churn: dict) -> str:
    """Per model, the share of pairs present both nights whose label changed."""
    if churn["first_night"]:
        return "first night: nothing published earlier to compare with"
    parts = []
    for name, model in churn["models"].items():
        share = model["label_changed"]["share"]
        changed = "no pair in both nights" if share is None else f"label changed on {share:.1%} of {model['pairs_both']} pairs"
        parts.append(f"{name}: {changed}")
    return f"vs ds={churn['previous_ds']}: " + "; ".join(parts)


def _total(counts: dict | int) -> int:
    """The sum of the counts at the leaves of nested {name: ... {name: count}} dicts."""
    return counts if isinstance(counts, int) else sum(_total(inner) for inner in counts.values())


def datasets_verdict(report: dict) -> str:
    """`relevance datasets`' datasets.json: examples written per split (judged and weak alike)."""
    per_split: dict[str, int] = {}
    for examples in (report["examples"], report.get("weak_examples") or {}):
        for split, counts in examples.items():
            per_split[split] = per_split.get(split, 0) + _total(counts)
    order = [split for split in SPLITS if split in per_split] + sorted(set(per_split) - set(SPLITS))
    return f"{report['written']} examples written: " + ", ".join(f"{split} {per_split[split]}" for split in order)


def prepare_verdict(report: dict) -> str:
    """`relevance prepare`'s prepare.json: the day's impressions in and the candidate pairs out."""
    impressions = report["search_impressions"]
    return f"{report['pairs']} candidate pairs from {impressions['rows_in']} search impressions ({impressions['quarantined']} quarantined)"


def score_verdict(report: dict) -> str:
    """`relevance score`'s score.json: what was scored, reused and quarantined, by which model."""
    return (f"{report['candidates']} candidate pairs: {report['scored']} scored, {report['reused']} reused, {report['quarantined']} "
            f"quarantined; {report['model_name']}, model_version {report['model_version']}")


def published_verdict(manifest: dict) -> str:
    """`relevance export`'s manifest.json: rows and models published."""
    models = ", ".join(f"{model['model_name']} ({model['rows']} rows)" for model in manifest["models"])
    return f"{manifest['rows']} rows published (parquet, duckdb, csv): {models}"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def evaluation_report(folder: Path) -> Report | None:
    """`relevance evaluate`'s folder (report.html, report.md, metrics.json as evaluation.report writes them)."""
    metrics = _load(folder / "metrics.json")
    if metrics is None:
        return None
    return Report("Evaluation against the gold labels", evaluation_verdict(metrics),
                  (folder / "report.html", folder / "report.md", folder / "metrics.json"))


def abtest_report(folder: Path) -> Report | None:
    """`relevance abtest`'s folder (report.html, report.md, result.json as abtest.report writes them)."""
    result = _load(folder / "result.json")
    if result is None:
        return None
    return Report(f"A/B analysis: {result['experiment_id']}", abtest_verdict(result),
                  (folder / "report.html", folder / "report.md", folder / "result.json"))


def judge_verdict(report: dict) -> str:
    """Per label source: the ranker ladder's Kendall tau with the true order (all rungs / better half) and how the offline
    NDCG differences track the online CTR effects across the experiments (Pearson r, experiments with the same sign)."""
    parts = []
    for name, ladder in report["ladder"]["sources"].items():
        across = report["offline_online"]["across"][name]["ctr"]
        parts.append(f"{name} tau {_number(ladder['tau'], '.2f')}/{_number(ladder['tau_top_half'], '.2f')}, "
                     f"CTR r {_number(across['pearson'], '.2f')}, same sign {across['sign_agreement']}/{across['experiments']}")
    return "ladder tau (all/better half), offline vs online: " + "; ".join(parts)


def judge_report(folder: Path) -> Report | None:
    """`relevance judge-report`'s folder (judge_report.html, judge_report.json)."""
    report = _load(folder / "judge_report.json")
    if report is None:
        return None
    return Report("Can a search team trust these labels? Agreement, ranker ladder, offline vs online", judge_verdict(report),
                  (folder / "judge_report.html", folder / "judge_report.json"))


def training_report(title: str, run_dir: Path) -> Report | None:
    """A training run folder: summary.json, metrics.jsonl and whatever plots or pages it holds."""
    summary = _load(run_dir / "summary.json")
    if summary is None:
        return None
    extras = sorted(path for pattern in ("*.html", "*.png") for path in run_dir.glob(pattern))
    start = start_validation(run_dir / METRICS_FILE) or {}
    return Report(title, training_verdict(summary, start.get("label_macro_f1")), (*extras, run_dir / "summary.json", run_dir / METRICS_FILE))


def validation_report(folder: Path, validation_page: str) -> Report | None:
    """`relevance validate`'s folder: validation.json and its page."""
    summary = _load(folder / "validation.json")
    if summary is None:
        return None
    return Report("Input validation (great-expectations and quarantine)", validation_verdict(summary),
                  (folder / validation_page, folder / "validation.json"))


def index_page(title: str, reports: Sequence[Report], folder: Path, provenance: Provenance) -> str:
    """The page for `folder`: links relative to it, only to files that exist."""
    rows = []
    for report in reports:
        files = [link(Path(os.path.relpath(path, folder)).as_posix(), path.name) for path in report.files if path.is_file()]
        rows.append([report.title, report.verdict, Html(" ".join(files)) if files else MISSING])
    meta = f"<p class='meta'>{html.escape(provenance.line())}</p>"
    return page(title, [meta, table(["report", "verdict", "files"], rows)])


def write_index(folder: Path, title: str, reports: Sequence[Report]) -> Path:
    """Write `folder`/index.html for this process's command, now; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / INDEX_PAGE
    target.write_text(index_page(title, reports, folder, Provenance.now()))
    return target
