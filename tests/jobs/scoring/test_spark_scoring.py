"""Scoring on Spark (local[2], 3 tasks) gives what the in-process scorer gives on the same pairs, for
the student (MiniLM with fresh heads) and the hf policy (the tiny model); GPU placement from the task; the
commit protocol: a failed job's complete shards are kept by the re-run, a retried task leaves no duplicate, of two complete
attempts of a shard (a speculative copy) one is committed and the other deleted, files without their manifest are never adopted."""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.scoring import spark as spark_scoring
from jobs.scoring.spark import (
    ATTEMPTS,
    SHARD,
    SUMMARY_DDL,
    ShardWork,
    committed_file,
    file_rows,
    fingerprint_and_count,
    score_shards_of_task,
    score_todo,
    shard_folder,
    shard_pair_counts,
    task_device,
    task_scorer,
    with_shards,
)
from jobs.scoring.spec import ScorerSpec, open_scorer, pair_dicts
from jobs.spark import spark_schema
from schemas.storage import read_table
from schemas.tables import CATALOG, PAIRS_TO_SCORE, QUERIES, RELEVANCE

DS = dt.date(2024, 3, 3)
PARTITIONS = 3
SHARD_SIZE = 10  # 48 pairs: 5 shards
REPO = Path(__file__).resolve().parents[3]


def score_with_spark(spark, pairs: pa.Table, spec: ScorerSpec, work: Path, partitions: int = PARTITIONS,
                     scorer_for_task=task_scorer) -> tuple[pa.Table, dict]:
    """(the committed rows, the job's counts) of `pairs` scored on Spark into the work folder `work`."""
    frame = spark.createDataFrame(pairs, schema=spark_schema(PAIRS_TO_SCORE))
    fingerprint, count = fingerprint_and_count(frame)
    shards, job = score_todo(frame, fingerprint, count, spec, DS, work, SHARD_SIZE, partitions, {}, scorer_for_task)
    parts = [pq.read_table(path, schema=RELEVANCE.arrow_schema()) for path in shards.files()]
    return (pa.concat_tables(parts) if parts else RELEVANCE.empty_arrow()), job


@pytest.fixture(scope="module")
def pairs(tiny_world) -> pa.Table:
    """Every (query, product) of the tiny world: 48 pairs; one query without an id (the column is nullable)."""
    products = read_table(CATALOG, tiny_world).to_pylist()
    queries = read_table(QUERIES, tiny_world).to_pylist()
    rows = [
        {"query": query["query"], "query_id": None if query["query_id"] == "q2" else query["query_id"], "product_id": product["product_id"],
         "product_content_hash": f"hash-{product['product_id']}", "title": product["title"], "product_type": product["product_type"],
         "attributes": product["attributes"] + ([("brand", product["brand"])] if product["brand"] else []),
         "description": product["description"]}
        for query in queries for product in products
    ]
    return pa.Table.from_pylist(rows, schema=PAIRS_TO_SCORE.arrow_schema())


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory):
    import torch

    from schemas.graph import LabelSet, ReasoningGraph
    from training.student import build_student, default_encoder, head_vocabularies, save_student

    torch.manual_seed(0)
    model, tokenizer = build_student(default_encoder(), head_vocabularies(ReasoningGraph.load("relevance7"), LabelSet.load("wands")))
    return save_student(model, tokenizer, tmp_path_factory.mktemp("student"), graph="relevance7", label_set="wands", max_length=64)


def in_process(pairs: pa.Table, spec: ScorerSpec) -> pa.Table:
    import torch

    torch.set_num_threads(1)
    scorer = open_scorer(spec)
    try:
        return scorer.score(pair_dicts(pairs), DS)
    finally:
        scorer.close()


def assert_same_scores(on_spark: pa.Table, expected: pa.Table) -> None:
    assert on_spark.schema == RELEVANCE.arrow_schema()
    spark_rows = on_spark.to_pylist()
    by_key = {(row["query"], row["product_id"]): row for row in spark_rows}
    assert len(by_key) == len(spark_rows) == expected.num_rows  # each pair exactly once
    for want in expected.to_pylist():
        got = by_key[(want["query"], want["product_id"])]
        assert dict(got["label_probs"]) == pytest.approx(dict(want["label_probs"]), abs=1e-5)
        assert got["expected_gain"] == pytest.approx(want["expected_gain"], abs=1e-5)
        for field in ("label", "node_decisions", "query_id", "product_content_hash", "model_name", "model_version", "ds"):
            assert got[field] == want[field], field


def test_student_scores_on_spark_equal_the_in_process_scores(spark, pairs, student_folder, tmp_path):
    # chunks of 3 * CHUNK_BATCHES = 24 pairs: each shard (about 10 pairs) is one short chunk, padded unlike in-process
    spec = ScorerSpec(backend="student", model=str(student_folder), batch_size=3)
    assert_same_scores(score_with_spark(spark, pairs, spec, tmp_path)[0], in_process(pairs, spec))


def test_hf_scores_on_spark_equal_the_in_process_scores(spark, pairs, tiny_model, tmp_path):
    # chunks of 1 * CHUNK_BATCHES = 8 pairs: a shard is scored in a full chunk and a short one
    spec = ScorerSpec(backend="hf", model=str(tiny_model), order="label_first", reasoning="none", batch_size=1)
    spark.conf.set("spark.sql.session.timeZone", "America/New_York")  # scored_at must still come back as the UTC instant
    try:
        before = dt.datetime.now(dt.UTC)
        on_spark, _ = score_with_spark(spark, pairs, spec, tmp_path)
        after = dt.datetime.now(dt.UTC)
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")
    assert_same_scores(on_spark, in_process(pairs, spec))
    assert all(before <= scored_at <= after for scored_at in on_spark.column("scored_at").to_pylist())


def test_an_empty_day_gives_the_empty_relevance_table_without_loading_the_model(spark, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")  # unreadable: loading it would fail the job
    spec = ScorerSpec(backend="student", model=str(tmp_path))
    scored, job = score_with_spark(spark, PAIRS_TO_SCORE.empty_arrow(), spec, tmp_path / "work")
    assert scored.equals(RELEVANCE.empty_arrow(), check_metadata=True) and job["tasks"] == 0


class FakeScorer:
    """Records how it was opened and whether it was closed."""

    def __init__(self, spec: ScorerSpec):
        self.spec, self.closed = spec, False

    def close(self) -> None:
        self.closed = True


class FakeTask:
    def __init__(self, gpus: list[str]):
        self.gpus = gpus

    def cpus(self) -> int:
        return 1

    def resources(self) -> dict:
        from pyspark.resource import ResourceInformation

        return {"gpu": ResourceInformation("gpu", self.gpus)} if self.gpus else {}


def test_a_worker_opens_a_scorer_once_on_its_task_gpu_and_holds_one_at_a_time(monkeypatch, tmp_path):
    monkeypatch.setattr(spark_scoring, "open_scorer", FakeScorer)
    monkeypatch.setattr(spark_scoring, "_WORKER_SCORERS", {})
    (tmp_path / "model.safetensors").write_bytes(b"")
    spec = ScorerSpec(backend="student", model=str(tmp_path), device="cuda")
    first = task_scorer(spec, FakeTask(["2"]))
    assert first.spec.device == "cuda:2"
    assert task_scorer(spec, FakeTask(["2"])) is first  # the next task of this worker reuses it
    moved = task_scorer(spec, FakeTask(["5"]))
    assert moved.spec.device == "cuda:5" and first.closed and not moved.closed


def test_a_cuda_spec_runs_on_the_task_gpu_and_other_devices_are_kept():
    assert task_device("cuda", ["3"]) == "cuda:3"
    assert task_device("cuda:1", ["3"]) == "cuda:1"
    assert task_device("cpu", ()) == "cpu"
    with pytest.raises(RuntimeError, match="spark.task.resource.gpu.amount=1"):
        task_device("cuda", ())
    with pytest.raises(RuntimeError, match=r"\['0', '1'\]"):
        task_device("cuda", ["0", "1"])


# --- the commit protocol ---------------------------------------------------------------------------------------------

# Shards each task attempt has opened, by attempt: state of the Python worker running the attempt.
_SHARDS_OPENED: dict[int, int] = {}


def fails_at_its_second_shard_on_attempt_0(spec: ScorerSpec, context):
    """`task_scorer`, except that a task's first attempt dies when it reaches its second shard."""
    opened = _SHARDS_OPENED[context.taskAttemptId()] = _SHARDS_OPENED.get(context.taskAttemptId(), 0) + 1
    if context.attemptNumber() == 0 and opened == 2:
        raise RuntimeError("injected: the first attempt of this task dies at its second shard")
    return task_scorer(spec, context)


def assert_each_pair_once(rows: pa.Table, pairs: pa.Table) -> None:
    keys = list(zip(rows["query"].to_pylist(), rows["product_id"].to_pylist()))
    assert sorted(keys) == sorted(zip(pairs["query"].to_pylist(), pairs["product_id"].to_pylist()))


def test_a_failed_job_keeps_its_complete_shards_and_the_rerun_scores_only_the_rest(spark, pairs, tiny_model, tmp_path):
    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the injected scorer runs in Spark's Python workers
    spec = ScorerSpec(backend="hf", model=str(tiny_model), order="label_first", reasoning="none", batch_size=4)
    with pytest.raises(Exception, match="injected"):  # local[2] does not retry: the job dies after its first shard
        score_with_spark(spark, pairs, spec, tmp_path, partitions=1, scorer_for_task=fails_at_its_second_shard_on_attempt_0)
    attempts = sorted((tmp_path / ATTEMPTS).rglob("*.parquet"))
    assert len(attempts) == 1, attempts  # the first shard, complete, written by the attempt, not committed by the driver
    (attempts[0].parent.parent / "shard-00004").mkdir(exist_ok=True)
    (attempts[0].parent.parent / "shard-00004" / "0-0.0-99.parquet").write_bytes(b"PAR1 cut short")  # a torn file: never adopted

    rows, job = score_with_spark(spark, pairs, spec, tmp_path)
    adopted = pq.read_metadata(tmp_path / f"{attempts[0].parent.name}.parquet").num_rows
    assert (job["shards_committed_earlier"], job["shards_scored"], job["scored"]) == (1, 4, pairs.num_rows - adopted)
    assert_same_scores(rows, in_process(pairs, spec))
    assert list((tmp_path / ATTEMPTS).rglob("*.parquet")) == []  # every other attempt's file is gone


def run_task_attempt(shards, shard: int, spec: ScorerSpec, work: Path) -> dict:
    """The summary of a task scoring shard `shard` of `shards` (pairs with their shard) into `work`, run as a Spark job of its own:
    each call is another attempt, with a name of its own."""
    from pyspark.sql import functions as F

    score = partial(score_shards_of_task, spec=spec, day=DS, work=work, scorer_for_task=task_scorer)
    [summary] = shards.where(F.col(SHARD) == shard).coalesce(1).mapInArrow(score, SUMMARY_DDL).collect()
    return summary.asDict()


@pytest.mark.spark
def test_of_two_complete_attempts_of_a_shard_one_is_committed_and_the_other_deleted(spark, pairs, tiny_model, tmp_path):
    """A speculative copy of a task that completes too. Local mode does not speculate, so each shard's task runs twice. Shard 0:
    the driver commits the attempt Spark reports. Shard 1: the job is killed before its commit, and the re-run adopts one."""
    spec = ScorerSpec(backend="hf", model=str(tiny_model), order="label_first", reasoning="none", batch_size=4)
    frame = spark.createDataFrame(pairs, schema=spark_schema(PAIRS_TO_SCORE))
    fingerprint, count = fingerprint_and_count(frame)
    shards = with_shards(frame, math.ceil(count / SHARD_SIZE))  # the shards score_todo cuts
    work = ShardWork(tmp_path, fingerprint, lambda: shard_pair_counts(shards), SHARD_SIZE, {})
    expected = work.expected()
    attempts = {shard: [run_task_attempt(shards, shard, spec, tmp_path) for _ in range(2)] for shard in (0, 1)}
    for shard, both in attempts.items():
        assert both[0]["file"] != both[1]["file"]
        assert [file_rows(Path(attempt["file"])) for attempt in both] == [attempt["rows"] for attempt in both] == [expected[shard]] * 2
    written = {shard: [pq.read_table(attempt["file"]) for attempt in both] for shard, both in attempts.items()}

    reported, speculative = attempts[0]
    work.commit_job([reported], expected)
    assert pq.read_table(committed_file(tmp_path, 0)).equals(written[0][0])
    assert not Path(speculative["file"]).exists() and not shard_folder(tmp_path, 0).exists()

    rows, job = score_with_spark(spark, pairs, spec, tmp_path)
    assert (job["shards_committed_earlier"], job["shards_scored"], job["scored"]) == (2, 3, pairs.num_rows - expected[0] - expected[1])
    assert_each_pair_once(rows, pairs)
    assert sorted(path.name for path in tmp_path.glob("shard-*.parquet")) == [f"shard-{shard:05d}.parquet" for shard in sorted(expected)]
    assert pq.read_table(committed_file(tmp_path, 1)) in written[1]  # one attempt's file as it was, not a merge of both
    assert list((tmp_path / ATTEMPTS).rglob("*.parquet")) == []


RETRIED_JOB = """
import json, sys
import pyarrow as pa, pyarrow.parquet as pq
from jobs.scoring.spark import fingerprint_and_count, score_todo, task_scorer
from jobs.scoring.spec import ScorerSpec
from jobs.spark import get_spark, spark_schema
from schemas.tables import PAIRS_TO_SCORE, RELEVANCE

opened = {}

def fails_at_its_second_shard_on_attempt_0(spec, context):
    opened[context.taskAttemptId()] = opened.get(context.taskAttemptId(), 0) + 1
    if context.attemptNumber() == 0 and opened[context.taskAttemptId()] == 2:
        raise RuntimeError("injected: the first attempt of this task dies at its second shard")
    return task_scorer(spec, context)

pairs_file, model, work = sys.argv[1:]
spark = get_spark("retried-task", master="local[2,2]")  # a failed task is retried once
frame = spark.createDataFrame(pq.read_table(pairs_file), schema=spark_schema(PAIRS_TO_SCORE))
fingerprint, count = fingerprint_and_count(frame)
spec = ScorerSpec(backend="hf", model=model, order="label_first", reasoning="none", batch_size=4)
shards, job = score_todo(frame, fingerprint, count, spec, __import__("datetime").date(2024, 3, 3), __import__("pathlib").Path(work), 10, 2, {},
                         fails_at_its_second_shard_on_attempt_0)
rows = pa.concat_tables([pq.read_table(path, schema=RELEVANCE.arrow_schema()) for path in shards.files()])
print(json.dumps({"keys": list(zip(rows["query"].to_pylist(), rows["product_id"].to_pylist())), "job": job}))
"""


@pytest.mark.spark
@pytest.mark.slow
def test_a_task_retried_after_its_first_attempt_failed_leaves_no_duplicate_rows(pairs, tiny_model, tmp_path):
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    done = subprocess.run([sys.executable, "-c", RETRIED_JOB, str(tmp_path / "pairs.parquet"), str(tiny_model), str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "injected: the first attempt" in done.stderr  # attempt 0 of each task did fail, after committing its first shard
    result = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert sorted(map(tuple, result["keys"])) == sorted(zip(pairs["query"].to_pylist(), pairs["product_id"].to_pylist()))
    assert result["job"]["scored"] == pairs.num_rows
    assert list((tmp_path / "work" / ATTEMPTS).rglob("*.parquet")) == []


def test_files_in_a_work_folder_without_its_manifest_are_never_adopted(tmp_path):
    """A work folder whose manifest is gone (its removal killed midway, a speculative copy finishing after it) may hold other
    pairs' rows in files of the right length: the run starts afresh instead of adopting them."""
    stale = pa.table({"query": ["sofa", "lamp", "rug"]})  # a shard file is adopted by its row count alone
    pq.write_table(stale, committed_file(tmp_path, 0))
    shard_folder(tmp_path, 1).mkdir(parents=True)
    pq.write_table(stale, shard_folder(tmp_path, 1) / "0-0.0-7.parquet")
    work = ShardWork(tmp_path, "6:1234", lambda: {0: 3, 1: 3}, SHARD_SIZE, {})
    assert work.committed() == set()
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["manifest.json"]
