"""The steps of `relevance datasets` (jobs/datasets.py): labelled pairs, splits, CoT targets, counts."""
