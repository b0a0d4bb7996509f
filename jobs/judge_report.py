"""`relevance judge-report`: can a search team trust these labels? Label agreement, the ranker ladder, offline vs online.

    relevance judge-report --world world --source sft_policy=models/sft_policy --source combined=judges/relevance

Label sources: `human` (the world's judgments: every non-weak annotator but gold), `gold` (GOLD_NODES) and every
relevance table of `sources` (a trained policy, the student, a multi-judge combination).

1. Agreement: Cohen's kappa (statsmodels; its interval treats pairs as independent) of each source's labels with
   the human labels and with gold, on the pairs both label.
2. The ranker ladder (`jobs.world.ladder`): rungs of graded quality and rungs blind to attributes, ranked under each
   source by NDCG@k; Kendall tau (scipy) of each source's order with the gold labels' order, over every rung and over
   gold's better half (where the LLM-assessor literature finds agreement weakest), whether the source picks gold's
   winner, and how many neighbouring rungs of gold's order its labels tell apart; whether gold recovers the
   construction order of the graded rungs is reported too. The ladder's queries are those every source labels, so every source judges
   the same lists; the ladder is written to OUT/ranked_lists for `relevance rankers`.
3. Offline vs online: for the world's A/B experiment and every experiment folder of `experiments` (by default
   WORLD/experiments/*, which `relevance generate --set experiment_series=[...]` writes), the offline NDCG difference
   treatment - control on the logged lists under each source (`evaluation.rankers`, query-bootstrap CI) beside the
   online CTR and orders-per-user effects of `relevance abtest` (its report is written to OUT/abtest/<experiment>);
   across experiments, per source, the Pearson and Spearman correlation and the share of experiments where the
   offline and online effects have the same sign.
Writes judge_report.json and judge_report.html (plots inline).
"""

from __future__ import annotations

import html
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.inter_rater import cohens_kappa

from evaluation.inputs import read_input
from evaluation.rankers import PAIR, UNJUDGED_POLICIES, LabelSource, RankerEvaluation, RankerInputError, evaluate_rankers, lists_from_ranked
from jobs.pages import page, table
from jobs.rankers import interval_text, png_html, read_labels, read_logged_lists
from jobs.report_index import judge_verdict
from jobs.world.generate import EXPERIMENT_MANIFEST, MANIFEST
from jobs.world.ladder import GAIN, SUBJECT, LadderConfig, make_ladder, ranker_name, subject_gains
from jobs.world.run import SERIES_FOLDER
from schemas.config import ConfigError, help_field
from schemas.graph import LabelSet, ReasoningGraph
from schemas.provenance import Provenance
from schemas.storage import write_table
from schemas.tables import GOLD_NODES, RANKED_LISTS

log = logging.getLogger(__name__)

JUDGE_PAGE = "judge_report.html"
JUDGE_JSON = "judge_report.json"
HUMAN, GOLD = "human", "gold"
ONLINE_METRICS = ("ctr", "orders_per_user")


@dataclass(frozen=True)
class JudgeReportConfig:
    """Config of `relevance judge-report`."""

    world: str = help_field("World folder: judgments, gold_nodes, world.json and the logs of its A/B experiment.", "world")
    sources: dict[str, str] = help_field("Label source name -> relevance table (a model's, the student's, a multi-judge table).", {})
    experiments: tuple[str, ...] = help_field(
        "More experiment folders (logs + experiment.json); empty: every WORLD/experiments/*/ that holds one.", ())
    ladder: LadderConfig = help_field("The ranker ladder: noise levels, query sample, k, seed.", LadderConfig())
    k: int = help_field("Rank cutoff of NDCG@k on the logged lists.", 10)
    unjudged: str = help_field("Unjudged products in the first k: zero or condense (evaluation/rankers.py).", "zero",
                               choices=UNJUDGED_POLICIES)
    n_bootstrap: int = help_field("Query-bootstrap replicates of the offline intervals.", 300)
    seed: int = help_field("Bootstrap seed.", 0)
    out: str = help_field("Folder for judge_report.html, judge_report.json, ranked_lists/ and abtest/.", "judge_report")

    def __post_init__(self) -> None:
        clash = sorted({HUMAN, GOLD} & set(self.sources))
        if clash:
            raise ConfigError(f"sources: {clash} are the built-in sources' names; name the relevance tables otherwise")
        if self.unjudged not in UNJUDGED_POLICIES:
            raise ConfigError(f"unjudged: {self.unjudged!r} unknown; use one of {list(UNJUDGED_POLICIES)}")
        if self.k < 1 or self.n_bootstrap < 1:
            raise ConfigError(f"k and n_bootstrap must be >= 1, got {self.k} and {self.n_bootstrap}")


@dataclass(frozen=True)
class ExperimentRow:
    """One experiment: the online effects (metric -> abtest row as a dict) and, per source, the offline difference."""

    experiment_id: str
    control_noise: float | None
    treatment_noise: float | None
    online: dict[str, dict]
    offline: dict[str, RankerEvaluation | str] = field(default_factory=dict)  # a str: why the source has no evaluation


def kappa(source: LabelSource, reference: LabelSource, labels: list[str]) -> dict:
    """Cohen's kappa of `source`'s labels against `reference`'s on the pairs both label."""
    both = source.pairs[[*PAIR, "label"]].merge(reference.pairs[[*PAIR, "label"]], on=PAIR, suffixes=("", "_reference"))
    if both.empty:
        return {"pairs": 0, "kappa": None, "low": None, "high": None}
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)))
    np.add.at(counts, (both["label"].map(index).to_numpy(), both["label_reference"].map(index).to_numpy()), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # perfect agreement: a zero variance, no interval (None below)
        result = cohens_kappa(counts)

    def finite(value: float) -> float | None:
        return float(value) if np.isfinite(value) else None

    return {"pairs": len(both), "kappa": finite(result.kappa), "low": finite(result.kappa_low), "high": finite(result.kappa_upp)}


def kendall(reference_order: list[str], estimates: dict[str, float]) -> float | None:
    """Kendall tau-b between a reference order (best first) and the estimates (higher is better)."""
    reference = -np.arange(len(reference_order), dtype=float)
    tau = stats.kendalltau(reference, [estimates[name] for name in reference_order]).statistic
    return None if np.isnan(tau) else float(tau)


def told_apart(evaluation: RankerEvaluation, gold_order: list[str]) -> int:
    """Neighbouring rungs of the gold order whose NDCG difference under this source has an interval that excludes 0
    on gold's side: how many close calls the source's labels can resolve on this many queries."""
    position = {rung: index for index, rung in enumerate(evaluation.estimates())}
    count = 0
    for better, worse in zip(gold_order, gold_order[1:]):
        if position[better] < position[worse]:
            interval = evaluation.difference(better, worse)
            count += interval.high < 0
        else:
            interval = evaluation.difference(worse, better)
            count += interval.low > 0
    return int(count)


def ladder_queries(sources: dict[str, LabelSource], gold: LabelSource) -> np.ndarray:
    """The gold-labelled queries that every source labels some pair of."""
    queries = set(gold.pairs["query_id"])
    for source in sources.values():
        queries &= set(source.pairs["query_id"])
    return np.array(sorted(queries))


def evaluate_or_reason(lists: pd.DataFrame, source: LabelSource, config: JudgeReportConfig, k: int, rankers: list[str]
                       ) -> RankerEvaluation | str:
    """The source's evaluation of the lists, or why it has none (it labels none of their queries, say): one source
    that cannot judge some lists leaves the others' report whole, saying so."""
    try:
        return evaluate_rankers(lists, source, k, config.unjudged, config.n_bootstrap, config.seed, rankers=rankers)
    except RankerInputError as error:
        return str(error)


def judge_ladder(sources: dict[str, LabelSource], gold: LabelSource, subject: pd.DataFrame, config: JudgeReportConfig, out: Path
                 ) -> dict:
    """`subject`: query_id, product_id, subject_gain of the judged pairs (`jobs.world.ladder.subject_gains`)."""
    queries = ladder_queries(sources, gold)
    common = len(queries) > 0
    if not common:  # no query labelled by every source: rank gold's, and sources judge what they label of them
        queries = np.array(sorted(set(gold.pairs["query_id"])))
    pairs = gold.pairs[gold.pairs["query_id"].isin(queries)][[*PAIR, "gain"]].merge(subject, on=PAIR, how="left", validate="one_to_one")
    ranked = make_ladder(pairs, config.ladder)
    write_table(RANKED_LISTS, ranked, out)
    lists = lists_from_ranked(ranked.to_pandas())
    rungs = config.ladder.rankers
    ndcg = {name: evaluate_or_reason(lists, source, config, config.ladder.k, rungs) for name, source in sources.items()}
    gold_order = sorted(rungs, key=lambda rung: -ndcg[GOLD].estimates()[rung])
    better_half = gold_order[: len(rungs) // 2]
    result = {"queries": int(lists["query_id"].nunique()), "common_queries": common, "rankers": rungs,
              "noise_levels": sorted(config.ladder.noise_levels), "subject_noise_levels": sorted(config.ladder.subject_noise_levels),
              "gold_order": gold_order,
              "gold_recovers_construction_order": [rung for rung in gold_order if rung in config.ladder.graded] == config.ladder.graded,
              "sources": {}}
    for name, evaluation in ndcg.items():
        if isinstance(evaluation, str):
            result["sources"][name] = {"ndcg": None, "coverage": None, "queries_compared": 0, "tau": None, "tau_top_half": None,
                                       "order": None, "same_winner_as_gold": None, "neighbours_told_apart": None, "note": evaluation}
            continue
        estimates = evaluation.estimates()
        order = sorted(rungs, key=lambda rung: -estimates[rung])
        result["sources"][name] = {
            "ndcg": estimates, "coverage": min(s.coverage for s in evaluation.rankers), "queries_compared": evaluation.queries_compared,
            "tau": kendall(gold_order, estimates), "tau_top_half": kendall(better_half, estimates), "order": order,
            "same_winner_as_gold": order[0] == gold_order[0],
            "neighbours_told_apart": told_apart(evaluation, gold_order), "note": "",
        }
    return result


def experiment_folders(config: JudgeReportConfig) -> list[tuple[Path, Path]]:
    """(folder, manifest) of the world's experiment and of every further experiment."""
    world = Path(config.world)
    folders = [Path(folder) for folder in config.experiments] or sorted(
        path.parent for path in (world / SERIES_FOLDER).glob(f"*/{EXPERIMENT_MANIFEST}"))
    found = [(world, world / MANIFEST)]
    for folder in folders:
        manifest = folder / EXPERIMENT_MANIFEST
        if not manifest.is_file():
            raise ConfigError(f"experiments: {folder} holds no {EXPERIMENT_MANIFEST}")
        found.append((folder, manifest))
    return found


def online_effects(manifest: Path, out: Path) -> tuple[dict, dict[str, dict]]:
    """Run `relevance abtest` on the experiment; returns its manifest's experiment block and the all-users rows of
    ONLINE_METRICS (treatment vs control)."""
    from abtest.run import config_from_manifest
    from abtest.run import run as abtest

    experiment = json.loads(manifest.read_text())
    result = abtest(config_from_manifest(manifest, out=out / experiment["experiment"]["experiment_id"]))
    rows = result.to_dict()["metrics"]
    online = {row["metric"]: row for row in rows if row["metric"] in ONLINE_METRICS and row["slice_kind"] == "all"}
    return experiment, online


def judge_experiments(sources: dict[str, LabelSource], config: JudgeReportConfig, out: Path) -> list[ExperimentRow]:
    rows = []
    for folder, manifest in experiment_folders(config):
        experiment, online = online_effects(manifest, out / "abtest")
        block, settings = experiment["experiment"], experiment.get("config", {}).get("experiment", {})
        lists, _ = read_logged_lists(folder, block["experiment_id"])
        control, treatment = block["control"], next(v for v in block["variants"] if v != block["control"])
        row = ExperimentRow(block["experiment_id"], settings.get("control_noise"), settings.get("treatment_noise"), online)
        for name, source in sources.items():
            row.offline[name] = evaluate_or_reason(lists, source, config, config.k, [control, treatment])
        rows.append(row)
    return rows


def offline_delta(evaluation: RankerEvaluation | str) -> dict:
    """treatment - control NDCG@k with its interval and coverage; None values and the reason when there is none."""
    if isinstance(evaluation, str):
        return {"estimate": None, "low": None, "high": None, "coverage": None, "queries_compared": 0, "note": evaluation}
    control, treatment = (s.ranker for s in evaluation.rankers)
    interval = evaluation.difference(control, treatment, "ndcg")
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high,
            "coverage": {s.ranker: s.coverage for s in evaluation.rankers}, "queries_compared": evaluation.queries_compared}


def agreement_across(rows: list[ExperimentRow], sources: list[str]) -> dict:
    """Per source and online metric: Pearson and Spearman correlation of offline and online effects, sign agreement."""
    result = {}
    for name in sources:
        judged = [row for row in rows if not isinstance(row.offline[name], str)]
        offline = np.array([offline_delta(row.offline[name])["estimate"] for row in judged], float)
        result[name] = {}
        for metric in ONLINE_METRICS:
            online = np.array([row.online[metric]["effect"] for row in judged], float)
            enough = len(judged) >= 3 and np.std(offline) > 0 and np.std(online) > 0
            result[name][metric] = {
                "experiments": len(judged),
                "pearson": float(stats.pearsonr(offline, online).statistic) if enough else None,
                "spearman": float(stats.spearmanr(offline, online).statistic) if enough else None,
                "sign_agreement": int((np.sign(offline) == np.sign(online)).sum()),
            }
    return result


def _ladder_plot(ladder: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, source in ladder["sources"].items():
        if source["ndcg"] is None:
            continue
        line = axis.plot(ladder["noise_levels"], [source["ndcg"][ranker_name(level, GAIN)] for level in ladder["noise_levels"]], marker="o",
                         label=name)
        subject = ladder["subject_noise_levels"]
        if subject:
            axis.plot(subject, [source["ndcg"][ranker_name(level, SUBJECT)] for level in subject], marker="x", linestyle="none",
                      markersize=9, color=line[0].get_color())
    axis.set_xlabel("rung's ranking noise (o: gold gain + noise, smaller is better; x: subject gain + noise)")
    axis.set_ylabel("NDCG@k under the label source")
    axis.legend(fontsize=8)
    return figure


def _offline_online_plot(rows: list[ExperimentRow], sources: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(ONLINE_METRICS), figsize=(11, 4))
    for axis, metric in zip(axes, ONLINE_METRICS):
        online = [row.online[metric] for row in rows]
        for name in sources:
            judged = [(offline_delta(row.offline[name]), effect) for row, effect in zip(rows, online) if not isinstance(row.offline[name], str)]
            if not judged:
                continue
            deltas, effects = zip(*judged)
            axis.errorbar([d["estimate"] for d in deltas], [o["effect"] for o in effects],
                          xerr=[[d["estimate"] - d["low"] for d in deltas], [d["high"] - d["estimate"] for d in deltas]],
                          yerr=[[o["effect"] - o["effect_ci_low"] for o in effects], [o["effect_ci_high"] - o["effect"] for o in effects]],
                          fmt="o", capsize=2, label=name, alpha=0.8)
        axis.axhline(0, color="grey", lw=0.5)
        axis.axvline(0, color="grey", lw=0.5)
        axis.tick_params(axis="x", labelrotation=30)
        axis.set_xlabel("offline NDCG@k difference (treatment - control)")
        axis.set_ylabel(f"online {metric} effect (treatment - control)")
    axes[0].legend(fontsize=8)
    return figure


def _number(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _yes_no(value: bool | None) -> str:
    return "–" if value is None else "yes" if value else "no"


def _html(report: dict, rows: list[ExperimentRow], sources: list[str], provenance: Provenance) -> str:
    ladder, agreement = report["ladder"], report["agreement"]
    unjudged = "; ".join(f"{name}: {entry['note']}" for name, entry in ladder["sources"].items() if entry["note"])
    body = [f"<p class='meta'>{html.escape(provenance.line())}</p>",
            f"<p>{html.escape(judge_verdict(report))}</p>",
            "<h2>1. Label agreement (Cohen's kappa)</h2>",
            "<p>Kappa of each source's labels with the human labels and with gold, on the pairs both label (the interval "
            "treats pairs as independent). LLM-assessor studies report 0.3-0.64 against human labels.</p>",
            table(["source", "pairs labelled", "kappa vs human [CI] (pairs)", "kappa vs gold [CI] (pairs)"],
                  [[name, entry["pairs"], *(f"{_number(k['kappa'])} [{_number(k['low'])}, {_number(k['high'])}] ({k['pairs']})"
                                           for k in (entry["vs_human"], entry["vs_gold"]))] for name, entry in agreement.items()]),
            "<h2>2. The ranker ladder: do the labels pick the same ranker?</h2>",
            f"<p>{len(ladder['rankers'])} rungs on {ladder['queries']} queries "
            f"{'that every source labels' if ladder['common_queries'] else 'with gold labels (no query is labelled by every source)'}. The noise_* rungs rank by gold gain + "
            "noise of the given std (construction order: smaller noise first); the subject_* rungs by the product type alone "
            "(attributes ignored) + noise: a blind spot that a judge lenient on attributes rewards. Gold orders the noise rungs "
            f"{'as constructed' if ladder['gold_recovers_construction_order'] else 'otherwise than constructed'}; its order: "
            f"{', '.join(ladder['gold_order'])}. "
            "Kendall tau of each source's NDCG@k order with the gold order, over every rung and over gold's better half; the "
            "literature reports 0.84-0.89 between LLM- and human-label system rankings, weaker among the top systems. "
            "Neighbours told apart: neighbouring rungs of the gold order whose NDCG difference under the source has a "
            "bootstrap interval excluding 0 on gold's side (how many close calls the labels resolve).</p>",
            table(["source", "Kendall tau (all rungs)", "Kendall tau (better half)", "same winner as gold",
                   f"neighbours told apart (of {len(ladder['rankers']) - 1})", "lowest coverage@k",
                   *(f"NDCG@k {rung}" for rung in ladder["rankers"])],
                  [[name, _number(s["tau"]), _number(s["tau_top_half"]), _yes_no(s["same_winner_as_gold"]), _number(s["neighbours_told_apart"], "d"),
                    _number(s["coverage"], ".1%"), *(_number((s["ndcg"] or {}).get(r), ".4f") for r in ladder["rankers"])]
                   for name, s in ladder["sources"].items()]),
            *([f"<p>Not judged on the ladder: {html.escape(unjudged)}</p>"] if unjudged else []),
            png_html(_ladder_plot(ladder), "NDCG per rung and label source"),
            "<h2>3. Offline vs online</h2>",
            "<p>Per experiment: the offline NDCG@k difference on the logged lists of each variant (treatment - control, "
            "query-bootstrap CI) under each source, beside the online effects of the A/B analysis (CUPED, Welch CI).</p>"]
    header = ["experiment", "noise control / treatment", *(f"online {m} effect [CI]" for m in ONLINE_METRICS),
              *(f"ΔNDCG {name} [CI] (coverage c/t)" for name in sources)]
    table_rows = []
    for row in rows:
        online = [f"{o['effect']:+.4g} [{o['effect_ci_low']:+.4g}, {o['effect_ci_high']:+.4g}]"
                  + (" *" if o.get("significant") else "") for o in (row.online[m] for m in ONLINE_METRICS)]
        offline = []
        for name in sources:
            evaluation = row.offline[name]
            if isinstance(evaluation, str):
                offline.append(f"not judged: {evaluation}")
                continue
            delta = evaluation.difference(*(s.ranker for s in evaluation.rankers), "ndcg")
            coverage = "/".join(f"{s.coverage:.0%}" for s in evaluation.rankers)
            offline.append(f"{interval_text(delta, signed=True)} ({coverage})")
        table_rows.append([row.experiment_id, f"{_number(row.control_noise, 'g')} / {_number(row.treatment_noise, 'g')}", *online, *offline])
    body += [table(header, table_rows), "<p>* significant after the A/B analysis' correction.</p>",
             "<h3>Across experiments</h3>",
             table(["source", *(f"{m}: Pearson / Spearman / same sign" for m in ONLINE_METRICS)],
                   [[name, *(f"{_number(a[m]['pearson'], '.2f')} / {_number(a[m]['spearman'], '.2f')} / {a[m]['sign_agreement']} of "
                             f"{a[m]['experiments']}" for m in ONLINE_METRICS)]
                    for name, a in report["offline_online"]["across"].items()]),
             png_html(_offline_online_plot(rows, sources), "offline vs online effects")]
    return page("Can a search team trust these labels?", body)


def run(config: JudgeReportConfig) -> dict:
    world, out = Path(config.world), Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((world / MANIFEST).read_text())
    label_set, graph = LabelSet.load(manifest["label_set"]), ReasoningGraph.load(manifest["graph"])
    sources = {HUMAN: read_labels("judgments", world, label_set, graph, HUMAN), GOLD: read_labels("gold", world, label_set, graph, GOLD)}
    for name, path in config.sources.items():
        sources[name] = read_labels("relevance", path, label_set, graph, name)
    names = list(sources)
    log.info(f"label sources: {', '.join(f'{name} ({len(source.pairs)} pairs)' for name, source in sources.items())}")
    agreement = {name: {"pairs": len(source.pairs), "left_out": source.left_out,
                        "vs_human": kappa(source, sources[HUMAN], label_set.names), "vs_gold": kappa(source, sources[GOLD], label_set.names)}
                 for name, source in sources.items()}
    gold_nodes = read_input(GOLD_NODES, world, ["query_id", "product_id", "nodes"])
    ladder = judge_ladder(sources, sources[GOLD], subject_gains(gold_nodes, label_set), config, out)
    log.info(f"ladder of {len(ladder['rankers'])} rungs on {ladder['queries']} queries: "
          + ", ".join(f"{name} tau {_number(s['tau'], '.2f')}" for name, s in ladder["sources"].items()))
    rows = judge_experiments(sources, config, out)
    report = {
        "world": str(world), "label_set": label_set.name, "k": config.k, "unjudged": config.unjudged, "agreement": agreement, "ladder": ladder,
        "offline_online": {
            "experiments": [{"experiment_id": row.experiment_id, "control_noise": row.control_noise, "treatment_noise": row.treatment_noise,
                             "online": row.online, "offline_ndcg_difference": {name: offline_delta(row.offline[name]) for name in names}}
                            for row in rows],
            "across": agreement_across(rows, names),
        },
    }
    provenance = Provenance.now()
    (out / JUDGE_JSON).write_text(json.dumps({**report, "provenance": provenance.line()}, indent=2, default=float) + "\n")
    (out / JUDGE_PAGE).write_text(_html(report, rows, names, provenance))
    log.info(judge_verdict(report))
    log.info(f"reports: {out / JUDGE_PAGE}, {out / JUDGE_JSON}")
    return report


def sources_frame(report: dict) -> pd.DataFrame:
    """One row per label source: kappa vs human and gold, ladder taus, offline-online CTR and orders correlations."""
    rows = []
    for name, agreement in report["agreement"].items():
        ladder, across = report["ladder"]["sources"][name], report["offline_online"]["across"][name]
        rows.append({"source": name, "kappa_vs_human": agreement["vs_human"]["kappa"], "kappa_vs_gold": agreement["vs_gold"]["kappa"],
                     "tau": ladder["tau"], "tau_top_half": ladder["tau_top_half"],
                     **{f"{m}_pearson": across[m]["pearson"] for m in ONLINE_METRICS},
                     **{f"{m}_sign_agreement": f"{across[m]['sign_agreement']}/{across[m]['experiments']}" for m in ONLINE_METRICS}})
    return pd.DataFrame(rows)
