"""`relevance judges combine`: several judges of the same pairs (models, prompts or checkpoints, each a
RELEVANCE table) combined into one relevance table, with how well each judge agrees with the
combination, with the other judges and with human judgments.

Method
- The judges must have judged the same (query_id, product_id) pairs, of the same product text where
  the tables carry `product_content_hash`. A pair some judge lacks is an error naming the judge, the
  count and examples; with `pairs="common"` the pairs every judge has are combined and each judge's
  left-out pairs are counted in the report, never dropped silently. A pair judged on different
  product texts is always an error (the judges did not judge the same thing).
- `mean`: the judges' label probabilities averaged; the label is the most probable one.
  `majority`: each judge's label is one vote; the label is the most voted one and the probabilities
  are the vote shares. Ties go to the lower gain, as human votes do (`inputs.majority_labels`).
- The combined rows: expected_gain = probabilities x the label set's gains; node_decisions empty (a
  combination decides no reasoning node); reasoning null; product_content_hash the judges' one;
  scored_at the newest judge's scoring of the pair and ds its day; model_name the configured name and
  model_version `<method>:<judge>+<judge>...`.
- Agreement (`evaluation.agreement`: Cohen's kappa unweighted, linear, quadratic; Krippendorff's alpha
  ordinal and nominal; one-vs-rest kappa) with query-bootstrap intervals (`evaluation.bootstrap`):
  each judge against the combination (which includes it), against the combination of the other judges
  (leave-one-out: the number that singles out a judge the others disagree with), and, given human
  judgments, each judge and the combination against their majority label; the judges among
  themselves: kappa with pooled marginals (Fleiss' kappa) and alpha of every judge's label per pair.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from evaluation import agreement as A
from evaluation import metrics as M
from evaluation.bootstrap import Interval, bootstrap
from evaluation.inputs import (
    JUDGMENT_COLUMNS,
    KEY,
    EvaluationInputError,
    _examples,
    gold_from_judgments,
    judgments_from_gold_nodes,
    predictions_from_table,
    read_input,
)
from evaluation.report import Block, fmt, render_html, render_markdown, to_jsonable
from schemas.config import ConfigError, help_field
from schemas.graph import DEFAULT_GRAPH, LabelSet, ReasoningGraph
from schemas.provenance import Provenance
from schemas.storage import write_table
from schemas.tables import GOLD_NODES, JUDGMENTS, RELEVANCE

METHODS = ("mean", "majority")
TIE_TOLERANCE = 1e-9  # averaged probabilities that differ by float rounding only are a tie
# agreement of each judge against: the combination, the others' combination; the combination and each judge
# against human gold; and the judges among themselves
AGAINST_COMBINATION, AGAINST_OTHERS, AGAINST_GOLD, AMONG_JUDGES = "combination_", "others_", "gold_", "judges_"
PAIRWISE_KAPPA = "pairwise_kappa"  # (J, J): Cohen's kappa of each two judges
SHOWN = {"kappa": "κ", "kappa_quadratic": "κ quadratic", "alpha_ordinal": "α ordinal"}


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CombineConfig:
    """Config of `relevance judges combine`."""

    tables: dict[str, str] = help_field(
        "judge name -> relevance table (a .parquet file, the table's folder or a data root holding relevance/); two "
        "or more, in order",
        {},
    )
    method: Literal["mean", "majority"] = help_field(
        "'mean': average the label probabilities, label = the most probable; 'majority': one vote per judge, label = "
        "the most voted, probabilities = vote shares (ties to the lower gain in both)",
        "mean",
    )
    pairs: Literal["same", "common"] = help_field(
        "'same': every judge must have judged the same pairs (else an error naming what differs); 'common': combine "
        "the pairs every judge has and report how many of each judge's pairs were left out",
        "same",
    )
    label_set: str = help_field("label set name (wands, esci) or path to a label-set YAML", "wands")
    gold: str | None = help_field(
        "optional JUDGMENTS table of human judgments: each judge's and the combination's agreement with them", None
    )
    gold_nodes: str | None = help_field(
        "optional GOLD_NODES table instead of gold: gold labels from its label node (else the label set's rule on ms/ma)", None
    )
    graph: str = help_field("with gold_nodes: the reasoning graph (name or YAML path) whose label node is read", DEFAULT_GRAPH)
    annotators: tuple[str, ...] = help_field("with gold: judgments of these annotators only; empty: every non-weak one", ())
    include_weak: bool = help_field("with gold: also count weak (engagement-derived) judgments", False)
    model_name: str = help_field("model_name of the combined table's rows", "judges")
    n_bootstrap: int = help_field("query-bootstrap replicates of the agreement intervals", 1000)
    seed: int = help_field("seed of the bootstrap", 0)
    level: float = help_field("confidence level of the intervals", 0.95)
    out: str = help_field(
        "data root of the combined table (OUT/relevance/ds=...) and folder of report.md, report.html, judges.json", "judges"
    )

    def __post_init__(self) -> None:
        if len(self.tables) < 2:
            raise ConfigError(f"tables: give two or more judges, e.g. tables.a=path/a tables.b=path/b; got {list(self.tables)}")
        bad = [name for name in self.tables if not str(name).strip() or "=" in str(name) or "+" in str(name)]
        if bad:
            raise ConfigError(f"tables: judge names must be non-empty and contain no '=' or '+': {bad}")
        if self.method not in METHODS:
            raise ConfigError(f"method: use one of {list(METHODS)}, got {self.method!r}")
        if self.pairs not in ("same", "common"):
            raise ConfigError(f"pairs: use 'same' or 'common', got {self.pairs!r}")
        if self.gold and self.gold_nodes:
            raise ConfigError("gold, gold_nodes: give one source of gold labels, not both")
        if not self.model_name.strip():
            raise ConfigError("model_name: must not be empty")
        if self.n_bootstrap < 1:
            raise ConfigError(f"n_bootstrap: need at least 1 replicate (1000 is a good default), got {self.n_bootstrap}")
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"level: a confidence level strictly between 0 and 1 (e.g. 0.95), got {self.level}")
        for field, loader in (("label_set", LabelSet.load), ("graph", ReasoningGraph.load)):
            try:
                loader(getattr(self, field))
            except (ValueError, FileNotFoundError) as error:
                raise ConfigError(f"{field}: {error}") from None


# ---------------------------------------------------------------- combining (pure)


def top_label(scores: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """`(N,)` the column of each row's highest score in `(N, C)`, ties to the tied label with the lowest gain."""
    tied = scores >= scores.max(axis=-1, keepdims=True) - TIE_TOLERANCE
    return np.where(tied, gains, np.inf).argmin(axis=-1)


def combine(labels: np.ndarray, probs: np.ndarray, gains: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The combination of J judges: `labels` `(J, N)` and `probs` `(J, N, C)` -> (label `(N,)`, probabilities `(N, C)`)."""
    if method == "mean":
        combined = probs.mean(axis=0)
    elif method == "majority":
        combined = np.eye(len(gains))[labels].sum(axis=0) / len(labels)
    else:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    return top_label(combined, gains), combined


def _tables(query_index: np.ndarray, rows: np.ndarray, columns: np.ndarray, n_queries: int, n_classes: int) -> np.ndarray:
    """`(R, Q, C, C)` per-query contingency tables of R raters: labels `rows` `(R, N)` against `columns` `(R, N)`."""
    n_raters = len(rows)
    index = (np.arange(n_raters)[:, None] * n_queries + query_index).ravel()
    confusion = M.per_query_confusion(index, np.ravel(rows), np.ravel(columns), n_raters * n_queries, n_classes)
    return confusion.reshape(n_raters, n_queries, n_classes, n_classes).astype(float)


# ---------------------------------------------------------------- reading and aligning


@dataclass(frozen=True)
class Judged:
    """The judges' outputs on the combined pairs: keys `(N,)` sorted, labels `(J, N)`, probs `(J, N, C)`."""

    keys: pd.DataFrame  # query_id, product_id, query, product_content_hash, scored_at
    labels: np.ndarray
    probs: np.ndarray
    left_out: dict[str, int]


def align(tables: dict[str, pa.Table], label_set: LabelSet, sources: dict[str, str], pairs: str) -> Judged:
    """Check each judge's table, then line the judges up on their pairs (see the module docstring's rules)."""
    judged = {name: predictions_from_table(name, table, label_set, sources[name]) for name, table in tables.items()}
    extra = {name: table.select(["query", "product_content_hash", "scored_at"]).to_pandas() for name, table in tables.items()}
    every = pd.concat([p.keys for p in judged.values()]).drop_duplicates(KEY)
    common = every
    for name, predictions in judged.items():
        mine = every.merge(predictions.keys, on=KEY, how="left", indicator=True)
        lacking = mine[mine["_merge"] == "left_only"]
        if len(lacking) and pairs == "same":
            raise EvaluationInputError(
                f"{sources[name]}: judge {name!r} lacks {len(lacking)} of the {len(every)} pairs the judges have, e.g. "
                f"{_examples(lacking)}; judge the same pairs, or set pairs=common to combine the pairs every judge has"
            )
        common = common.merge(predictions.keys, on=KEY, how="inner")
    if common.empty:
        raise EvaluationInputError(f"the judges {list(judged)} have no (query_id, product_id) pair in common")
    common = common.sort_values(KEY, kind="mergesort").reset_index(drop=True)
    rows, left_out = {}, {}
    for name, predictions in judged.items():
        position = predictions.keys.assign(row=np.arange(len(predictions.keys)))
        rows[name] = common.merge(position, on=KEY, how="left")["row"].to_numpy()
        left_out[name] = len(predictions.keys) - len(common)
    hashes = pd.DataFrame({name: extra[name]["product_content_hash"].to_numpy()[rows[name]] for name in judged})
    differ = hashes.nunique(axis=1, dropna=True) > 1
    if differ.any():
        raise EvaluationInputError(
            f"{int(differ.sum())} pairs were judged on different product text (product_content_hash differs between "
            f"judges), e.g. {_examples(common[differ.to_numpy()])}; score every judge on the same catalog"
        )
    first = next(iter(judged))
    keys = common.assign(
        query=extra[first]["query"].to_numpy()[rows[first]],
        product_content_hash=hashes.bfill(axis=1).iloc[:, 0].to_numpy(),
        scored_at=pd.concat([extra[name]["scored_at"].iloc[rows[name]].reset_index(drop=True) for name in judged], axis=1).max(axis=1),
    )
    return Judged(
        keys=keys,
        labels=np.stack([judged[name].label[rows[name]] for name in judged]),
        probs=np.stack([judged[name].probs[rows[name]] for name in judged]),
        left_out=left_out,
    )


def combined_table(judged: Judged, label: np.ndarray, probs: np.ndarray, label_set: LabelSet, model_name: str,
                   model_version: str) -> pa.Table:
    """The combination as a RELEVANCE-schema table."""
    names = label_set.names
    gains = np.array([label_set.gains[name] for name in names])
    scored_at = [moment.to_pydatetime() for moment in judged.keys["scored_at"]]
    n = len(label)
    return pa.Table.from_pydict(
        {
            "query": judged.keys["query"].tolist(),
            "query_id": judged.keys["query_id"].tolist(),
            "product_id": judged.keys["product_id"].tolist(),
            "label": [names[i] for i in label],
            "label_set": [label_set.name] * n,
            "label_probs": [list(zip(names, row.tolist())) for row in probs],
            "expected_gain": (probs @ gains).tolist(),
            "node_decisions": [[] for _ in range(n)],
            "reasoning": [None] * n,
            "product_content_hash": [None if pd.isna(value) else value for value in judged.keys["product_content_hash"]],
            "model_name": [model_name] * n,
            "model_version": [model_version] * n,
            "scored_at": scored_at,
            "ds": [moment.date() for moment in scored_at],
        },
        schema=RELEVANCE.arrow_schema(),
    )


# ---------------------------------------------------------------- agreement


@dataclass(frozen=True)
class JudgesResult:
    """Judges, their combination and agreement. agreement: `<against>_<metric>` -> Interval, `against` one of
    combination_, others_ (estimates `(J,)` in `judges` order), gold_ (`(J + 1,)`: the judges then the
    combination) and judges_ (scalars), metric a name of `agreement.AGREEMENT` (class_kappa adds a label axis);
    and `PAIRWISE_KAPPA`, `(J, J)` Cohen's kappa of each two judges."""

    judges: tuple[str, ...]
    sources: dict[str, str]
    method: str
    label_set: str
    labels: tuple[str, ...]
    model_name: str
    model_version: str
    n_pairs: int
    n_queries: int
    left_out: dict[str, int]
    label_shares: dict[str, list[float]]
    agreement: dict[str, Interval]
    n_gold_pairs: int
    n_gold_pairs_not_judged: int
    n_bootstrap: int
    seed: int
    level: float


def agreement_statistic(query_index: np.ndarray, labels: np.ndarray, combined: np.ndarray, others: np.ndarray,
                        gold: np.ndarray | None, n_queries: int, n_classes: int):
    """The bootstrap statistic of the judges' agreement (see `JudgesResult`); `gold` `(N,)` with -1 where a pair
    has no human judgment."""
    with_combination = _tables(query_index, np.broadcast_to(combined, labels.shape), labels, n_queries, n_classes)
    with_others = _tables(query_index, others, labels, n_queries, n_classes)
    votes = np.eye(n_classes)[labels].sum(axis=0)
    among = np.zeros((n_queries, n_classes, n_classes))
    np.add.at(among, query_index, A.coincidences(votes))
    per_query = {AGAINST_COMBINATION: with_combination, AGAINST_OTHERS: with_others}
    n_judges = len(labels)
    pairwise = _tables(query_index, np.repeat(labels, n_judges, axis=0), np.tile(labels, (n_judges, 1)), n_queries, n_classes)
    if gold is not None:
        has_gold = gold >= 0
        raters = np.vstack([labels, combined[None]])[:, has_gold]
        per_query[AGAINST_GOLD] = _tables(query_index[has_gold], np.broadcast_to(gold[has_gold], raters.shape), raters, n_queries, n_classes)

    def statistic(weights: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for prefix, tables in per_query.items():
            summed = np.einsum("bq,jqcd->bjcd", weights, tables)
            out |= {f"{prefix}{name}": value for name, value in A.agreement_scores(summed).items()}
        out[PAIRWISE_KAPPA] = A.cohens_kappa(np.einsum("bq,jqcd->bjcd", weights, pairwise)).reshape(len(weights), n_judges, n_judges)
        summed = np.einsum("bq,qcd->bcd", weights, among)
        return out | {f"{AMONG_JUDGES}{name}": value for name, value in A.agreement_scores(summed, summed).items()}

    return statistic


def judge_agreement(names: list[str], judged: Judged, label: np.ndarray, label_set: LabelSet, method: str, gold: np.ndarray | None,
                    n_bootstrap: int, seed: int, level: float) -> dict[str, Interval]:
    """Agreement of each judge with the combination (`label`), with the others' combination and with `gold`."""
    gains = np.array([label_set.gains[name] for name in label_set.names])
    everyone = np.arange(len(names))
    others = np.stack([combine(judged.labels[everyone != j], judged.probs[everyone != j], gains, method)[0] for j in everyone])
    query_index, query_ids = pd.factorize(judged.keys["query_id"])
    statistic = agreement_statistic(query_index, judged.labels, label, others, gold, len(query_ids), len(gains))
    return bootstrap(statistic, len(query_ids), n_bootstrap, seed, level)


# ---------------------------------------------------------------- the command


def run(config: CombineConfig) -> JudgesResult:
    """Read the judges' tables, combine them, write the combined table and the agreement report."""
    label_set = LabelSet.load(config.label_set)
    names = list(config.tables)
    sources = {name: str(path) for name, path in config.tables.items()}
    tables = {name: read_input(RELEVANCE, path, RELEVANCE.names) for name, path in config.tables.items()}
    judged = align(tables, label_set, sources, config.pairs)
    gains = np.array([label_set.gains[name] for name in label_set.names])
    label, probs = combine(judged.labels, judged.probs, gains, config.method)
    model_version = f"{config.method}:{'+'.join(names)}"
    out = Path(config.out)
    gold, n_gold, n_not_judged = None, 0, 0
    if config.gold or config.gold_nodes:
        if config.gold_nodes:
            judgments = judgments_from_gold_nodes(read_input(GOLD_NODES, config.gold_nodes, GOLD_NODES.names), label_set,
                                                  ReasoningGraph.load(config.graph))
        else:
            judgments = read_input(JUDGMENTS, config.gold, JUDGMENT_COLUMNS)
        human = gold_from_judgments(judgments, label_set, tuple(config.annotators), config.include_weak,
                                    config.gold or config.gold_nodes)
        matched = judged.keys[KEY].merge(human.pairs[KEY + ["label"]], on=KEY, how="left")["label"]
        gold = matched.fillna(-1).to_numpy(dtype=int)
        n_gold = int((gold >= 0).sum())
        n_not_judged = len(human.pairs) - n_gold
        if n_gold == 0:
            raise EvaluationInputError(f"{human.source}: none of its {len(human.pairs)} judged pairs is among the judges' pairs")
    agreement = judge_agreement(names, judged, label, label_set, config.method, gold, config.n_bootstrap, config.seed, config.level)
    n_classes = len(label_set.names)
    shares = {name: np.bincount(judged.labels[j], minlength=n_classes) / len(label) for j, name in enumerate(names)}
    shares[config.model_name] = np.bincount(label, minlength=n_classes) / len(label)
    result = JudgesResult(
        judges=tuple(names), sources=sources, method=config.method, label_set=label_set.name, labels=tuple(label_set.names),
        model_name=config.model_name, model_version=model_version, n_pairs=len(label),
        n_queries=judged.keys["query_id"].nunique(), left_out=judged.left_out,
        label_shares={name: share.tolist() for name, share in shares.items()}, agreement=agreement,
        n_gold_pairs=n_gold, n_gold_pairs_not_judged=n_not_judged,
        n_bootstrap=config.n_bootstrap, seed=config.seed, level=config.level,
    )
    table_folder = write_table(RELEVANCE, combined_table(judged, label, probs, label_set, config.model_name, model_version), out)
    write_report(result, out)
    log.info(f"combined {len(names)} judges ({config.method}) over {len(label)} pairs: {table_folder}; "
          f"report: {out / 'report.html'} (and report.md, judges.json)")
    return result


# ---------------------------------------------------------------- report


def report_blocks(result: JudgesResult, provenance: Provenance) -> list[Block]:
    """The judges report as blocks (rendered by `evaluation.report`'s renderers)."""
    agreement, judges = result.agreement, result.judges
    pairwise = agreement[PAIRWISE_KAPPA]
    with_gold = bool(result.n_gold_pairs)
    left_out = {name: n for name, n in result.left_out.items() if n}
    blocks = [
        Block("toc"),
        Block("h2", "Setup"),
        Block("p", (
            f"{len(judges)} judges combined by {'averaging label probabilities' if result.method == 'mean' else 'majority vote'} "
            f"(ties to the lower gain) over {result.n_pairs} pairs of {result.n_queries} queries, label set {result.label_set}; "
            f"the combination is model {result.model_name} version {result.model_version}. Intervals: {result.level:.0%} "
            f"percentile intervals of {result.n_bootstrap} bootstrap replicates resampling queries (seed {result.seed})."
            + (f" Left out (pairs not every judge has): {', '.join(f'{name} {n}' for name, n in left_out.items())}." if left_out else "")
            + (f" Gold labels: {result.n_gold_pairs} of the pairs have one ({result.n_gold_pairs_not_judged} gold "
               "pairs are not among the judges' pairs)." if with_gold else "")
        )),
        Block("ul", rows=tuple((f"{name}: {path}",) for name, path in result.sources.items())),
        Block("h2", "Agreement of each judge"),
        Block("p", (
            "Against the combination (which includes the judge, so it flatters each one) and against the combination of "
            "the other judges (leave-one-out: a judge far below the others there disagrees with them)"
            + (", and against the gold labels (the human judgments' majority label per pair, or the gold nodes' label); the last row is the combination's own." if with_gold else ".")
        )),
        Block(
            "table",
            header=("judge", *(f"{label} vs combination" for label in SHOWN.values()), "κ vs the others",
                    *((f"{label} vs gold" for label in SHOWN.values()) if with_gold else ())),
            rows=tuple(
                (name, *(fmt(agreement[f"{AGAINST_COMBINATION}{metric}"], j) for metric in SHOWN),
                 fmt(agreement[f"{AGAINST_OTHERS}kappa"], j),
                 *((fmt(agreement[f"{AGAINST_GOLD}{metric}"], j) for metric in SHOWN) if with_gold else ()))
                for j, name in enumerate(judges)
            ) + (((f"{result.model_name} (the combination)", "-", "-", "-", "-",
                   *(fmt(agreement[f"{AGAINST_GOLD}{metric}"], len(judges)) for metric in SHOWN)),) if with_gold else ()),
        ),
        Block("p", (
            "The judges among themselves (every judge's label of a pair, pooled marginals): "
            + "; ".join(f"{label} {fmt(agreement[f'{AMONG_JUDGES}{metric}'])}" for metric, label in SHOWN.items()) + "."
        )),
        Block("h3", "Each two judges: Cohen's κ"),
        Block(
            "table",
            header=("judge", *judges),
            rows=tuple(
                (name, *(fmt(pairwise, (j, k)) if j != k else "-" for k in range(len(judges))))
                for j, name in enumerate(judges)
            ),
        ),
        Block("h2", "Label shares"),
        Block(
            "table",
            header=("judge", *result.labels),
            rows=tuple((name, *(f"{share:.3f}" for share in shares)) for name, shares in result.label_shares.items()),
        ),
        Block("footer", provenance.line()),
    ]
    return blocks


def write_report(result: JudgesResult, out: Path, provenance: Provenance | None = None) -> dict[str, Path]:
    """report.md, report.html and judges.json under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    provenance = provenance or Provenance.now()
    blocks = report_blocks(result, provenance)
    title = "Relevance judges combined"
    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "judges.json"}
    paths["markdown"].write_text(render_markdown(blocks, {}, title), encoding="utf-8")
    paths["html"].write_text(render_html(blocks, {}, title), encoding="utf-8")
    document = {**to_jsonable(result), "provenance": to_jsonable(provenance)}
    paths["json"].write_text(json.dumps(document, indent=2, allow_nan=False), encoding="utf-8")
    return paths
