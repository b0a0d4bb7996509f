"""Shared seeded data for the abtest tests, and an independent per-user table (pandas, not DuckDB)."""

from __future__ import annotations

import pandas as pd
import pytest
from abtest_testdata import START

from abtest.simulate import SimulationSpec, simulate


@pytest.fixture(scope="session")
def world():
    """A 2-variant experiment with a CTR and order effect: (events, assignment) Arrow tables."""
    spec = SimulationSpec(n_users=12_000, pre_days=7, exp_days=7, start=START, seed=7,
                          effects={"treatment": {"ctr": 1.04, "cvr": 1.05}})
    return simulate(spec)


def per_user(events, assignment) -> pd.DataFrame:
    """Per-user sums in the experiment period and the pre-period, computed with pandas alone."""
    ev = events.to_pandas()
    ev["exp"] = ev["ds"] >= START
    ev["good"] = (ev["clicks"] > 0).astype(int)
    cols = ["clicks", "impressions", "orders", "gmv", "good"]
    ev["requests"] = 1
    cols.append("requests")
    users = assignment.to_pandas()[["user_id", "variant"]]
    for period, mask in (("", ev["exp"]), ("pre_", ~ev["exp"])):
        sums = ev[mask].groupby("user_id")[cols].sum().add_prefix(period)
        users = users.merge(sums, left_on="user_id", right_index=True, how="left")
    return users.fillna(0.0)


@pytest.fixture(scope="session")
def users(world) -> pd.DataFrame:
    return per_user(*world)

