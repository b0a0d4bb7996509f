"""Every table this system reads or writes, declared once.

Readers pass `TABLE.arrow_schema()` (pyarrow, DuckDB) or `spark_schema(TABLE)` (Spark) and never
infer. A transform that produces a table ends on `TABLE.names` (a select that is the contract).
"""

from __future__ import annotations

import dataclasses

from schemas.table import Column, Table

NODE_MAP = "map<string,string>"
PROBABILITY_MAP = "map<string,float64>"

CATALOG = Table(
    name="catalog",
    doc="One row per product.",
    key=("product_id",),
    columns=(
        Column("product_id", "string", doc="Stable product identifier."),
        Column("title", "string", doc="Product title as shown in search results."),
        Column("description", "string", nullable=True, doc="Free-text description; may be missing."),
        Column("product_type", "string", doc="The product's class (its subject), e.g. 'sofa'."),
        Column("category_path", "string", nullable=True, doc="'/'-joined category hierarchy."),
        Column("brand", "string", nullable=True, doc="Brand name, when known."),
        Column("attributes", NODE_MAP, doc="Typed facets (color, material, size, ...) as key -> value."),
        Column("price", "float64", nullable=True, min_value=0.0, doc="List price in the shop's currency."),
        Column("source", "string", allowed=("synthetic", "wands", "esci", "own"), doc="Where the row came from."),
    ),
)

QUERIES = Table(
    name="queries",
    doc="One row per distinct query.",
    key=("query_id",),
    columns=(
        Column("query_id", "string"),
        Column("query", "string", doc="The customer's search string."),
        Column("query_class", "string", nullable=True, doc="Product class the query asks for, when known."),
        Column("segment", "string", nullable=True, allowed=("head", "torso", "tail"), doc="Traffic segment."),
        Column("frequency", "float64", nullable=True, min_value=0.0, doc="Share of search traffic."),
        Column("locale", "string", nullable=True, doc="Marketplace locale (ESCI: us, es, jp)."),
        Column("source", "string", allowed=("synthetic", "wands", "esci", "own")),
    ),
)

SEARCH_IMPRESSIONS = Table(
    name="search_impressions",
    doc="One row per product shown in one search request, with what the user did with it.",
    key=("request_id", "position"),
    partition_by=("ds",),
    columns=(
        Column("request_id", "string"),
        Column("user_id", "string"),
        Column("query_id", "string"),
        Column("query", "string", doc="The search string as typed."),
        Column("product_id", "string"),
        Column("position", "int32", min_value=1, doc="1-based rank on the result page."),
        Column("clicked", "bool"),
        Column("added_to_cart", "bool"),
        Column("ordered", "bool"),
        Column("quantity", "int32", min_value=0, doc="Units ordered (0 unless ordered)."),
        Column("price", "float64", min_value=0.0, doc="Unit price at impression time."),
        Column("ts", "timestamp"),
        Column("ds", "date", doc="Partition: the day of `ts` (UTC)."),
    ),
)

JUDGMENTS = Table(
    name="judgments",
    doc="Relevance labels for (query, product) pairs: human, gold or weak (engagement-derived).",
    key=("query_id", "product_id", "annotator"),
    columns=(
        Column("query_id", "string"),
        Column("product_id", "string"),
        Column("label", "string", doc="A label of `label_set`."),
        Column("label_set", "string", allowed=("wands", "esci"), doc="Which label set `label` belongs to."),
        Column("annotator", "string", doc="Who labelled: 'gold', a human id, 'weak:<rule>', ..."),
        Column("is_weak", "bool", doc="True for labels derived from engagement, not judged."),
    ),
)

GOLD_NODES = Table(
    name="gold_nodes",
    doc="Known values of reasoning-graph nodes per pair (all nodes on the synthetic world, some on WANDS).",
    key=("query_id", "product_id"),
    columns=(
        Column("query_id", "string"),
        Column("product_id", "string"),
        Column("nodes", NODE_MAP, doc="node name -> gold value in the graph's text format."),
    ),
)

EXPERIMENT_ASSIGNMENT = Table(
    name="experiment_assignment",
    doc="Which variant each user of an experiment was hashed into.",
    key=("experiment_id", "user_id"),
    columns=(
        Column("experiment_id", "string"),
        Column("user_id", "string"),
        Column("variant", "string"),
        Column("first_exposure_ts", "timestamp", doc="The user's first request in the experiment."),
        Column("user_type", "string", allowed=("new", "returning"), doc="New: no pre-period activity."),
    ),
)

EXPERIMENT_EVENTS = Table(
    name="experiment_events",
    doc="One row per search request: the engagement it produced (pre-period and experiment period).",
    key=("request_id",),
    partition_by=("ds",),
    columns=(
        Column("request_id", "string"),
        Column("user_id", "string"),
        Column("query_id", "string"),
        Column("query_segment", "string", allowed=("head", "torso", "tail")),
        Column("impressions", "int32", min_value=0),
        Column("clicks", "int32", min_value=0),
        Column("add_to_carts", "int32", min_value=0),
        Column("orders", "int32", min_value=0),
        Column("gmv", "float64", min_value=0.0),
        Column("ts", "timestamp"),
        Column("ds", "date"),
    ),
)

QUARANTINE = Table(
    name="quarantine",
    doc="Rows rejected by a reader or a validation, with why; nothing is dropped silently.",
    columns=(
        Column("source_table", "string", doc="The table the row was meant for."),
        Column("source_file", "string", nullable=True, doc="File the row was read from, when known."),
        Column("row_number", "int64", nullable=True, doc="1-based data row in that file (header excluded)."),
        Column("field", "string", nullable=True, doc="The offending field; null for whole-row problems."),
        Column("reason", "string"),
        Column("record", "string", doc="The rejected row as JSON."),
        Column("quarantined_at", "timestamp"),
    ),
)

RELEVANCE = Table(
    name="relevance",
    doc="The table search teams import: one row per scored (query, product) pair.",
    key=("query", "product_id", "model_version"),
    partition_by=("ds",),
    columns=(
        Column("query", "string"),
        Column("query_id", "string", nullable=True),
        Column("product_id", "string"),
        Column("label", "string"),
        Column("label_set", "string", allowed=("wands", "esci")),
        Column("label_probs", PROBABILITY_MAP, doc="label -> probability; sums to 1."),
        Column("expected_gain", "float64", min_value=0.0, doc="sum over labels of probability x gain."),
        Column("node_decisions", NODE_MAP, doc="node name -> decided value (ms, ma, ...)."),
        Column("reasoning", "string", nullable=True, doc="The generated reasoning text, when asked for."),
        Column("product_content_hash", "string", nullable=True, doc="Hash of the product text scored."),
        Column("model_name", "string"),
        Column("model_version", "string"),
        Column("scored_at", "timestamp"),
        Column("ds", "date"),
    ),
)

QUERY_PRODUCT_STATS = Table(
    name="query_product_stats",
    doc="One day of engagement per (normalised query, product), written by `relevance prepare`.",
    key=("query", "product_id"),
    partition_by=("ds",),
    columns=(
        Column("query", "string", doc="The normalised query (NFKC, lower case, single spaces, synonyms applied)."),
        Column("product_id", "string"),
        Column("impressions", "int64", min_value=0),
        Column("clicks", "int64", min_value=0),
        Column("add_to_carts", "int64", min_value=0),
        Column("orders", "int64", min_value=0),
        Column("gmv", "float64", min_value=0.0, doc="Sum of price x quantity over ordered impressions."),
        Column(
            "expected_examinations", "float64", min_value=0.0,
            doc="Sum over impressions of the examination rate of their position (position 1 = 1).",
        ),
        Column(
            "debiased_ctr", "float64", nullable=True, min_value=0.0,
            doc="clicks / expected_examinations: the CTR the pair would have at position 1.",
        ),
        Column("product_content_hash", "string", doc="sha256 of the product text (see jobs/prepare.py)."),
        Column("ds", "date"),
    ),
)

CANDIDATE_PAIRS = Table(
    name="candidate_pairs",
    doc="The day's (normalised query, product) pairs to score, with the product text's hash.",
    key=("query", "product_id"),
    partition_by=("ds",),
    columns=(
        Column("query", "string"),
        Column("query_id", "string", doc="The smallest query_id normalised to this query that day."),
        Column("product_id", "string"),
        Column("product_content_hash", "string"),
        Column("impressions", "int64", min_value=1),
        Column("ds", "date"),
    ),
)

PAIRS_TO_SCORE = Table(
    name="pairs_to_score",
    doc="Candidate pairs with the product text a scorer reads (`relevance score` joins candidate_pairs and catalog).",
    key=("query", "product_id"),
    columns=(
        Column("query", "string"),
        Column("query_id", "string", nullable=True),
        Column("product_id", "string"),
        Column("product_content_hash", "string", nullable=True),
        Column("title", "string"),
        Column("product_type", "string"),
        Column("attributes", NODE_MAP, doc="The product's facets as the prompt shows them: its attributes plus `brand`."),
        Column("description", "string", nullable=True),
    ),
)

PAIRS_FILE = Table(
    name="pairs_file",
    doc=(
        "Any (query, product) pairs a search team wants judged (`relevance score --pairs FILE.csv|FILE.parquet`), the product "
        "text from the catalog. In a CSV file (comma-separated, a header line, UTF-8) every cell is text and an empty cell is null."
    ),
    key=("query", "product_id"),
    optional=("query_id",),
    columns=(
        Column("query", "string", doc="The query to judge, scored as written."),
        Column(
            "query_id", "string", nullable=True,
            doc="Optional; where absent or empty: 'q-' and the first 16 hex digits of the sha256 of the query's UTF-8 bytes.",
        ),
        Column("product_id", "string", doc="The product: a catalog product_id, or the product the row's own text describes."),
    ),
)

PAIRS_FILE_WITH_TEXT = Table(
    name="pairs_file_with_text",
    doc=(
        "A pairs file that carries each row's product text in the catalog's columns (the catalog is not read). In a CSV file "
        "`attributes` is a JSON object of text values, as `relevance export` writes maps to CSV."
    ),
    key=("query", "product_id"),
    optional=("query_id", "description", "brand", "attributes"),
    columns=PAIRS_FILE.columns + (
        CATALOG.column("title"),
        CATALOG.column("description"),
        CATALOG.column("product_type"),
        CATALOG.column("brand"),
        dataclasses.replace(CATALOG.column("attributes"), nullable=True, doc="Typed facets as key -> value; absent or null: none."),
    ),
)

TRAINING_EXAMPLES = Table(
    name="training_examples",
    doc="Judged (query, product) pairs with their text, split by query, written by `relevance datasets`.",
    key=("query_id", "product_id", "label_set"),
    columns=(
        Column("split", "string", allowed=("train", "validation", "test"), doc="Chosen per query: no query in two splits."),
        Column("query_id", "string"),
        Column("query", "string", doc="The query as typed (the policy sees what customers type)."),
        Column(
            "segment", "string", nullable=True, allowed=("head", "torso", "tail"),
            doc="Traffic segment (null: unknown, its own stratum); the split is stratified by it.",
        ),
        Column("product_id", "string"),
        Column("title", "string"),
        Column("product_type", "string"),
        Column("description", "string", nullable=True),
        Column("facets", NODE_MAP, doc="The product's attributes plus `brand` (what gold `pa` describes)."),
        Column("label_set", "string", allowed=("wands", "esci")),
        Column("label", "string", doc="A label of `label_set`."),
        Column("is_weak", "bool", doc="True when the label comes from engagement, not a judge: never mixed in silently."),
        Column("label_source", "string", doc="The judgment's annotator ('gold', a human id, 'weak:<rule>')."),
        Column("nodes", NODE_MAP, nullable=True, doc="Gold node values (graph text format), when known."),
        Column(
            "target", "string", nullable=True,
            doc="The SFT target CoT (training.cot.render_cot of `nodes`, `cot_order`); null without nodes.",
        ),
        Column("cot_order", "string", allowed=("label_first", "reasoning_first", "product_first")),
    ),
)

RANKED_LISTS = Table(
    name="ranked_lists",
    doc="Result lists of rankers, judged offline by `relevance rankers`: one row per (ranker, query, rank).",
    key=("ranker", "query_id", "rank"),
    columns=(
        Column("query_id", "string"),
        Column("ranker", "string", doc="The ranker (a system, an A/B variant, a rung of the world's ladder) that made the list."),
        Column("rank", "int32", min_value=1, doc="1-based position in the list (best first)."),
        Column("product_id", "string"),
    ),
)

ALL_TABLES: dict[str, Table] = {
    table.name: table
    for table in (
        CATALOG,
        QUERIES,
        SEARCH_IMPRESSIONS,
        JUDGMENTS,
        GOLD_NODES,
        EXPERIMENT_ASSIGNMENT,
        EXPERIMENT_EVENTS,
        QUARANTINE,
        RELEVANCE,
        QUERY_PRODUCT_STATS,
        CANDIDATE_PAIRS,
        PAIRS_TO_SCORE,
        PAIRS_FILE,
        PAIRS_FILE_WITH_TEXT,
        TRAINING_EXAMPLES,
        RANKED_LISTS,
    )
}

# Tables that arrive from outside and are validated before use (GE suites exist for each).
INPUT_TABLES: tuple[str, ...] = (
    "catalog",
    "queries",
    "search_impressions",
    "judgments",
    "gold_nodes",
    "experiment_assignment",
    "experiment_events",
)


def table(name: str) -> Table:
    try:
        return ALL_TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; known tables: {sorted(ALL_TABLES)}") from None
