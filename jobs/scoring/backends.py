"""The scoring backends behind one interface: a `Scorer` turns pairs into RELEVANCE rows.

- `hf`: the policy through transformers (`training.predict.relevance_rows`): greedy CoT where it is
  needed, the label distribution read at the label step.
- `vllm`: the same policy and the same distribution through vLLM's offline engine
  (`jobs.scoring.vllm_scorer`), with structured outputs so every generated CoT follows the CoT format
  (a regex cannot forbid a facets line from repeating a key, which the strict parser rejects).
- `student`: the distilled multi-head student (`training.student.student_rows`): one encoder pass,
  node decisions from its heads, no reasoning text.

A pair is a dict with `query`, `query_id`, `product_id`, `product_content_hash` and the product's
text fields `title`, `product_type`, `attributes` (its facets, brand included), `description`.

`ScorerSpec` is a plain frozen dataclass, so the Spark path ships it to executors and each Python
worker opens its own scorer (one engine per executor) with `open_scorer`.

The model version that scores are cached under (`Scorer.model_version`) is the weights' hash plus a
short hash of the settings that change the label distribution (CoT order, graph, label set, prompt
budget; the student's input length): the hf and vllm backends compute the same distribution, so
they share a version and each other's cached scores; the reasoning mode is not part of it (a cached
row keeps the reasoning it was scored with).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyarrow as pa

BACKENDS = ("hf", "vllm", "student")


@dataclass(frozen=True)
class ScorerSpec:
    """What a scorer needs; everything the Spark path sends to executors."""

    backend: str
    model: str
    model_name: str = ""
    graph: str = "relevance7"
    label_set: str = "wands"
    order: str = "label_first"
    prompt_tokens: int = 48
    reasoning: str = "none"
    reasoning_sample: float = 0.05
    batch_size: int = 64
    max_new_tokens: int = 96
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    kv_cache_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not (Path(self.model) / "model.safetensors").is_file():
            raise FileNotFoundError(f"model folder {self.model} has no model.safetensors (train one or point at a checkpoint folder)")

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model).name


class Scorer(Protocol):
    model_name: str
    model_version: str

    def score(self, pairs: Sequence[dict], ds: dt.date) -> pa.Table:
        """RELEVANCE rows of `pairs` (in their order), partition `ds`."""

    def close(self) -> None:
        """Free the model (and the engine's processes)."""


def settings_version(weights_version: str, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]
    return f"{weights_version}-{digest}"


class HFScorer:
    """The policy through transformers on `spec.device`."""

    def __init__(self, spec: ScorerSpec) -> None:
        from schemas.graph import LabelSet, ReasoningGraph
        from training.model import load_model

        self.spec = spec
        self.model, self.tokenizer = load_model(spec.model, spec.dtype)
        self.model.to(spec.device)
        self.graph, self.labels = ReasoningGraph.load(spec.graph), LabelSet.load(spec.label_set)
        self.model_name = spec.name
        self.model_version = scorer_version(spec)

    def score(self, pairs: Sequence[dict], ds: dt.date) -> pa.Table:
        from training.predict import pair_prompts, relevance_rows

        spec = self.spec
        return relevance_rows(
            self.model, self.tokenizer, pairs, pair_prompts(self.tokenizer, pairs, spec.prompt_tokens), self.graph, self.labels,
            spec.order, reasoning=spec.reasoning, reasoning_sample=spec.reasoning_sample, model_name=self.model_name,
            model_version=self.model_version, ds=ds, batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens,
        )

    def close(self) -> None:
        del self.model


def scorer_version(spec: ScorerSpec) -> str:
    """The version `spec`'s scores are cached under, without loading the model (see the module doc)."""
    from training.model import model_version

    weights = model_version(spec.model)
    if spec.backend == "student":
        meta = json.loads((Path(spec.model) / "student.json").read_text())
        return settings_version(weights, {"max_length": meta["max_length"]})
    return settings_version(weights, {"graph": spec.graph, "label_set": spec.label_set, "order": spec.order,
                                      "prompt_tokens": spec.prompt_tokens})


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
                            model_name=self.model_name, model_version=self.model_version, ds=ds, batch_size=self.spec.batch_size)

    def close(self) -> None:
        del self.model


def open_scorer(spec: ScorerSpec) -> Scorer:
    """The scorer of `spec.backend` (vLLM imported only when asked for)."""
    if spec.backend == "hf":
        return HFScorer(spec)
    if spec.backend == "student":
        return StudentScorer(spec)
    from jobs.scoring.vllm_scorer import VLLMScorer

    return VLLMScorer(spec)
