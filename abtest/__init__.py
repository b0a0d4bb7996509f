"""A/B engagement analysis: DuckDB aggregates, statistics on sufficient statistics, reports.

Notebook API: `Experiment(experiment_start=..., metrics=(Mean(...), RatioOfMeans(...)))` and its
`analyze(events, assignment)`; the CLI (`relevance abtest`) wraps `abtest.run.run(AbtestConfig)`.
"""

from abtest.analysis import Experiment, ExperimentResult, MetricResult
from abtest.metrics import DEFAULT_METRICS, Mean, RatioOfMeans, load_metrics

__all__ = ["DEFAULT_METRICS", "Experiment", "ExperimentResult", "Mean", "MetricResult", "RatioOfMeans", "load_metrics"]
