"""`relevance score --date D`: the day's candidate pairs -> the `relevance` partition `ds=D`, incrementally.

Steps:

1. The day's `candidate_pairs` (written by `relevance prepare`) joined with the `catalog` in DuckDB
   give the pairs with their product text (`pairs_to_score`; the prompt's facets are the attributes
   plus the brand). A candidate whose product is not in the catalog is quarantined with the reason;
   counts reconcile: candidates = scored + reused + quarantined.
2. Incremental: a pair whose (query, product, product content hash) was already scored by the same
   model version (`jobs.scoring.backends.scorer_version`: the weights and the settings that change
   the label distribution) in a partition of the last `cache_days` days is not scored again; its
   latest row is carried into tonight's partition as it is (its `scored_at` says when it was scored).
   A pair without a content hash is always scored (nothing proves its text is unchanged).
3. The pairs left are sorted by key and cut into shards of `shard_size`, listed in a manifest
   (`<out>/_scoring/ds=D/<model version>/manifest.json`) with a fingerprint of the pairs. Each shard is
   scored (in this process, or across a Spark cluster with `engine=spark`), written to its own
   parquet file through a temporary name and an atomic rename, and only then marked done in the
   manifest (also replaced atomically). A job killed at any point (SIGKILL included) loses at most the
   shard in progress: the re-run finds the same fingerprint, skips the done shards and scores the
   rest. A different fingerprint (new candidates, new product text) starts the work folder afresh.
4. Reused rows + shard rows, each candidate exactly once (checked), replace the `ds=D` partition of
   `relevance` atomically; then the shards are removed and `score.json` reports the counts.

Re-running a finished day scores nothing and rewrites the same rows: idempotent per date.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.scoring.backends import BACKENDS, ScorerSpec, open_scorer, scorer_version
from schemas.config import ConfigError, config_date, config_to_dict, help_field
from schemas.storage import read_table, replace_file, table_path, write_table
from schemas.tables import CANDIDATE_PAIRS, CATALOG, PAIRS_TO_SCORE, QUARANTINE, RELEVANCE

log = logging.getLogger(__name__)

ENGINES = ("local", "spark")
WORK_FOLDER = "_scoring"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ScoreConfig:
    date: str = help_field("The day (YYYY-MM-DD) whose candidate_pairs are scored.")
    pairs: str = help_field("Data root holding `candidate_pairs` (written by `relevance prepare`).", "prepared")
    catalog: str = help_field("Data root holding the `catalog` (the product text scored).", "world")
    out: str = help_field("Data root of the `relevance` table (read for reuse, written for the day).", "scores")
    backend: str = help_field("Scoring backend: hf (transformers), vllm or student.", "hf")
    model: str = help_field("Model folder: a causal-LM policy (hf, vllm) or a distilled student folder.", "")
    model_name: str = help_field("Name written to the rows; default: the model folder's name.", "")
    graph: str = help_field("Reasoning graph the policy was trained with.", "relevance7")
    label_set: str = help_field("Label set the policy was trained with.", "wands")
    order: str = help_field("CoT order the policy was trained with: label_first or reasoning_first.", "label_first")
    prompt_tokens: int = help_field("Prompt token budget the policy was trained with.", 48)
    reasoning: str = help_field("Reasoning text kept: none (label_first: label step only), sample or all.", "none")
    reasoning_sample: float = help_field("Share of pairs whose reasoning is generated and kept with reasoning=sample.", 0.05)
    batch_size: int = help_field("Pairs per forward/generate batch (hf, student).", 64)
    max_new_tokens: int = help_field("Longest generated CoT.", 96)
    device: str = help_field("cpu, cuda or cuda:N (vllm: cuda:N makes only that GPU visible to the engine).", "cpu")
    dtype: str = help_field("Weights dtype of a policy: float32, bfloat16 or float16.", "float32")
    kv_cache_gib: float = help_field("vLLM: KV cache size in GiB.", 1.0)
    shard_size: int = help_field("Pairs per shard: the most work a killed job loses.", 2000)
    cache_days: int = help_field("Days of earlier partitions searched for reusable scores (0: never reuse).", 30)
    engine: str = help_field("local (this process) or spark (mapInArrow, one scorer per executor).", "local")
    spark_master: str | None = help_field("Spark master with engine=spark; default local[*] or spark-submit's.", None)
    spark_partitions: int = help_field("Spark partitions per shard with engine=spark (0: Spark's default parallelism).", 0)

    def __post_init__(self) -> None:
        config_date(self.date)
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if not self.model or not (Path(self.model) / "model.safetensors").is_file():
            raise ConfigError(f"model: {self.model!r} is not a model folder with model.safetensors")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError("shard_size and batch_size must be positive")
        if self.cache_days < 0:
            raise ConfigError(f"cache_days must be >= 0, got {self.cache_days}")

    @property
    def day(self) -> dt.date:
        return config_date(self.date)

    def spec(self) -> ScorerSpec:
        return ScorerSpec(
            backend=self.backend, model=self.model, model_name=self.model_name, graph=self.graph, label_set=self.label_set,
            order=self.order, prompt_tokens=self.prompt_tokens, reasoning=self.reasoning, reasoning_sample=self.reasoning_sample,
            batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, device=self.device, dtype=self.dtype,
            kv_cache_bytes=int(self.kv_cache_gib * (1 << 30)),
        )


# --- inputs ----------------------------------------------------------------------------------------


PAIRS_SQL = """
SELECT c.query, c.query_id, c.product_id, c.product_content_hash, p.title, p.product_type,
       CASE WHEN coalesce(p.brand, '') <> '' AND NOT map_contains(p.attributes, 'brand')
            THEN map_concat(p.attributes, MAP(['brand'], [p.brand])) ELSE p.attributes END AS attributes,
       p.description, p.product_id IS NULL AS missing_product
FROM candidates c LEFT JOIN catalog p ON c.product_id = p.product_id
ORDER BY c.query, c.product_id
"""


def pairs_to_score(candidates: pa.Table, catalog: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(pairs with product text, the candidates whose product the catalog lacks), both sorted by key."""
    import duckdb

    con = duckdb.connect()
    con.register("candidates", candidates)
    con.register("catalog", catalog)
    joined = con.sql(PAIRS_SQL).to_arrow_table()
    missing = joined["missing_product"]
    lost = joined.filter(missing).select(["query", "query_id", "product_id", "product_content_hash"])
    return PAIRS_TO_SCORE.conform(joined.filter(pc.invert(missing))), lost


def quarantine_rows(lost: pa.Table, source_file: str) -> pa.Table:
    now = dt.datetime.now(dt.timezone.utc)
    records = [json.dumps(row, sort_keys=True) for row in lost.to_pylist()]
    n = lost.num_rows
    return pa.Table.from_pydict({
        "source_table": ["candidate_pairs"] * n, "source_file": [source_file] * n, "row_number": [None] * n,
        "field": ["product_id"] * n, "reason": ["product not in the catalog: nothing to score"] * n, "record": records,
        "quarantined_at": [now] * n,
    }, schema=QUARANTINE.arrow_schema())


def reusable_scores(out: str | Path, day: dt.date, cache_days: int, version: str, pairs: pa.Table) -> pa.Table:
    """The latest RELEVANCE row of each pair in `pairs` scored under `version` with the same content hash
    within the last `cache_days` days (tonight's partition included), re-dated to `day`."""
    import duckdb

    from schemas.storage import partitions

    days = [d for d in partitions(RELEVANCE, out) if day - dt.timedelta(days=cache_days) <= d <= day] if cache_days else []
    if not days:
        return RELEVANCE.empty_arrow()
    history = read_table(RELEVANCE, out, days=days)
    con = duckdb.connect()
    con.register("history", history)
    con.register("pairs", pairs.select(["query", "product_id", "product_content_hash"]))
    reused = con.sql(f"""
        SELECT h.* REPLACE (DATE '{day.isoformat()}' AS ds)
        FROM history h JOIN pairs p
          ON h.query = p.query AND h.product_id = p.product_id AND h.product_content_hash = p.product_content_hash
        WHERE h.model_version = $version
        QUALIFY row_number() OVER (PARTITION BY h.query, h.product_id ORDER BY h.scored_at DESC, h.ds DESC) = 1
    """, params={"version": version}).to_arrow_table()
    return RELEVANCE.conform(reused)


# --- shards and their manifest ---------------------------------------------------------------------


def fingerprint(pairs: pa.Table) -> str:
    digest = hashlib.sha256()
    for row in pairs.select(["query", "product_id", "product_content_hash"]).to_pylist():
        digest.update(json.dumps([row["query"], row["product_id"], row["product_content_hash"]]).encode())
    return digest.hexdigest()


def write_json_atomically(path: Path, value: dict) -> None:
    replace_file(path, lambda staging: staging.write_text(json.dumps(value, indent=2, default=str)))


class ShardManifest:
    """The work folder of one day and model version: shard files and the manifest that says which are done."""

    def __init__(self, folder: Path, pairs: pa.Table, shard_size: int, context: dict) -> None:
        self.folder = folder
        self.path = folder / MANIFEST
        pairs_fingerprint = fingerprint(pairs)
        if self.path.is_file():
            manifest = json.loads(self.path.read_text())
            if manifest["fingerprint"] == pairs_fingerprint and manifest["shard_size"] == shard_size:
                self.manifest = manifest
                return
            log.warning("%s: the pairs to score changed since the last attempt; starting the shards afresh", folder)
            for stale in folder.glob("shard-*.parquet"):
                stale.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        n = pairs.num_rows
        self.manifest = {
            "fingerprint": pairs_fingerprint, "shard_size": shard_size, "pairs": n, **context,
            "shards": [{"shard": k, "start": start, "stop": min(start + shard_size, n), "attempts": 0, "done": False}
                       for k, start in enumerate(range(0, n, shard_size))],
        }
        self.save()

    def save(self) -> None:
        write_json_atomically(self.path, self.manifest)

    def file(self, shard: dict) -> Path:
        return self.folder / f"shard-{shard['shard']:05d}.parquet"

    def pending(self) -> list[dict]:
        return [shard for shard in self.manifest["shards"] if not (shard["done"] and self.file(shard).is_file())]

    def started(self, shard: dict) -> None:
        shard["attempts"] += 1
        shard["done"] = False
        self.save()

    def finished(self, shard: dict, rows: pa.Table, seconds: float) -> None:
        replace_file(self.file(shard), lambda staging: pq.write_table(RELEVANCE.conform(rows), staging))
        shard.update(done=True, rows=rows.num_rows, seconds=round(seconds, 3))
        self.save()

    def rows(self) -> pa.Table:
        parts = [pq.read_table(self.file(shard), schema=RELEVANCE.arrow_schema()) for shard in self.manifest["shards"]]
        return pa.concat_tables(parts) if parts else RELEVANCE.empty_arrow()

    def remove_shards(self) -> None:
        shutil.rmtree(self.folder)  # shards, manifest and any staging file a killed attempt left


def pair_dicts(pairs: pa.Table) -> list[dict]:
    """Scorer input: one dict per pair, the facets as a dict."""
    return [{**row, "attributes": dict(row["attributes"])} for row in pairs.to_pylist()]


# --- the job ---------------------------------------------------------------------------------------


def score_shards(config: ScoreConfig, manifest: ShardManifest, todo: pa.Table) -> None:
    """Score every pending shard, in this process or on Spark, reporting progress per shard."""
    pending = manifest.pending()
    if not pending:
        return
    spec = config.spec()
    spark = scorer = None
    if config.engine == "spark":
        from jobs.scoring.spark import score_with_spark
        from jobs.spark import get_spark

        spark = get_spark("relevance-score", master=config.spark_master)
    else:
        scorer = open_scorer(spec)
    done_pairs, total = todo.num_rows - sum(s["stop"] - s["start"] for s in pending), todo.num_rows
    started_all = time.perf_counter()
    try:
        for shard in pending:
            manifest.started(shard)
            pairs = todo.slice(shard["start"], shard["stop"] - shard["start"])
            started = time.perf_counter()
            if spark is not None:
                rows = score_with_spark(spark, pairs, spec, config.day, partitions=config.spark_partitions or None)
            else:
                rows = scorer.score(pair_dicts(pairs), config.day)
            seconds = time.perf_counter() - started
            manifest.finished(shard, rows, seconds)
            done_pairs += pairs.num_rows
            elapsed = time.perf_counter() - started_all
            print(f"score: shard {shard['shard'] + 1}/{len(manifest.manifest['shards'])} done ({pairs.num_rows} pairs, "
                  f"{pairs.num_rows / seconds:.1f} pairs/s); {done_pairs}/{total} pairs, {elapsed:.0f} s", flush=True)
    finally:
        if scorer is not None:
            scorer.close()


def run(config: ScoreConfig) -> dict:
    """Score the day; returns (and writes as `_scoring/ds=D/score.json`) the counts and timings."""
    started = time.perf_counter()
    day = config.day
    candidates = read_table(CANDIDATE_PAIRS, config.pairs, days=[day])
    if candidates.num_rows == 0:
        raise ValueError(f"{table_path(config.pairs, CANDIDATE_PAIRS)}: no candidate pairs for ds={day} (run `relevance prepare --date {day}`)")
    pairs, lost = pairs_to_score(candidates, read_table(CATALOG, config.catalog))
    day_folder = Path(config.out) / WORK_FOLDER / f"ds={day.isoformat()}"
    if lost.num_rows:
        log.warning("score: %d candidate pairs name products missing from the catalog; quarantined", lost.num_rows)
        write_table(QUARANTINE, quarantine_rows(lost, str(table_path(config.pairs, CANDIDATE_PAIRS))), day_folder)
    spec = config.spec()
    version = scorer_version(spec)
    reused = reusable_scores(config.out, day, config.cache_days, version, pairs)
    reused_keys = set(zip(reused["query"].to_pylist(), reused["product_id"].to_pylist()))
    todo = pairs.filter(pa.array([key not in reused_keys for key in zip(pairs["query"].to_pylist(), pairs["product_id"].to_pylist())]))
    print(f"score: {candidates.num_rows} candidate pairs for {day}: {reused.num_rows} reused (model version {version}), "
          f"{todo.num_rows} to score, {lost.num_rows} quarantined", flush=True)
    manifest = ShardManifest(day_folder / version, todo, config.shard_size,
                             {"ds": day.isoformat(), "model_version": version, "config": config_to_dict(config)})
    score_shards(config, manifest, todo)
    scored = manifest.rows()
    rows = pa.concat_tables([reused, scored]).sort_by([("query", "ascending"), ("product_id", "ascending")])
    keys = list(zip(rows["query"].to_pylist(), rows["product_id"].to_pylist()))
    if len(set(keys)) != len(keys) or len(keys) != pairs.num_rows:
        raise RuntimeError(f"score: {len(keys)} rows ({len(set(keys))} distinct pairs) for {pairs.num_rows} pairs to score; "
                           f"the work folder {manifest.folder} is left for inspection")
    write_table(RELEVANCE, rows, config.out)
    shard_stats = manifest.manifest["shards"]
    manifest.remove_shards()
    seconds_scoring = sum(shard.get("seconds", 0.0) for shard in shard_stats)
    report = {
        "ds": day.isoformat(), "backend": config.backend, "engine": config.engine, "model_name": spec.name, "model_version": version,
        "candidates": candidates.num_rows, "reused": reused.num_rows, "scored": scored.num_rows, "quarantined": lost.num_rows,
        "shards": len(shard_stats), "shard_attempts": [shard["attempts"] for shard in shard_stats],
        "scoring_seconds": round(seconds_scoring, 2), "pairs_per_second": round(scored.num_rows / seconds_scoring, 2) if seconds_scoring else None,
        "seconds": round(time.perf_counter() - started, 2), "relevance": str(table_path(config.out, RELEVANCE) / f"ds={day.isoformat()}"),
    }
    write_json_atomically(day_folder / "score.json", report)
    print(f"score: ds={day} written to {report['relevance']}: {scored.num_rows} scored, {reused.num_rows} reused, "
          f"{lost.num_rows} quarantined ({report['seconds']:.1f} s); report {day_folder / 'score.json'}", flush=True)
    return report
