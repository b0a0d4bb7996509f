"""`relevance score --date D`: the day's candidate pairs, or any pairs in a file, -> the `relevance` partition
`ds=D`, incrementally.

Steps:

1. The day's `candidate_pairs` (written by `relevance prepare`) joined with the `catalog` in DuckDB
   give the pairs with their product text (`pairs_to_score`; the prompt's facets are the attributes
   plus the brand). A candidate whose product is not in the catalog is quarantined with the reason.
   With `pairs` naming a .csv or .parquet file instead of a data root, the pairs are that file's
   (`jobs.scoring.pairs_file`: its columns checked against the declared ones, bad rows quarantined,
   product text from the catalog or the file). Either way the quarantine rows replace the day's
   (`<out>/_scoring/ds=D/quarantine`) and counts reconcile: read = scored + reused + quarantined.
2. Incremental: a pair whose (query, product, product content hash) was already scored by the same
   model version (`jobs.scoring.spec.scorer_version`: the weights and the settings that change
   the label distribution) in a partition of the last `cache_days` days is not scored again; its
   latest row is carried into tonight's partition as it is (its `scored_at` says when it was scored).
   A pair without a content hash is always scored (nothing proves its text is unchanged).
3. The pairs left are sorted by key and cut into shards of `shard_size`, listed in a manifest
   (`<out>/_scoring/ds=D/<model version>/manifest.json`) with a fingerprint of the pairs. Each shard is
   scored in this process, written to its own
   parquet file through a temporary name and an atomic rename, and only then marked done in the
   manifest (also replaced atomically). A job killed at any point (SIGKILL included) loses at most the
   shard in progress: the re-run finds the same fingerprint, skips the done shards and scores the
   rest. A different fingerprint (new candidates, new product text) starts the work folder afresh.
4. Reused rows + shard rows, each candidate exactly once (checked), replace this model's rows of the
   `ds=D` partition of `relevance`: a night may hold several models (a policy and its student), so the
   rows other model names hold there are kept, and the partition folder is replaced atomically with
   both. Then the shards are removed and `score.json` reports the counts. (So a pairs file scored
   into a night's `out` and date replaces that night's rows of the model: give a file its own `out`.)

The model folder is checked (files present, weights complete) before anything is read, and the job
holds the lock of its `out` root and date (`jobs.lock`) from then on: a second `score`, `nightly` step
or `export` of that root and date fails at once instead of scoring the same pairs or removing
shards the other is reading. Re-running a finished day scores nothing and rewrites the same rows:
idempotent per date.

With `engine=spark` the same steps run on Spark and the executors write the rows; the driver holds counts
only (`jobs.scoring.spark`: shards by hash of the pair, one file per task attempt, committed per shard).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from jobs.lock import date_lock
from jobs.quarantine import quarantine_table
from jobs.scoring.config import ScoreConfig
from jobs.scoring.pairs_file import ScoringInput, is_pairs_file, read_pairs_file
from jobs.scoring.shards import ShardManifest, write_json_atomically
from jobs.scoring.spec import ScorerSpec, check_model_folder, open_scorer, pair_dicts, scorer_version
from schemas.config import config_to_dict
from schemas.logs import progress
from schemas.storage import partitions, read_table, table_path, write_table
from schemas.tables import CANDIDATE_PAIRS, CATALOG, PAIRS_TO_SCORE, QUARANTINE, RELEVANCE

log = logging.getLogger(__name__)

WORK_FOLDER = "_scoring"


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


def reusable_scores(out: str | Path, day: dt.date, cache_days: int, version: str, model_name: str, pairs: pa.Table) -> pa.Table:
    """The latest RELEVANCE row of each pair in `pairs` scored under `version` with the same content hash
    within the last `cache_days` days (tonight's partition included), re-dated to `day` and named `model_name`
    (the same weights may have been scored under another name)."""
    import duckdb

    days = [d for d in partitions(RELEVANCE, out) if day - dt.timedelta(days=cache_days) <= d <= day] if cache_days else []
    if not days:
        return RELEVANCE.empty_arrow()
    history = read_table(RELEVANCE, out, days=days)
    con = duckdb.connect()
    con.register("history", history)
    con.register("pairs", pairs.select(["query", "product_id", "product_content_hash"]))
    reused = con.sql(f"""
        SELECT h.* REPLACE (DATE '{day.isoformat()}' AS ds, $model_name AS model_name)
        FROM history h JOIN pairs p
          ON h.query = p.query AND h.product_id = p.product_id AND h.product_content_hash = p.product_content_hash
        WHERE h.model_version = $version
        QUALIFY row_number() OVER (PARTITION BY h.query, h.product_id ORDER BY h.scored_at DESC, h.ds DESC) = 1
    """, params={"version": version, "model_name": model_name}).to_arrow_table()
    return RELEVANCE.conform(reused)


def day_pairs(config: ScoreConfig, quarantined_at: dt.datetime) -> ScoringInput:
    """The day's candidates as pairs with product text, and the quarantine rows of those without a product."""
    day = config.day
    candidates = read_table(CANDIDATE_PAIRS, config.pairs, days=[day])
    if candidates.num_rows == 0:
        raise ValueError(f"{table_path(config.pairs, CANDIDATE_PAIRS)}: no candidate pairs for ds={day} (run `relevance prepare --date {day}`)")
    pairs, lost = pairs_to_score(candidates, read_table(CATALOG, config.catalog))
    if lost.num_rows:
        log.warning("score: %d candidate pairs name products missing from the catalog; quarantined", lost.num_rows)
    quarantine = quarantine_table(CANDIDATE_PAIRS.name, lost.to_pylist(), "product_id", "product not in the catalog: nothing to score",
                                  quarantined_at, source_file=str(table_path(config.pairs, CANDIDATE_PAIRS)))
    return ScoringInput(candidates.num_rows, pairs, quarantine)


def score_input(config: ScoreConfig) -> tuple[str, ScoringInput]:
    """(what was read, for the progress line; its pairs to score and the quarantine rows of the rest): the pairs
    file `config.pairs` names, or the day's candidate pairs under that root."""
    quarantined_at = dt.datetime.now(dt.UTC)
    if Path(config.pairs).is_file() and not is_pairs_file(config.pairs):
        raise ValueError(f"{config.pairs}: a pairs file is read by its suffix, .csv or .parquet; a data root is a folder")
    if is_pairs_file(config.pairs):
        read = read_pairs_file(config.pairs, config.catalog, quarantined_at)
        if read.read == 0:
            raise ValueError(f"{config.pairs}: no pairs to score (a header and no data rows)")
        return f"{read.read} pairs in {config.pairs}", read
    read = day_pairs(config, quarantined_at)
    return f"{read.read} candidate pairs for {config.day}", read


def keys(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table["query"].to_pylist(), table["product_id"].to_pylist()))


def without_reused(pairs: pa.Table, reused: pa.Table) -> pa.Table:
    """The pairs `reused` holds no row of, in their order."""
    reused_keys = set(keys(reused))
    return pairs.filter(pa.array([key not in reused_keys for key in keys(pairs)]))


# --- the job ---------------------------------------------------------------------------------------


@contextmanager
def shard_scoring(config: ScoreConfig, spec: ScorerSpec) -> Iterator[Callable[[pa.Table], pa.Table]]:
    """A function from one shard's pairs to their RELEVANCE rows: one scorer in this process (closed on exit)."""
    scorer = open_scorer(spec)
    try:
        yield lambda pairs: scorer.score(pair_dicts(pairs), config.day)
    finally:
        scorer.close()


def score_shards(config: ScoreConfig, spec: ScorerSpec, manifest: ShardManifest, todo: pa.Table) -> None:
    """Score every pending shard, reporting progress per shard."""
    pending = manifest.pending()
    if not pending:
        return
    done_pairs, total = todo.num_rows - sum(s["stop"] - s["start"] for s in pending), todo.num_rows
    shards = len(manifest.manifest["shards"])
    with shard_scoring(config, spec) as score, progress(desc="score", total=total, initial=done_pairs, unit="pair") as bar:
        for shard in pending:
            manifest.started(shard)
            pairs = todo.slice(shard["start"], shard["stop"] - shard["start"])
            started = time.perf_counter()
            rows = score(pairs)
            seconds = time.perf_counter() - started
            manifest.finished(shard, rows, seconds)
            bar.set_postfix(shard=f"{shard['shard'] + 1}/{shards}")
            bar.update(pairs.num_rows)


def day_rows(reused: pa.Table, scored: pa.Table, n_pairs: int, work_folder: Path) -> pa.Table:
    """Reused and scored rows sorted by key, checked to hold each of the day's `n_pairs` pairs exactly once."""
    rows = pa.concat_tables([reused, scored]).sort_by([("query", "ascending"), ("product_id", "ascending")])
    row_keys = keys(rows)
    if len(set(row_keys)) != len(row_keys) or len(row_keys) != n_pairs:
        raise RuntimeError(f"score: {len(row_keys)} rows ({len(set(row_keys))} distinct pairs) for {n_pairs} pairs to score; "
                           f"the work folder {work_folder} is left for inspection")
    return rows


def with_other_models(out: str | Path, day: dt.date, model_name: str, rows: pa.Table) -> pa.Table:
    """`rows` (one model's rows of `day`) plus the rows other model names hold in the stored partition of `day`."""
    if day not in partitions(RELEVANCE, out):
        return rows
    stored = read_table(RELEVANCE, out, days=[day])
    others = stored.filter(pc.not_equal(stored["model_name"], model_name))
    return pa.concat_tables([RELEVANCE.conform(others), rows]).sort_by(
        [("query", "ascending"), ("product_id", "ascending"), ("model_name", "ascending")])


def run(config: ScoreConfig) -> dict:
    """Score the day under the lock of `out` and the day; returns (and writes as `_scoring/ds=D/score.json`) the
    counts and timings."""
    spec = config.spec()
    check_model_folder(spec)
    with date_lock(config.out, config.day, "score"):
        return score_day(config, spec)


def score_day(config: ScoreConfig, spec: ScorerSpec) -> dict:
    if config.engine == "spark":  # the same steps on Spark's executors: `jobs.scoring.spark`
        from jobs.scoring.spark import score_day_on_spark

        file_input = score_input(config) if is_pairs_file(config.pairs) or Path(config.pairs).is_file() else None
        return score_day_on_spark(config, spec, WORK_FOLDER, file_input)
    started = time.perf_counter()
    day = config.day
    day_folder = Path(config.out) / WORK_FOLDER / f"ds={day.isoformat()}"
    described, (read, pairs, quarantine) = score_input(config)
    write_table(QUARANTINE, quarantine, day_folder)  # even empty: no row an earlier run quarantined is left to mislead
    version = scorer_version(spec)
    reused = reusable_scores(config.out, day, config.cache_days, version, spec.name, pairs)
    todo = without_reused(pairs, reused)
    log.info("score: %s: %d reused (model version %s), %d to score, %d quarantined", described, reused.num_rows, version,
             todo.num_rows, quarantine.num_rows)
    manifest = ShardManifest(day_folder / version, todo, config.shard_size,
                             {"ds": day.isoformat(), "model_version": version, "config": config_to_dict(config)})
    score_shards(config, spec, manifest, todo)
    scored = manifest.rows()
    rows = day_rows(reused, scored, pairs.num_rows, manifest.folder)
    write_table(RELEVANCE, with_other_models(config.out, day, spec.name, rows), config.out)
    shard_stats = manifest.manifest["shards"]
    manifest.remove_shards()
    seconds_scoring = sum(shard.get("seconds", 0.0) for shard in shard_stats)
    report = {
        "ds": day.isoformat(), "backend": config.backend, "engine": config.engine, "model_name": spec.name, "model_version": version,
        "pairs": config.pairs, "candidates": read, "reused": reused.num_rows, "scored": scored.num_rows, "quarantined": quarantine.num_rows,
        "shards": len(shard_stats), "shard_attempts": [shard["attempts"] for shard in shard_stats],
        "scoring_seconds": round(seconds_scoring, 2), "pairs_per_second": round(scored.num_rows / seconds_scoring, 2) if seconds_scoring else None,
        "seconds": round(time.perf_counter() - started, 2), "relevance": str(table_path(config.out, RELEVANCE) / f"ds={day.isoformat()}"),
    }
    write_json_atomically(day_folder / "score.json", report)
    log.info("score: ds=%s written to %s: %d scored, %d reused, %d quarantined (%.1f s); report %s", day, report["relevance"],
             scored.num_rows, reused.num_rows, quarantine.num_rows, report["seconds"], day_folder / "score.json")
    return report
