"""The steps of `relevance export` (jobs/export.py): validate a night, report its churn, publish it."""
