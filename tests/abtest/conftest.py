"""Shared seeded data for the abtest tests, and an independent per-user table (pandas, not DuckDB)."""

from __future__ import annotations

import pandas as pd
import pytest
from abtest_testdata import START, per_user

from abtest.simulate import SimulationSpec, simulate


@pytest.fixture(scope="session")
def world():
    """A 2-variant experiment with a CTR and order effect: (events, assignment) Arrow tables."""
    spec = SimulationSpec(n_users=12_000, pre_days=7, exp_days=7, start=START, seed=7,
                          effects={"treatment": {"ctr": 1.04, "cvr": 1.05}})
    return simulate(spec)


@pytest.fixture(scope="session")
def users(world) -> pd.DataFrame:
    return per_user(*world)

