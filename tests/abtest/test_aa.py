"""A/A simulation on sufficient statistics: false-positive rate at alpha, p-values uniform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from abtest import Mean, RatioOfMeans
from abtest.aggregate import COV_DEN, COV_NUM, DEN, NUM, column
from abtest.analysis import compare
from abtest.stats import suff_stats_from_arrays

SEEDS, USERS, ALPHA = 1500, 600, 0.05


def _arm(rng: np.random.Generator, name: str, n: int) -> dict[str, np.ndarray]:
    """Heterogeneous users: log-normal activity, beta click propensity; a pre and an experiment period."""
    rate = rng.lognormal(1.5, 1.0, n)
    ctr = rng.beta(2, 18, n)
    pre_imp = rng.poisson(rate * 10)
    imp = rng.poisson(rate * 10)
    return {
        column(name, NUM): rng.binomial(imp, ctr).astype(float),
        column(name, DEN): imp.astype(float),
        column(name, COV_NUM): rng.binomial(pre_imp, ctr).astype(float),
        column(name, COV_DEN): pre_imp.astype(float),
    }


@pytest.mark.parametrize("metric", [
    RatioOfMeans("clicks", "impressions", covariate=True, name="ctr"),
    Mean("clicks", covariate=True, name="ctr"),
], ids=["ratio+cuped", "mean+cuped"])
def test_aa_false_positive_rate_and_uniform_pvalues(metric):
    rng = np.random.default_rng(2024)
    pvalues = []
    for _ in range(SEEDS):
        arms = [_arm(rng, "ctr", USERS) for _ in range(2)]
        if metric.denominator is None:  # a Mean reads only the numerator and its covariate
            arms = [{k: v for k, v in a.items() if not k.endswith(DEN)} for a in arms]
        control, treatment = (suff_stats_from_arrays(a) for a in arms)
        result = compare(control, treatment, metric, variant="b", control_variant="a",
                         alpha=ALPHA, power=0.8, sequential_tau=0.05)
        pvalues.append(result.pvalue)
    pvalues = np.array(pvalues)
    low, high = scipy.stats.binomtest(int((pvalues < ALPHA).sum()), SEEDS, ALPHA).proportion_ci(0.999)
    assert low <= ALPHA <= high
    assert scipy.stats.kstest(pvalues, "uniform").pvalue > 0.001
    assert not math.isclose(pvalues.std(), 0)
