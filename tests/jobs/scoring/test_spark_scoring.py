"""Scoring on Spark (local[2], 3 partitions) gives what the in-process scorer gives on the same pairs, for
the student (MiniLM with fresh heads) and the hf policy (the tiny model); GPU placement from the task."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from jobs.scoring import spark as spark_scoring
from jobs.scoring.spark import score_with_spark, task_device, task_scorer
from jobs.scoring.spec import ScorerSpec, open_scorer, pair_dicts
from schemas.storage import read_table
from schemas.tables import CATALOG, PAIRS_TO_SCORE, QUERIES, RELEVANCE

DS = dt.date(2024, 3, 3)
PARTITIONS = 3


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


def test_student_scores_on_spark_equal_the_in_process_scores(spark, pairs, student_folder):
    # chunks of 3 * CHUNK_BATCHES = 24 pairs: each partition (about 16 pairs) is one short chunk, padded unlike in-process
    spec = ScorerSpec(backend="student", model=str(student_folder), batch_size=3)
    assert_same_scores(score_with_spark(spark, pairs, spec, DS, partitions=PARTITIONS), in_process(pairs, spec))


def test_hf_scores_on_spark_equal_the_in_process_scores(spark, pairs, tiny_model):
    # chunks of 1 * CHUNK_BATCHES = 8 pairs: each partition is scored in several full chunks
    spec = ScorerSpec(backend="hf", model=str(tiny_model), order="label_first", reasoning="none", batch_size=1)
    spark.conf.set("spark.sql.session.timeZone", "America/New_York")  # scored_at must still come back as the UTC instant
    try:
        before = dt.datetime.now(dt.UTC)
        on_spark = score_with_spark(spark, pairs, spec, DS, partitions=PARTITIONS)
        after = dt.datetime.now(dt.UTC)
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")
    assert_same_scores(on_spark, in_process(pairs, spec))
    assert all(before <= scored_at <= after for scored_at in on_spark.column("scored_at").to_pylist())


def test_an_empty_day_gives_the_empty_relevance_table_without_loading_the_model(spark, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")  # unreadable: loading it would fail the job
    spec = ScorerSpec(backend="student", model=str(tmp_path))
    scored = score_with_spark(spark, PAIRS_TO_SCORE.empty_arrow(), spec, DS, partitions=PARTITIONS)
    assert scored.equals(RELEVANCE.empty_arrow(), check_metadata=True)


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
