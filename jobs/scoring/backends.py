"""The scoring backends behind one interface (`jobs.scoring.spec.Scorer`): each turns pairs into RELEVANCE rows.

- `hf`: the policy through transformers (`training.predict.relevance_rows`): greedy CoT where it is
  needed, the label distribution read at the label step. With a zero-shot prompt (`spec.prompt`), any
  instruct model the same way, through its chat template.
- `vllm`: the same policy and the same distribution through vLLM's offline engine
  (`jobs.scoring.vllm_scorer`), with structured outputs so every generated CoT follows the CoT format
  (a regex cannot forbid a facets line from repeating a key, which the strict parser rejects).
- `student`: the distilled multi-head student (`training.student.student_rows`): one encoder pass,
  node decisions from its heads, no reasoning text.

A pair is a dict with `query`, `query_id`, `product_id`, `product_content_hash` and the product's
text fields `title`, `product_type`, `attributes` (its facets, brand included), `description`.
The spec, the interface and the lookup by name live in `jobs.scoring.spec`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import pyarrow as pa

from jobs.scoring.spec import ScorerSpec, judge_tokenizer, scorer_version


class HFScorer:
    """The policy through transformers on `spec.device`."""

    def __init__(self, spec: ScorerSpec) -> None:
        from schemas.graph import LabelSet, ReasoningGraph
        from training.model import load_model

        self.spec = spec
        self.model, self.tokenizer = load_model(spec.model, spec.dtype)
        self.model.to(spec.device)
        self.tokenizer = judge_tokenizer(self.tokenizer, spec)
        self.graph, self.labels = ReasoningGraph.load(spec.graph), LabelSet.load(spec.label_set)
        self.model_name = spec.name
        self.model_version = scorer_version(spec)

    def score(self, pairs: Sequence[dict], ds: dt.date) -> pa.Table:
        from training.predict import pair_prompts, relevance_rows

        spec = self.spec
        zero_shot = spec.zero_shot()
        return relevance_rows(
            self.model, self.tokenizer, pairs, pair_prompts(self.tokenizer, pairs, spec.prompt_tokens, zero_shot), self.graph, self.labels,
            spec.order, reasoning=spec.reasoning, reasoning_sample=spec.reasoning_sample, model_name=self.model_name,
            model_version=self.model_version, ds=ds, batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens, zero_shot=zero_shot,
            progress="score", checked_verdicts=spec.checked_verdicts,
        )

    def close(self) -> None:
        del self.model


class StudentScorer:
    """The distilled multi-head student on `spec.device` (its graph and label set come from its folder)."""

    def __init__(self, spec: ScorerSpec) -> None:
        from schemas.graph import LabelSet, ReasoningGraph
        from training.student import load_student

        self.spec = spec
        self.model, self.tokenizer, self.meta = load_student(spec.model)
        self.model.to(spec.device)
        self.labels, self.graph = LabelSet.load(self.meta["label_set"]), ReasoningGraph.load(self.meta["graph"])
        self.model_name = spec.name
        self.model_version = scorer_version(spec)

    def score(self, pairs: Sequence[dict], ds: dt.date) -> pa.Table:
        from training.student import student_rows

        return student_rows(self.model, self.tokenizer, pairs, self.labels, self.graph.label_node, max_length=self.meta["max_length"],
                            model_name=self.model_name, model_version=self.model_version, ds=ds, batch_size=self.spec.batch_size,
                            progress="score")

    def close(self) -> None:
        del self.model
