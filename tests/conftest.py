"""Shared fixtures: one local[2] Spark session for the whole run, shut down with its JVM; the tiny
training world and the models trained on it (tests/training_world.py); a sharded checkpoint on a
production tokenizer (tests/sharded_checkpoint.py); the fault and abuse ledger (tests/fault_ledger.py); the longest test files
first (tests/file_order.py)."""

from __future__ import annotations

import pytest
from sharded_checkpoint import sharded_policy  # noqa: F401  (fixture)
from training_world import sft_policy, tiny_model, tiny_world, vllm_checks_policy, vllm_policy  # noqa: F401  (fixtures)

pytest_plugins = ["fault_ledger", "file_order"]


@pytest.fixture(scope="session")
def spark():
    from jobs.spark import get_spark, stop_spark

    session = get_spark("relevance-tests", master="local[2]", conf={"spark.sql.shuffle.partitions": "2"})
    yield session
    stop_spark(session)


@pytest.fixture
def drifted_impressions(tmp_path):
    """search_impressions under tmp_path with a good day and a later day whose file lacks `price`:
    (good day, drifted day)."""
    import datetime as dt

    import pyarrow.parquet as pq

    from schemas.storage import PART_FILE
    from schemas.tables import SEARCH_IMPRESSIONS

    good, drifted = dt.date(2024, 3, 1), dt.date(2024, 3, 2)
    schema = SEARCH_IMPRESSIONS.arrow_schema(without=("ds",))
    for day, day_schema in ((good, schema), (drifted, schema.remove(schema.get_field_index("price")))):
        folder = tmp_path / SEARCH_IMPRESSIONS.name / f"ds={day.isoformat()}"
        folder.mkdir(parents=True)
        pq.write_table(day_schema.empty_table(), folder / PART_FILE)
    return good, drifted
