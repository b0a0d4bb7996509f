"""`relevance score`'s config, and the CoT format a model folder is scored with.

The format (graph, label set, CoT order, prompt budget) is the one the model was trained with, read
from its folder: a policy's `policy.json` (`training.policy_format`), a student's `student.json`
(graph and label set; a student has no CoT order or prompt budget). The config's own format fields
default to None and are only a check: a value that contradicts the folder is refused naming both. A
policy folder without `policy.json` is scored with the given values, else the defaults.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field

from jobs.scoring.spec import BACKENDS, ScorerSettings, ScorerSpec, scorer_settings
from schemas.config import ConfigError, config_date, help_field
from training.model_files import ModelFolderError, weight_files
from training.policy_format import PolicyFormat, resolve_format, resolve_student_format
from training.predict import REASONING_MODES

ENGINES = ("local", "spark")


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(ScorerSettings):
    """`relevance score`: which day, which data, which model, and how to score it (the scorer's own settings inherited)."""

    date: str = help_field("The day (YYYY-MM-DD) whose candidate_pairs are scored; with a pairs file, the relevance partition written.")
    pairs: str = help_field("Data root holding `candidate_pairs` (written by `relevance prepare`), or a pairs file (.csv or .parquet) of "
                            "(query, product_id) pairs to judge.", "prepared")
    catalog: str = help_field("Data root holding the `catalog` (the product text scored, unless a pairs file carries it).", "world")
    out: str = help_field("Data root of the `relevance` table (read for reuse, written for the day).", "scores")
    backend: str = help_field("Scoring backend: hf (transformers), vllm or student.", "hf", choices=BACKENDS)
    model: str = help_field("Model folder: a causal-LM policy (hf, vllm) or a distilled student folder.")
    graph: str | None = help_field("Reasoning graph; default: the model folder's (policy.json, student.json).", None)
    label_set: str | None = help_field("Label set; default: the model folder's (policy.json, student.json).", None)
    order: str | None = help_field("CoT order (one of the graph's orders); default: the policy folder's policy.json.", None)
    prompt_tokens: int | None = help_field("Prompt token budget; default: the policy folder's policy.json.", None)
    kv_cache_gib: float = help_field("vLLM: KV cache size in GiB.", 1.0)
    shard_size: int = help_field("Pairs per shard: the most work a killed job loses.", 2000)
    cache_days: int = help_field("Days of earlier partitions searched for reusable scores (0: never reuse).", 30)
    engine: str = help_field("local (this process) or spark (mapInArrow, one scorer per executor).", "local", choices=ENGINES)
    spark_master: str | None = help_field("Spark master with engine=spark; default local[*] or spark-submit's.", None)
    spark_partitions: int = help_field("Spark tasks of the scoring job with engine=spark (0: Spark's default parallelism).", 0)
    policy_format: PolicyFormat = field(init=False, metadata={"help": "The format scored with: the folder's, checked against the given."})

    def __post_init__(self) -> None:
        config_date(self.date)
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.reasoning not in REASONING_MODES:  # else only the scorer would find out, after a night's prepare
            raise ConfigError(f"reasoning must be one of {REASONING_MODES}, got {self.reasoning!r}")
        if not self.model:
            raise ConfigError("model: required (a policy folder, or a student folder with backend=student)")
        try:
            weight_files(self.model)
        except ModelFolderError as error:
            raise ConfigError(f"model: {error}") from None
        if self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError("shard_size and batch_size must be positive")
        if self.cache_days < 0:
            raise ConfigError(f"cache_days must be >= 0, got {self.cache_days}")
        resolve = resolve_student_format if self.backend == "student" else resolve_format
        object.__setattr__(self, "policy_format", resolve(self.model, graph=self.graph, label_set=self.label_set, order=self.order,
                                                          prompt_tokens=self.prompt_tokens))

    @property
    def day(self) -> dt.date:
        return config_date(self.date)

    def spec(self) -> ScorerSpec:
        return ScorerSpec(backend=self.backend, model=self.model, **asdict(self.policy_format), kv_cache_bytes=int(self.kv_cache_gib * (1 << 30)),
                          **scorer_settings(self))
