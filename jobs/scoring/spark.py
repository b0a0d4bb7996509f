"""`relevance score` with engine=spark: the night scored and written by Spark's executors; the driver holds counts.

The same steps as the in-process job (`jobs.scoring.run`), each a DataFrame transform:

1. Pairs: the day's `candidate_pairs` read with the declared schema (each file's own schema checked from
   its footer first) and left-joined with the `catalog` on Spark (`pairs_frame`, the prompt's facets are
   the attributes plus the brand, as in the DuckDB join); candidates without a product become QUARANTINE
   rows written by Spark. A pairs file (`jobs.scoring.pairs_file`) is read and checked on the driver, as
   in-process (its row checks name file and row), and handed to Spark as a DataFrame.
2. Reuse: the `relevance` partitions of the last `cache_days` days read on Spark, joined on (query,
   product_id, product_content_hash) and the model version, the latest row per pair kept (`reused_frame`).
   The pairs left anti-joined with them are tonight's work.
3. Shards: each pair's shard is `pmod(xxhash64(query, product_id), shards)` with `shards =
   ceil(pairs / shard_size)`, a function of the pair alone, so a re-run cuts the same shards. The manifest
   (`<out>/_scoring/ds=D/<model version>/manifest.json`) holds the fingerprint of the pairs (count and sum of
   their hashes, one aggregate) and each shard's pair count (one groupBy): the driver sees numbers only.
4. Scoring and the commit protocol: the pending shards' pairs, hash-partitioned by shard into `partitions`
   tasks and sorted by shard within each, go through `mapInArrow` (`score_shards_of_task`). A task scores a
   shard's pairs in chunks through its worker's scorer (one per Python worker, opened on the first chunk,
   placed on the task's GPU: `task_scorer`) and streams them into a file named after the task attempt
   (`attempts/shard-K/<stage>-<partition>.<attempt>-<taskAttemptId>.parquet`, written under a hidden name
   and renamed when complete: the attempt's commit of that shard). It returns one summary row per shard
   (shard, file, rows, seconds, the task's GPU addresses), the only rows the driver collects. The driver then commits the job: for each
   shard, the file of the attempt Spark reports successful is renamed to `shard-K.parquet` and every
   other attempt's file (a failed attempt, a speculative duplicate) is deleted. So a retried or
   speculative task leaves neither a duplicate nor a partial file, and only committed shards are read.
5. Resume: a re-run with the same fingerprint keeps the committed shards and adopts, for a shard the
   driver did not get to commit (killed), a complete attempt file with the shard's pair count (every
   complete attempt holds all of its shard's pairs, scored); only the other shards are scored. A
   different fingerprint, or a work folder without its manifest, starts the work folder afresh.
6. The day: reused rows + committed shard rows, checked in one aggregate to hold each pair once, plus the
   rows other model names hold in the stored partition, written by Spark into a hidden sibling of
   `relevance/ds=D` that is swapped in (`schemas.storage.replace_folder`), then the work folder removed. A re-run
   of a finished night (nothing to score, every reused row taken from tonight's partition under this model name, as
   many as the partition holds for it) leaves the partition as it is: rewriting it would write the same rows.

The work folder must be on storage every executor and the driver share with atomic renames (a local
disk in local mode, NFS or HDFS mounted at the same path on a cluster).

On a GPU cluster: one executor per GPU, one task per GPU, so each GPU holds one engine:

    spark-submit --master yarn|k8s://... --py-files relevance.zip \\
        --conf spark.executor.resource.gpu.amount=1 \\
        --conf spark.task.resource.gpu.amount=1 \\
        --conf spark.executor.resource.gpu.discoveryScript=/opt/spark/examples/src/main/scripts/getGpusResources.sh \\
        --conf spark.executor.cores=4 --conf spark.task.cpus=4 \\
        --conf spark.python.worker.reuse=true \\
        jobs/submit.py score --set engine=spark --set device=cuda --set date=... --set model=...

A fractional `spark.task.resource.gpu.amount` would run several tasks, hence several engines, on
one GPU. The model folder must be readable at the same path on every executor (shared storage or
shipped with `--archives`), and the code shipped with `--py-files` so that workers import this module
(the scorer cache lives in it). Torch uses `spark.task.cpus` threads per task.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.quarantine import quarantine_frame, record_json
from jobs.scoring.config import ScoreConfig
from jobs.scoring.pairs_file import ScoringInput
from jobs.scoring.shards import write_json_atomically
from jobs.scoring.spec import Scorer, ScorerSpec, open_scorer, pair_dicts, scorer_version
from jobs.spark import empty_frame, spark_schema
from schemas.config import config_to_dict
from schemas.storage import dataset, partitions, replace_folder, table_path
from schemas.tables import CANDIDATE_PAIRS, CATALOG, PAIRS_TO_SCORE, QUARANTINE, RELEVANCE

log = logging.getLogger(__name__)

# Chunk = this many scorer batches: enough for length sorting to pay, few enough to stay in memory.
CHUNK_BATCHES = 8
SHARD = "shard"
IN_PLACE = "_in_place"  # a reused row that already stands in tonight's partition under tonight's model name
ATTEMPTS = "attempts"
MANIFEST = "manifest.json"
# What a task returns per shard it wrote: the driver's only view of the scored rows. `gpus`: the GPU addresses Spark
# gave the task (comma-separated, empty without GPU scheduling), so the report shows where each shard was scored.
SUMMARY_DDL = "shard INT, file STRING, rows BIGINT, seconds DOUBLE, gpus STRING"

# The scorer this Python worker holds, by the spec it was opened with (placed on this worker's device).
_WORKER_SCORERS: dict[ScorerSpec, Scorer] = {}


# --- the pairs, the reuse cache and the shards (DataFrame transforms) ----------------------------------------


def pairs_frame(candidates, catalog):
    """(PAIRS_TO_SCORE frame, the candidates whose product the catalog lacks) of CANDIDATE_PAIRS and CATALOG frames."""
    from pyspark.sql import functions as F

    products = catalog.select("product_id", "title", "product_type", "attributes", "description", "brand",
                              F.lit(True).alias("in_catalog"))
    joined = candidates.join(products, on="product_id", how="left")
    has_brand = F.coalesce(F.col("brand"), F.lit("")) != ""
    brand_missing_from_facets = has_brand & ~F.map_contains_key(F.col("attributes"), F.lit("brand"))
    facets = F.when(brand_missing_from_facets, F.map_concat(F.col("attributes"), F.create_map(F.lit("brand"), F.col("brand"))))
    found = F.col("in_catalog").isNotNull()
    pairs = joined.where(found).withColumn("attributes", facets.otherwise(F.col("attributes")))
    return pairs.select(*PAIRS_TO_SCORE.names), joined.where(~found).select(*CANDIDATE_PAIRS.names)


def reused_frame(history, pairs, version: str, day: dt.date, model_name: str):
    """The latest RELEVANCE row of each pair of `pairs` that `history` holds under `version` with the same content
    hash, re-dated to `day` and named `model_name` (see `jobs.scoring.run.reusable_scores`), with IN_PLACE: whether the
    row already stands in `day`'s partition under `model_name`."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    match = ["query", "product_id", "product_content_hash"]
    latest_first = Window.partitionBy("query", "product_id").orderBy(F.col("scored_at").desc(), F.col("ds").desc())
    same_version = history.where(F.col("model_version") == F.lit(version))
    reused = (same_version.join(pairs.select(*match), on=match, how="inner")
              .withColumn("_rank", F.row_number().over(latest_first)).where(F.col("_rank") == 1)
              .withColumn(IN_PLACE, (F.col("ds") == F.lit(day)) & (F.col("model_name") == F.lit(model_name)))
              .withColumn("ds", F.lit(day)).withColumn("model_name", F.lit(model_name)))
    return reused.select(*RELEVANCE.names, IN_PLACE)


def with_shards(pairs, shards: int):
    """`pairs` with the `shard` each belongs to: a function of (query, product_id) and the number of shards."""
    from pyspark.sql import functions as F

    return pairs.withColumn(SHARD, F.pmod(F.xxhash64("query", "product_id"), F.lit(shards)).cast("int"))


def shard_pair_counts(pairs) -> dict[int, int]:
    """The pairs of each shard of `pairs` (with their `shard`), in one groupBy."""
    return {row[SHARD]: row["count"] for row in pairs.groupBy(SHARD).count().collect()}


def fingerprint_and_count(pairs) -> tuple[str, int]:
    """(a fingerprint of the pairs' keys and content hashes, their count), in one aggregate."""
    from pyspark.sql import functions as F

    hashed = F.xxhash64("query", "product_id", F.coalesce("product_content_hash", F.lit(""))).cast("decimal(38,0)")
    row = pairs.agg(F.count(F.lit(1)).alias("pairs"), F.sum(hashed).alias("hash_sum")).first()
    return f"{row['pairs']}:{row['hash_sum'] or 0}", row["pairs"]


# --- one task: score its shards and commit each as this attempt's file --------------------------------------


def attempt_name(context) -> str:
    """This task attempt's own file name: unique across retries, speculative copies and stage re-runs."""
    return f"{context.stageId()}-{context.partitionId()}.{context.attemptNumber()}-{context.taskAttemptId()}"


def shard_folder(work: Path, shard: int) -> Path:
    return work / ATTEMPTS / f"shard-{shard:05d}"


def committed_file(work: Path, shard: int) -> Path:
    return work / f"shard-{shard:05d}.parquet"


class ShardWriter:
    """One shard's pairs scored in chunks and streamed into this attempt's file, renamed into place when complete."""

    def __init__(self, work: Path, shard: int, attempt: str, score: Callable[[Sequence[dict]], pa.Table], chunk_size: int):
        self.shard, self.score, self.chunk_size = shard, score, chunk_size
        self.final = shard_folder(work, shard) / f"{attempt}.parquet"
        self.staging = self.final.with_name(f".{self.final.name}.inprogress")  # hidden: no reader lists it
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(self.staging, RELEVANCE.arrow_schema())
        self.pending: list[dict] = []
        self.rows, self.started = 0, time.perf_counter()

    def add(self, pairs: pa.Table) -> None:
        self.pending.extend(pair_dicts(pairs))
        while len(self.pending) >= self.chunk_size:
            self.write(self.pending[: self.chunk_size])
            self.pending = self.pending[self.chunk_size :]

    def write(self, pairs: Sequence[dict]) -> None:
        scored = RELEVANCE.conform(self.score(pairs))
        if scored.num_rows != len(pairs):
            raise RuntimeError(f"shard {self.shard}: the scorer returned {scored.num_rows} rows for {len(pairs)} pairs")
        self.writer.write_table(scored)
        self.rows += scored.num_rows

    def commit(self) -> dict:
        if self.pending:
            self.write(self.pending)
        self.writer.close()
        os.replace(self.staging, self.final)
        return {SHARD: self.shard, "file": str(self.final), "rows": self.rows, "seconds": time.perf_counter() - self.started}


def score_shards_of_task(batches: Iterator[pa.RecordBatch], spec: ScorerSpec, day: dt.date, work: Path,
                         scorer_for_task: Callable[[ScorerSpec, object], Scorer]) -> Iterator[pa.RecordBatch]:
    """One task's work: its pairs (sorted by shard) scored shard by shard, each shard committed as this attempt's file;
    one summary row per shard."""
    from pyspark import TaskContext

    context = TaskContext.get()
    attempt = attempt_name(context)
    gpu = context.resources().get("gpu")
    gpus = ",".join(gpu.addresses) if gpu else ""
    summary_schema = pa.schema([(SHARD, pa.int32()), ("file", pa.string()), ("rows", pa.int64()), ("seconds", pa.float64()),
                                ("gpus", pa.string())])

    def committed(writer: ShardWriter) -> pa.RecordBatch:
        return pa.RecordBatch.from_pylist([{**writer.commit(), "gpus": gpus}], schema=summary_schema)

    writer: ShardWriter | None = None
    for batch in batches:
        shards = batch.column(SHARD).to_numpy()
        boundaries = [0, *(i for i in range(1, len(shards)) if shards[i] != shards[i - 1]), len(shards)]
        for start, stop in zip(boundaries, boundaries[1:]):
            shard = int(shards[start])
            if writer is not None and writer.shard != shard:
                yield committed(writer)
                writer = None
            if writer is None:
                scorer = scorer_for_task(spec, context)  # opened here, so a task without pairs loads no model
                writer = ShardWriter(work, shard, attempt, lambda pairs, scorer=scorer: scorer.score(pairs, day),
                                     spec.batch_size * CHUNK_BATCHES)
            writer.add(pa.Table.from_batches([batch.slice(start, stop - start)]).drop_columns([SHARD]))
    if writer is not None:
        yield committed(writer)


def task_scorer(spec: ScorerSpec, context) -> Scorer:
    """This worker's scorer for `spec` on the task's device, with torch on the task's CPUs.

    A worker holds one scorer: a different spec (another model, or another GPU) closes the one held.
    """
    import torch

    torch.set_num_threads(context.cpus())
    gpu = context.resources().get("gpu")
    placed = dataclasses.replace(spec, device=task_device(spec.device, gpu.addresses if gpu else ()))
    if placed not in _WORKER_SCORERS:
        for held in _WORKER_SCORERS.values():
            held.close()
        _WORKER_SCORERS.clear()
        _WORKER_SCORERS[placed] = open_scorer(placed)
    return _WORKER_SCORERS[placed]


def task_device(device: str, gpu_addresses: Sequence[str]) -> str:
    """The device a scorer of a task opens on: `cuda` -> `cuda:<the task's GPU>`, anything else as given."""
    if device != "cuda":
        return device
    if len(gpu_addresses) != 1:
        raise RuntimeError(
            f"device 'cuda' needs exactly one GPU per task, this task has {list(gpu_addresses)}: set "
            "spark.executor.resource.gpu.amount=1 and spark.task.resource.gpu.amount=1 (one engine per GPU), or pin "
            "the spec to a device such as 'cuda:0'"
        )
    return f"cuda:{gpu_addresses[0]}"


# --- the driver: the work folder, the job commit, resume ------------------------------------------------------


def file_rows(path: Path) -> int | None:
    """Rows of a complete parquet file (None: not readable)."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException):
        return None


class ShardWork:
    """The work folder of one day and model version on Spark: manifest, committed shard files, attempt files."""

    def __init__(self, folder: Path, fingerprint: str, shard_pairs: Callable[[], dict[int, int]], shard_size: int, context: dict):
        self.folder, self.path = folder, folder / MANIFEST
        if self.path.is_file():
            manifest = json.loads(self.path.read_text())
            if manifest.get("fingerprint") == fingerprint and manifest.get("shard_size") == shard_size and "shard_pairs" in manifest:
                self.manifest = manifest
                return
            log.warning(f"score: {folder}: the pairs to score changed since the last attempt; starting the shards afresh")
        # Files without their manifest (a removal killed midway, a speculative copy finishing after it) may hold other pairs.
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        counts = shard_pairs()
        self.manifest = {"fingerprint": fingerprint, "shard_size": shard_size, "engine": "spark", **context,
                         "shard_pairs": {str(shard): counts[shard] for shard in sorted(counts)}}
        write_json_atomically(self.path, self.manifest)

    def expected(self) -> dict[int, int]:
        return {int(shard): pairs for shard, pairs in self.manifest["shard_pairs"].items()}

    def commit(self, shard: int, attempt_file: Path) -> None:
        """Make `attempt_file` shard `shard`'s committed file and delete every other attempt of it."""
        os.replace(attempt_file, committed_file(self.folder, shard))
        shutil.rmtree(shard_folder(self.folder, shard), ignore_errors=True)

    def committed(self) -> set[int]:
        """Shards with a committed file; a shard whose attempt completed but was not committed (the job was killed
        before its commit) is committed now from its first complete attempt file."""
        done = set()
        for shard, pairs in self.expected().items():
            if file_rows(committed_file(self.folder, shard)) == pairs:
                done.add(shard)
                continue
            complete = [path for path in sorted(shard_folder(self.folder, shard).glob("*.parquet")) if file_rows(path) == pairs]
            if complete:
                self.commit(shard, complete[0])
                done.add(shard)
        return done

    def commit_job(self, summaries: list, expected: dict[int, int]) -> None:
        """Commit the shards of the attempts Spark reports successful, checking each holds all of its shard's pairs."""
        for summary in summaries:
            shard = summary[SHARD]
            if summary["rows"] != expected[shard]:
                raise RuntimeError(f"score: shard {shard} scored {summary['rows']} rows for {expected[shard]} pairs; "
                                   f"the work folder {self.folder} is left for inspection")
            self.commit(shard, Path(summary["file"]))

    def files(self) -> list[str]:
        return [str(committed_file(self.folder, shard)) for shard in sorted(self.expected())]


def score_pending_shards(todo, spec: ScorerSpec, day: dt.date, work: ShardWork, pending: list[int], partitions: int,
                         scorer_for_task: Callable[[ScorerSpec, object], Scorer] = task_scorer) -> dict:
    """Score the `pending` shards of `todo` (pairs with their shard) in at most `partitions` tasks and commit them;
    returns the job's counts and timings."""
    from pyspark.sql import functions as F

    folder = work.folder

    def score_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        return score_shards_of_task(batches, spec, day, folder, scorer_for_task)

    started = time.perf_counter()
    tasks = max(1, min(partitions, len(pending)))
    pairs = todo.where(F.col(SHARD).isin(pending)).repartition(tasks, SHARD).sortWithinPartitions(SHARD)
    summaries = [row.asDict() for row in pairs.mapInArrow(score_partition, SUMMARY_DDL).collect()]  # one row per shard
    work.commit_job(summaries, work.expected())
    seconds = time.perf_counter() - started
    scored = sum(summary["rows"] for summary in summaries)
    by_gpu = Counter(summary["gpus"] for summary in summaries if summary["gpus"])
    return {"scored": scored, "tasks": tasks, "seconds": seconds, "task_seconds": sum(summary["seconds"] for summary in summaries),
            "shards_by_gpu": dict(sorted(by_gpu.items()))}


def score_todo(todo, fingerprint: str, to_score: int, spec: ScorerSpec, day: dt.date, folder: Path, shard_size: int, partitions: int,
               context: dict, scorer_for_task: Callable[[ScorerSpec, object], Scorer] = task_scorer) -> tuple[ShardWork, dict]:
    """Steps 3-5: `todo` (PAIRS_TO_SCORE, `to_score` pairs) cut into shards, the ones no earlier run committed scored and
    committed under `folder`; returns the work folder (its committed files) and the job's counts."""
    shards = max(1, math.ceil(to_score / shard_size))
    todo = with_shards(todo, shards)
    work = ShardWork(folder, fingerprint, lambda: shard_pair_counts(todo), shard_size, {**context, "pairs": to_score, "shards": shards})
    done = work.committed()
    pending = sorted(set(work.expected()) - done)
    job = {"scored": 0, "tasks": 0, "seconds": 0.0, "task_seconds": 0.0, "shards_by_gpu": {}}
    if pending:
        log.info(f"score: {len(pending)} of {len(work.expected())} shards to score on Spark in {min(partitions, len(pending))} tasks "
                 f"({len(done)} committed by an earlier run)")
        job = score_pending_shards(todo, spec, day, work, pending, partitions, scorer_for_task)
        log.info(f"score: {job['scored']} pairs scored in {job['seconds']:.0f} s ({job['scored'] / job['seconds']:.1f} pairs/s)")
    return work, {**job, "shards_committed_earlier": len(done), "shards_scored": len(pending)}


# --- the job -------------------------------------------------------------------------------------------------------


def read_parquet(spark, table, paths: Sequence[str], base: Path | None = None):
    """`table`'s rows in `paths` read with its declared schema (`base`: the table folder, so `ds` comes from the path)."""
    reader = spark.read.schema(spark_schema(table))
    if base is not None:
        reader = reader.option("basePath", str(base))
    return reader.parquet(*paths)


def day_pairs_frame(spark, config: ScoreConfig, quarantined_at: dt.datetime, file_input: tuple[str, ScoringInput] | None):
    """(what was read, for the progress line; candidates read; pairs to score; quarantine rows) as Spark frames.
    `file_input`: a pairs file's, read and checked row by row on the driver (`jobs.scoring.run.score_input`); None: the day's
    candidate pairs, read by Spark."""
    if file_input is not None:
        described, (read, pairs, quarantine) = file_input
        return (described, read, spark.createDataFrame(pairs, schema=spark_schema(PAIRS_TO_SCORE)),
                spark.createDataFrame(quarantine, schema=spark_schema(QUARANTINE)))
    day = config.day
    source = table_path(config.pairs, CANDIDATE_PAIRS)
    if day not in partitions(CANDIDATE_PAIRS, config.pairs):
        raise ValueError(f"{source}: no candidate pairs for ds={day} (run `relevance prepare --date {day}`)")
    dataset(CANDIDATE_PAIRS, config.pairs, days=[day])  # each file's own schema checked: given a schema, Spark fills gaps with nulls
    dataset(CATALOG, config.catalog)
    candidates = read_parquet(spark, CANDIDATE_PAIRS, [str(source / f"ds={day.isoformat()}")], base=source)
    catalog = read_parquet(spark, CATALOG, [str(table_path(config.catalog, CATALOG))])
    pairs, lost = pairs_frame(candidates, catalog)
    quarantine = quarantine_frame(
        lost.selectExpr("*", "'product not in the catalog: nothing to score' AS _reason", "'product_id' AS _field"),
        CANDIDATE_PAIRS.name, quarantined_at, record_json("query", "query_id", "product_id", "product_content_hash"), source_file=str(source))
    read = candidates.count()
    if read == 0:
        raise ValueError(f"{source}: no candidate pairs for ds={day} (run `relevance prepare --date {day}`)")
    return f"{read} candidate pairs for {day}", read, pairs, quarantine


def history_frame(spark, out: str, day: dt.date, cache_days: int):
    """The RELEVANCE partitions of the last `cache_days` days (tonight's included), or None."""
    days = [d for d in partitions(RELEVANCE, out) if day - dt.timedelta(days=cache_days) <= d <= day] if cache_days else []
    if not days:
        return None
    root = table_path(out, RELEVANCE)
    for checked in days:
        dataset(RELEVANCE, out, days=[checked])
    return read_parquet(spark, RELEVANCE, [str(root / f"ds={d.isoformat()}") for d in days], base=root)


def score_day_on_spark(config: ScoreConfig, spec: ScorerSpec, work_folder: str, file_input: tuple[str, ScoringInput] | None) -> dict:
    """`jobs.scoring.run.score_day` on Spark (see the module docstring); returns the same report. `file_input`: see
    `day_pairs_frame`."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from jobs.spark import get_spark

    started = time.perf_counter()
    spark = get_spark("relevance-score", master=config.spark_master)
    day = config.day
    day_folder = Path(config.out) / work_folder / f"ds={day.isoformat()}"
    described, read, pairs, quarantine = day_pairs_frame(spark, config, dt.datetime.now(dt.UTC), file_input)
    pairs = pairs.persist(StorageLevel.MEMORY_AND_DISK)
    replace_folder(day_folder / QUARANTINE.name, lambda staging: quarantine.write.mode("overwrite").parquet(str(staging)))
    quarantined = spark.read.schema(spark_schema(QUARANTINE)).parquet(str(day_folder / QUARANTINE.name)).count()
    version = scorer_version(spec)
    history = history_frame(spark, config.out, day, config.cache_days)
    reused = (reused_frame(history, pairs, version, day, spec.name) if history is not None
              else empty_frame(spark, RELEVANCE).withColumn(IN_PLACE, F.lit(True)))
    reused = reused.persist(StorageLevel.MEMORY_AND_DISK)
    todo = pairs.join(reused.select("query", "product_id"), on=["query", "product_id"], how="left_anti")
    fingerprint, to_score = fingerprint_and_count(todo)
    counts = reused.agg(F.count(F.lit(1)).alias("rows"), F.count_if(F.col(IN_PLACE)).alias("in_place")).first()
    n_reused, n_in_place = counts["rows"], counts["in_place"]
    log.info(f"score: {described}: {n_reused} reused (model version {version}), {to_score} to score, {quarantined} quarantined")

    work, job = score_todo(todo, fingerprint, to_score, spec, day, day_folder / version, config.shard_size,
                           config.spark_partitions or spark.sparkContext.defaultParallelism,
                           {"ds": day.isoformat(), "model_version": version, "config": config_to_dict(config)})
    scored = read_parquet(spark, RELEVANCE, work.files()) if work.expected() else empty_frame(spark, RELEVANCE)
    rows = reused.drop(IN_PLACE).unionByName(scored)
    check = rows.agg(F.count(F.lit(1)).alias("rows"), F.count_distinct("query", "product_id").alias("pairs")).first()
    n_pairs = n_reused + to_score
    if check["rows"] != n_pairs or check["pairs"] != n_pairs:
        raise RuntimeError(f"score: {check['rows']} rows ({check['pairs']} distinct pairs) for {n_pairs} pairs to score; "
                           f"the work folder {work.folder} is left for inspection")
    relevance_root = table_path(config.out, RELEVANCE)
    day_path = relevance_root / f"ds={day.isoformat()}"
    rewrite = True
    if day in partitions(RELEVANCE, config.out):
        stored = read_parquet(spark, RELEVANCE, [str(day_path)], base=relevance_root)
        rows = rows.unionByName(stored.where(F.col("model_name") != F.lit(spec.name)))
        # A re-run of a finished night reuses each row from where it stands: the partition would be rewritten as it is.
        rewrite = not (to_score == 0 and n_in_place == n_reused and stored.where(F.col("model_name") == F.lit(spec.name)).count() == n_reused)
    if rewrite:
        day_rows = rows.drop("ds").sortWithinPartitions("query", "product_id", "model_name")
        replace_folder(day_path, lambda staging: day_rows.write.mode("overwrite").parquet(str(staging)))
    else:
        log.info(f"score: {day_path} already holds these {n_reused} rows of {spec.name}: left as it is")
    pairs.unpersist()
    reused.unpersist()
    shutil.rmtree(work.folder)

    report = {
        "ds": day.isoformat(), "backend": config.backend, "engine": config.engine, "model_name": spec.name, "model_version": version,
        "pairs": config.pairs, "candidates": read, "reused": n_reused, "scored": to_score, "quarantined": quarantined,
        "shards": len(work.expected()), "shards_committed_earlier": job["shards_committed_earlier"], "shards_scored": job["shards_scored"],
        "spark_tasks": job["tasks"], "shards_by_gpu": job["shards_by_gpu"], "partition_rewritten": rewrite,
        "scored_this_run": job["scored"], "scoring_seconds": round(job["seconds"], 2),
        "pairs_per_second": round(job["scored"] / job["seconds"], 2) if job["seconds"] else None,
        "seconds": round(time.perf_counter() - started, 2), "relevance": str(day_path),
    }
    write_json_atomically(day_folder / "score.json", report)
    log.info(f"score: ds={day} written to {day_path}: {to_score} scored ({job['scored']} this run), {n_reused} reused, "
             f"{quarantined} quarantined ({report['seconds']:.1f} s); report {day_folder / 'score.json'}")
    return report
