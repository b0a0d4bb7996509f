"""Bulk scoring scaled out with Spark: the same `Scorer` as in-process, one per Python worker.

- Input: the pairs (PAIRS_TO_SCORE) become a DataFrame with the declared Spark schema (never
  inferred), repartitioned round-robin into `partitions` (default: the cluster's default parallelism).
- Scoring: `mapInArrow` (Arrow batches in and out, no pandas round trip for the map columns). Each
  Python worker opens its scorer once, from the `ScorerSpec` shipped in the closure, and keeps it in
  a module-level cache for the later tasks it runs (`spark.python.worker.reuse`, on by default). A
  partition's rows are scored in chunks of `spec.batch_size * CHUNK_BATCHES` pairs, so the scorer's
  own length sorting has room to work while memory stays bounded; each chunk goes back as Arrow
  record batches conformed to RELEVANCE, one row per pair. The scorer is opened on a task's first
  chunk, so empty partitions load no model.
- `scored_frame` is the DataFrame -> DataFrame transform underneath: a day whose pairs do not fit on
  the driver is read by Spark (`spark.read.schema(spark_schema(PAIRS_TO_SCORE)).parquet(...)`) and
  written by Spark, without `score_with_spark`'s Arrow round trip through the driver.
- Threads and devices come from the task: torch uses `spark.task.cpus` threads (1 by default, so
  the scorers of one executor do not oversubscribe its cores); a spec with device `cuda` is placed
  on the task's GPU (`cuda:<address>` from `TaskContext.resources()["gpu"]`); a spec pinned to
  `cuda:N` or on `cpu` is used as it is.
- Output: `DataFrame.toArrow()` on the driver, conformed to RELEVANCE. Spark 4 returns `scored_at`
  as UTC instants whatever the session time zone (checked under America/New_York) and keeps the
  declared nullability, but drops the schema metadata (table name and version): `conform` puts the
  declared schema back, and any time zone Spark might return is cast to UTC without moving the instant.

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
(the cache lives in it). On CPU executors nothing special is needed: each task slot holds one scorer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator, Sequence

import pyarrow as pa

from jobs.scoring.spec import Scorer, ScorerSpec, open_scorer, pair_dicts
from jobs.spark import spark_schema
from schemas.tables import PAIRS_TO_SCORE, RELEVANCE

# Chunk = this many scorer batches: enough for length sorting to pay, few enough to stay in memory.
CHUNK_BATCHES = 8

# The scorer this Python worker holds, by the spec it was opened with (placed on this worker's device).
_WORKER_SCORERS: dict[ScorerSpec, Scorer] = {}


def score_with_spark(spark, pairs: pa.Table, spec: ScorerSpec, ds: dt.date, partitions: int | None = None) -> pa.Table:
    """RELEVANCE rows (one per pair of `pairs`, a PAIRS_TO_SCORE table) scored by `spec` on Spark's workers."""
    frame = spark.createDataFrame(PAIRS_TO_SCORE.conform(pairs), schema=spark_schema(PAIRS_TO_SCORE))
    partitions = partitions or spark.sparkContext.defaultParallelism
    return RELEVANCE.conform(scored_frame(frame, spec, ds, partitions).toArrow())


def scored_frame(pairs, spec: ScorerSpec, ds: dt.date, partitions: int):
    """PAIRS_TO_SCORE DataFrame -> RELEVANCE DataFrame, scored in `partitions` tasks."""

    def score_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        return score_batches(batches, spec, ds)

    return pairs.repartition(partitions).mapInArrow(score_partition, spark_schema(RELEVANCE))


def score_batches(batches: Iterator[pa.RecordBatch], spec: ScorerSpec, ds: dt.date) -> Iterator[pa.RecordBatch]:
    """One task's work: its pairs in chunks through this worker's scorer (opened on the first chunk)."""
    chunk_size = spec.batch_size * CHUNK_BATCHES
    pending: list[dict] = []
    for batch in batches:
        pending.extend(pair_dicts(pa.Table.from_batches([batch])))
        while len(pending) >= chunk_size:
            yield from score_chunk(pending[:chunk_size], spec, ds)
            pending = pending[chunk_size:]
    if pending:
        yield from score_chunk(pending, spec, ds)


def score_chunk(pairs: Sequence[dict], spec: ScorerSpec, ds: dt.date) -> list[pa.RecordBatch]:
    from pyspark import TaskContext

    scored = RELEVANCE.conform(task_scorer(spec, TaskContext.get()).score(pairs, ds))
    if scored.num_rows != len(pairs):
        raise RuntimeError(f"{spec.backend} scorer of {spec.model} returned {scored.num_rows} rows for {len(pairs)} pairs")
    return scored.to_batches()


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
