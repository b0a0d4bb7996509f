"""Constants and helpers shared by the abtest tests (conftest.py holds the fixtures)."""

import datetime as dt

import pandas as pd

START = dt.date(2024, 3, 1)


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
