"""Evaluation inputs: read tables with their declared schemas, check them, build gold, join pairs.

Pairs are keyed by (query_id, product_id).
- Gold: the judgments of the chosen annotators (default: every judgment that is not weak) are
  aggregated per pair by majority vote; a tie goes to the tied label with the lowest gain (the
  conservative reading: a pair is only called Exact if more annotators said so than anything else).
  Pairs with several judgments and ties are counted and reported.
- Predictions: one row per pair, else an error naming duplicated pairs (a RELEVANCE table holding
  several model versions or re-scored days must be filtered to one model first).
- Gold pairs without a prediction are uncovered: counted, and scored as wrong in the
  coverage-adjusted accuracy; predictions without gold are counted and not scored.
- Labels outside the label set (gold, predicted, or keys of `label_probs`) are an error listing them
  with counts; `label_probs` must sum to 1 (within `PROBABILITY_TOLERANCE`).
- Node values are compared after normalisation by node kind: `choice` values stripped; `text`
  values with whitespace collapsed and case folded; `facets` parsed and re-formatted (key order
  free, case folded). The graph's label node is left out (label accuracy covers it).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from schemas import storage
from schemas.graph import LabelSet, ReasoningGraph, format_facets, parse_facets
from schemas.table import Table
from schemas.tables import JUDGMENTS, RELEVANCE

KEY = ["query_id", "product_id"]
UNKNOWN_SEGMENT = "unknown"
PROBABILITY_TOLERANCE = 1e-3
EXAMPLES = 5

PREDICTION_COLUMNS = ["query_id", "product_id", "label", "label_set", "label_probs", "expected_gain", "node_decisions"]
JUDGMENT_COLUMNS = ["query_id", "product_id", "label", "label_set", "annotator", "is_weak"]


class EvaluationInputError(ValueError):
    """An input table cannot be evaluated; the message names the file, the field and examples."""


# ---------------------------------------------------------------- reading


def _dataset(table: Table, path: Path) -> ds.Dataset:
    if path.is_file() and path.suffix == ".parquet":
        return ds.dataset(path, schema=table.arrow_schema(), format="parquet")
    if (path / table.name).is_dir():
        return storage.dataset(table, path)
    if path.is_dir() and path.name == table.name:
        return storage.dataset(table, path.parent)
    raise EvaluationInputError(
        f"{path}: not a {table.name!r} table; give a .parquet file, the table's folder "
        f"(.../{table.name}) or a data root holding {table.name}/"
    )


def read_input(table: Table, path: str | Path, columns: list[str]) -> pa.Table:
    """Read `columns` of `table` from a parquet file, the table's folder or a data root holding it.

    The declared schema is passed to the reader (never inferred); a file missing one of `columns`,
    or a null in a non-nullable column, is an error naming the file and column.
    """
    path = Path(path)
    data = _dataset(table, path)
    for file in data.files:
        present = set(pq.read_schema(file).names) | set(table.partition_by)
        missing = [name for name in columns if name not in present]
        if missing:
            raise EvaluationInputError(f"{file}: missing columns {missing} of table {table.name!r}")
    result = data.to_table(columns=columns)
    for name in columns:
        nulls = result[name].null_count
        if nulls and not table.column(name).nullable:
            raise EvaluationInputError(f"{path}: column {name!r} of {table.name!r} has {nulls} null values")
    return result


# ---------------------------------------------------------------- checks


def _examples(frame: pd.DataFrame, columns: list[str] = KEY) -> str:
    return ", ".join(str(tuple(row)) for row in frame[columns].head(EXAMPLES).itertuples(index=False))


def _row_numbers(mask) -> list[int]:
    """The first 1-based row numbers where `mask` holds."""
    return [int(i) + 1 for i in np.flatnonzero(np.asarray(mask))[:EXAMPLES]]


def _check_label_set(values: pd.Series, label_set: LabelSet, source: str) -> None:
    other = values[values != label_set.name].value_counts()
    if len(other):
        raise EvaluationInputError(
            f"{source}: label_set must be {label_set.name!r}, found {other.to_dict()} (rows by label set)"
        )


def _label_index(values: pd.Series, label_set: LabelSet, what: str, source: str) -> np.ndarray:
    index = values.map({name: i for i, name in enumerate(label_set.names)})
    unknown = values[index.isna()].value_counts()
    if len(unknown):
        raise EvaluationInputError(
            f"{source}: {what} not in label set {label_set.name!r} {label_set.names}: "
            f"{unknown.to_dict()} (label: rows)"
        )
    return index.to_numpy(dtype=int)


def _check_unique(frame: pd.DataFrame, key: list[str], source: str, hint: str) -> None:
    duplicated = frame[frame.duplicated(key, keep=False)]
    if len(duplicated):
        n_keys = len(duplicated.drop_duplicates(key))
        raise EvaluationInputError(
            f"{source}: {n_keys} {tuple(key)} keys occur more than once, e.g. {_examples(duplicated, key)}; {hint}"
        )


def _map_entries(column: pa.ChunkedArray) -> pd.DataFrame:
    """A map column as long rows (row, key, value); `row` is the 0-based row of the table."""
    entries = pa.list_(pa.struct([("key", column.type.key_type), ("value", column.type.item_type)]))
    as_list = column.cast(entries)
    flat = pc.list_flatten(as_list)
    if isinstance(flat, pa.ChunkedArray):
        flat = flat.combine_chunks() if flat.num_chunks else pa.array([], entries.value_type)
    return pd.DataFrame(
        {
            "row": np.asarray(pc.list_parent_indices(as_list), dtype=np.int64),
            "key": flat.field("key").to_numpy(zero_copy_only=False),
            "value": flat.field("value").to_numpy(zero_copy_only=False),
        }
    )


# ---------------------------------------------------------------- gold


def rows_on_pairs(table: pa.Table, labelled: pa.Table) -> pa.Table:
    """The rows of `table` whose (query_id, product_id) pair `labelled` has: gold or judgments cut to the pairs a
    labeller scored, so its uncovered count means what it says."""
    pairs = set(zip(labelled["query_id"].to_pylist(), labelled["product_id"].to_pylist()))
    keys = zip(table["query_id"].to_pylist(), table["product_id"].to_pylist())
    return table.filter(pa.array([key in pairs for key in keys], pa.bool_()))


def majority_labels(judgments: pd.DataFrame, label_set: LabelSet) -> pd.DataFrame:
    """One label per pair by majority vote, ties to the lowest-gain tied label.

    `judgments`: rows with query_id, product_id, label (labels of `label_set`). Returns
    query_id, product_id, label, n_judgments, tied (the top count was shared).
    """
    counts = judgments.groupby(KEY + ["label"], sort=False).size().rename("votes").reset_index()
    counts["gain"] = counts["label"].map(label_set.gains)
    counts = counts.sort_values(KEY + ["votes", "gain"], ascending=[True, True, False, True], kind="mergesort")
    counts["rank"] = counts.groupby(KEY, sort=False).cumcount()
    top = counts[counts["rank"] == 0].set_index(KEY)
    runner_up = counts[counts["rank"] == 1].set_index(KEY)["votes"].reindex(top.index)
    total = counts.groupby(KEY, sort=False)["votes"].sum().reindex(top.index)
    return pd.DataFrame(
        {"label": top["label"], "n_judgments": total, "tied": runner_up == top["votes"]}, index=top.index
    ).reset_index()


@dataclass(frozen=True)
class Gold:
    """Gold label per pair (label: index into the label set) and how it was aggregated."""

    pairs: pd.DataFrame  # query_id, product_id, label (int), n_judgments, tied
    votes: np.ndarray  # (N, C) judgments of each pair per label (aligned with `pairs`): the judges' agreement
    n_judgments: int
    annotators: tuple[str, ...]
    source: str


def gold_from_judgments(
    judgments: pa.Table, label_set: LabelSet, annotators: tuple[str, ...] = (), include_weak: bool = False,
    source: str = "gold",
) -> Gold:
    """Gold labels from a JUDGMENTS table: choose annotators, check labels and keys, majority vote."""
    frame = judgments.select(JUDGMENT_COLUMNS).to_pandas()
    _check_label_set(frame["label_set"], label_set, source)
    _check_unique(frame, ["query_id", "product_id", "annotator"], source, "an annotator judges a pair once")
    chosen = frame[frame["annotator"].isin(annotators)] if annotators else frame
    if not include_weak:
        chosen = chosen[~chosen["is_weak"]]
    if chosen.empty:
        available = frame.groupby(["annotator", "is_weak"]).size().to_dict()
        raise EvaluationInputError(
            f"{source}: no judgments left after choosing annotators {list(annotators) or 'all'} "
            f"(include_weak={include_weak}); available (annotator, is_weak): rows = {available}"
        )
    codes = _label_index(chosen["label"], label_set, "gold labels", source)
    pairs = majority_labels(chosen, label_set)
    pairs["label"] = _label_index(pairs["label"], label_set, "gold labels", source)
    votes = (
        chosen[KEY].assign(code=codes).groupby(KEY + ["code"]).size().unstack(fill_value=0)
        .reindex(index=pd.MultiIndex.from_frame(pairs[KEY]), columns=range(len(label_set.names)), fill_value=0)
    )
    return Gold(pairs, votes.to_numpy(dtype=int), len(chosen), tuple(sorted(chosen["annotator"].unique())), source)


def judgments_from_gold_nodes(
    gold_nodes: pa.Table, label_set: LabelSet, graph: ReasoningGraph, annotator: str = "gold_nodes"
) -> pa.Table:
    """A JUDGMENTS table of the gold labels implied by GOLD_NODES: the graph's label node (`y`) where
    present, else the label set's rule on the decision nodes (`label_from_nodes`). For data whose
    noise-free gold lives in the node values (the synthetic world) and whose judgments are noisy."""
    keys = gold_nodes.select(KEY).to_pandas()
    entries = _map_entries(gold_nodes["nodes"])
    nodes: list[dict[str, str]] = [{} for _ in range(len(keys))]
    for row, node, value in zip(entries["row"], entries["key"], entries["value"]):
        nodes[row][node] = value
    try:
        labels = [values.get(graph.label_node) or label_set.label_from_nodes(values) for values in nodes]
    except ValueError as error:
        raise EvaluationInputError(f"gold_nodes: a pair has neither {graph.label_node!r} nor decisions the rule covers: {error}") from None
    n = len(keys)
    return pa.Table.from_pydict(
        {"query_id": keys["query_id"].tolist(), "product_id": keys["product_id"].tolist(), "label": labels,
         "label_set": [label_set.name] * n, "annotator": [annotator] * n, "is_weak": [False] * n},
        schema=JUDGMENTS.arrow_schema(),
    )


# ---------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Predictions:
    """One model's predictions, one row per pair (arrays aligned with `keys`)."""

    name: str
    keys: pd.DataFrame  # query_id, product_id
    label: np.ndarray  # (N,) int
    probs: np.ndarray  # (N, C) label probabilities in label-set order
    expected_gain: np.ndarray  # (N,)
    nodes: pd.DataFrame  # row, key (node name), value
    source: str


def predictions_from_table(name: str, table: pa.Table, label_set: LabelSet, source: str) -> Predictions:
    """Check a RELEVANCE-schema table and turn it into arrays (see the module docstring's rules)."""
    frame = table.select(["query_id", "product_id", "label", "label_set", "expected_gain"]).to_pandas()
    if frame.empty:
        raise EvaluationInputError(f"{source}: no predictions")
    missing_query = frame["query_id"].isna()
    if missing_query.any():
        raise EvaluationInputError(
            f"{source}: {int(missing_query.sum())} rows have no query_id (rows {_row_numbers(missing_query)}); "
            "evaluation joins predictions to gold on (query_id, product_id)"
        )
    _check_label_set(frame["label_set"], label_set, source)
    _check_unique(frame, KEY, source, "keep one prediction per pair (one model version, one scoring of each pair)")
    label = _label_index(frame["label"], label_set, "predicted labels", source)

    entries = _map_entries(table["label_probs"])
    key_index = _label_index(entries["key"], label_set, "label_probs keys", source)
    probs = np.zeros((len(frame), len(label_set.names)))
    np.add.at(probs, (entries["row"].to_numpy(), key_index), entries["value"].to_numpy(dtype=float))
    off = np.abs(probs.sum(axis=1) - 1.0) > PROBABILITY_TOLERANCE
    off[entries["row"].to_numpy()[~entries["value"].between(0.0, 1.0).to_numpy()]] = True
    if off.any():
        raise EvaluationInputError(
            f"{source}: label_probs of {int(off.sum())} rows are not probabilities (each in [0, 1], summing to 1 "
            f"±{PROBABILITY_TOLERANCE}), e.g. rows {_row_numbers(off)} {_examples(frame[off])}"
        )
    return Predictions(
        name=name,
        keys=frame[KEY].reset_index(drop=True),
        label=label,
        probs=probs,
        expected_gain=frame["expected_gain"].to_numpy(dtype=float),
        nodes=_map_entries(table["node_decisions"]),
        source=source,
    )


def predictions_from_judgments(
    judgments: pa.Table,
    label_set: LabelSet,
    model_name: str = "judgments",
    model_version: str = "1",
    queries: pa.Table | None = None,
    scored_at: dt.datetime = dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
) -> pa.Table:
    """A RELEVANCE-schema table whose "model" is a set of judgments (e.g. human ratings).

    Honest about what it is: `label_probs` is one-hot on the judged label (so calibration and AUC
    describe hard labels, not a probabilistic model), `expected_gain` is that label's gain and
    `node_decisions` is empty. Several judgments of one pair are aggregated by `majority_labels`.
    `query` is the query text from `queries` when given, else the query_id.
    """
    frame = judgments.select(JUDGMENT_COLUMNS).to_pandas()
    _check_label_set(frame["label_set"], label_set, "judgments")
    _label_index(frame["label"], label_set, "labels", "judgments")
    pairs = majority_labels(frame, label_set)
    text = dict(zip(queries["query_id"].to_pylist(), queries["query"].to_pylist())) if queries is not None else {}
    gains = label_set.gains
    n = len(pairs)
    data = {
        "query": [text.get(q, q) for q in pairs["query_id"]],
        "query_id": pairs["query_id"].tolist(),
        "product_id": pairs["product_id"].tolist(),
        "label": pairs["label"].tolist(),
        "label_set": [label_set.name] * n,
        "label_probs": [[(name, float(name == label)) for name in label_set.names] for label in pairs["label"]],
        "expected_gain": [gains[label] for label in pairs["label"]],
        "node_decisions": [[] for _ in range(n)],
        "reasoning": [None] * n,
        "product_content_hash": [None] * n,
        "model_name": [model_name] * n,
        "model_version": [model_version] * n,
        "scored_at": [scored_at] * n,
        "ds": [scored_at.date()] * n,
    }
    return pa.Table.from_pydict(data, schema=RELEVANCE.arrow_schema())


# ---------------------------------------------------------------- joined pairs


@dataclass(frozen=True)
class ScoredPairs:
    """Every gold pair with one model's prediction where it has one; arrays aligned by pair.

    covered: the model predicted the pair. label -1, probs and expected_gain NaN where uncovered.
    node_correct: `(N, M)` 1/0 per node of `node_names`, NaN where the pair has no gold value for
    the node or is uncovered; node_missing: gold has a value and the prediction has no such node.
    votes: `(N, C)` the gold judgments of each pair per label (None: one judgment per pair, unknown).
    """

    query_id: np.ndarray
    product_id: np.ndarray
    gold: np.ndarray
    covered: np.ndarray
    label: np.ndarray
    probs: np.ndarray
    expected_gain: np.ndarray
    node_names: tuple[str, ...]
    node_correct: np.ndarray
    node_missing: np.ndarray
    query_segment: np.ndarray
    product_type: np.ndarray
    votes: np.ndarray | None = None

    def subset(self, mask: np.ndarray) -> ScoredPairs:
        per_pair = {
            name: getattr(self, name)[mask]
            for name in (
                "query_id", "product_id", "gold", "covered", "label", "probs", "expected_gain",
                "node_correct", "node_missing", "query_segment", "product_type",
            )
        }
        return replace(self, **per_pair, votes=None if self.votes is None else self.votes[mask])


@dataclass(frozen=True)
class Context:
    """What is known about gold pairs beside their label: node values and segments (long frames)."""

    gold_nodes: pd.DataFrame  # query_id, product_id, node, value (normalised)
    node_names: tuple[str, ...]
    query_segment: dict[str, str]
    product_type: dict[str, str]


def _normaliser(graph: ReasoningGraph):
    kinds = {node.name: node.kind for node in graph.nodes}

    def normalise(node: str, value: str) -> str:
        kind = kinds.get(node, "text")
        if kind == "choice":
            return value.strip()
        folded = " ".join(value.split()).casefold()
        if kind == "facets":
            facets = parse_facets(folded)
            return format_facets(facets) if facets is not None else folded
        return folded

    return normalise


def _normalise_column(frame: pd.DataFrame, graph: ReasoningGraph) -> pd.Series:
    normalise = _normaliser(graph)
    return pd.Series(
        [normalise(node, value) for node, value in zip(frame["key"], frame["value"])], index=frame.index, dtype=object
    )


def build_context(
    graph: ReasoningGraph,
    gold_nodes: pa.Table | None = None,
    queries: pa.Table | None = None,
    catalog: pa.Table | None = None,
    source: str = "gold_nodes",
) -> Context:
    """Normalised gold node values (label node left out) and the segment lookups."""
    if gold_nodes is not None:
        keys = gold_nodes.select(KEY).to_pandas()
        _check_unique(keys, KEY, source, "one row of gold node values per pair")
        entries = _map_entries(gold_nodes["nodes"])
        entries = entries[entries["key"] != graph.label_node]
        long = keys.iloc[entries["row"].to_numpy()].reset_index(drop=True)
        long["node"] = entries["key"].to_numpy()
        long["value"] = _normalise_column(entries.reset_index(drop=True), graph).to_numpy()
        in_graph = [name for name in graph.node_names if name in set(long["node"])]
        node_names = tuple(in_graph + sorted(set(long["node"]) - set(in_graph)))
    else:
        long = pd.DataFrame(columns=KEY + ["node", "value"])
        node_names = ()
    segment = {}
    if queries is not None:
        segment = {q: s or UNKNOWN_SEGMENT for q, s in zip(queries["query_id"].to_pylist(), queries["segment"].to_pylist())}
    product_type = {}
    if catalog is not None:
        product_type = dict(zip(catalog["product_id"].to_pylist(), catalog["product_type"].to_pylist()))
    return Context(long, node_names, segment, product_type)


def join(gold: Gold, predictions: Predictions, context: Context, graph: ReasoningGraph) -> tuple[ScoredPairs, int]:
    """Align one model's predictions with the gold pairs; returns the pairs and the number of
    predictions that have no gold pair (counted, not scored)."""
    pairs = gold.pairs[KEY].copy()
    pairs["gold_row"] = np.arange(len(pairs))
    predicted = predictions.keys.copy()
    predicted["pred_row"] = np.arange(len(predicted))
    merged = pairs.merge(predicted, on=KEY, how="left", validate="one_to_one")
    n_without_gold = len(predicted) - int(merged["pred_row"].notna().sum())
    if n_without_gold == len(predicted):
        raise EvaluationInputError(
            f"{predictions.source}: none of the {len(predicted)} predictions of {predictions.name!r} matches a gold "
            f"(query_id, product_id) pair of {gold.source}; predictions look like {_examples(predicted)}, "
            f"gold pairs like {_examples(pairs)}"
        )
    covered = merged["pred_row"].notna().to_numpy()
    row = merged["pred_row"].fillna(0).to_numpy(dtype=int)
    n, n_classes = len(pairs), predictions.probs.shape[1]

    label = np.where(covered, predictions.label[row], -1)
    probs = np.full((n, n_classes), np.nan)
    probs[covered] = predictions.probs[row[covered]]
    expected_gain = np.full(n, np.nan)
    expected_gain[covered] = predictions.expected_gain[row[covered]]

    node_names = context.node_names
    node_correct = np.full((n, len(node_names)), np.nan)
    node_missing = np.zeros((n, len(node_names)), dtype=bool)
    if node_names:
        predicted_nodes = predictions.nodes.assign(value=_normalise_column(predictions.nodes, graph))
        predicted_nodes = predicted_nodes.rename(columns={"key": "node", "row": "pred_row", "value": "predicted"})
        matched = pd.DataFrame({"gold_row": np.flatnonzero(covered), "pred_row": row[covered]})
        gold_long = (
            context.gold_nodes.merge(pairs, on=KEY, how="inner")
            .merge(matched, on="gold_row", how="inner")
            .merge(predicted_nodes, on=["pred_row", "node"], how="left")
        )
        column = gold_long["node"].map({name: i for i, name in enumerate(node_names)}).to_numpy(dtype=int)
        target = gold_long["gold_row"].to_numpy()
        node_correct[target, column] = (gold_long["value"] == gold_long["predicted"]).to_numpy(dtype=float)
        node_missing[target, column] = gold_long["predicted"].isna().to_numpy()

    scored = ScoredPairs(
        query_id=pairs["query_id"].to_numpy(dtype=object),
        product_id=pairs["product_id"].to_numpy(dtype=object),
        gold=gold.pairs["label"].to_numpy(dtype=int),
        covered=covered,
        label=label,
        probs=probs,
        expected_gain=expected_gain,
        node_names=node_names,
        node_correct=node_correct,
        node_missing=node_missing,
        query_segment=pairs["query_id"].map(context.query_segment).fillna(UNKNOWN_SEGMENT).to_numpy(dtype=object),
        product_type=pairs["product_id"].map(context.product_type).fillna(UNKNOWN_SEGMENT).to_numpy(dtype=object),
        votes=gold.votes,
    )
    return scored, n_without_gold
