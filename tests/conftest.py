"""Shared fixtures: one local[2] Spark session for the whole run, shut down with its JVM; the tiny
training world and the models trained on it (tests/training_world.py)."""

from __future__ import annotations

import pytest
from training_world import sft_policy, tiny_model, tiny_world, vllm_policy  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def spark():
    from jobs.spark import get_spark, stop_spark

    session = get_spark("relevance-tests", master="local[2]", conf={"spark.sql.shuffle.partitions": "2"})
    yield session
    stop_spark(session)
