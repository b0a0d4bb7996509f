"""Offline evaluation of relevance predictions: metrics, query-bootstrap intervals, paired model
comparison, and Markdown/HTML/JSON reports. Light on purpose (numpy, pandas, pyarrow, scipy,
matplotlib): no Spark, no torch.

- `evaluation.metrics`: the metrics as pure functions.
- `evaluation.agreement`: Cohen's kappa and Krippendorff's alpha, the judges' ceiling (pure functions).
- `evaluation.bootstrap`: the query bootstrap engine.
- `evaluation.inputs`: reading, checking and joining tables; `predictions_from_judgments`.
- `evaluation.evaluate`: per-model evaluation, segments and paired comparisons.
- `evaluation.report`: report.md, report.html, metrics.json.
- `evaluation.command`: `EvaluateConfig` and `run(config)` for `relevance evaluate`.
- `evaluation.judges`: `CombineConfig` and `run(config)` for `relevance judges combine`.
"""
