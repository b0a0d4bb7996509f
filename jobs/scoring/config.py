"""`relevance score`'s config, and the CoT format a model folder is scored with.

The format (graph, label set, CoT order, prompt budget) is the one the model was trained with, read
from its folder: a policy's `policy.json` (`training.policy_format`), a student's `student.json`
(graph and label set; a student has no CoT order or prompt budget). The config's own format fields
default to None and are only a check: a value that contradicts the folder is refused naming both. A
policy folder without `policy.json` is scored with the given values, else the defaults.

`prompt` other than `policy` judges zero-shot: any instruct model's folder (no `policy.json`: a trained
policy reads the prompt it was trained on) with a judge prompt (`schemas.judge_prompt`) through its
chat template (or the `chat_template` file given). Its CoT order, unless given, follows the reasoning
mode: `label_first` (the label at once) with reasoning none, else `reasoning_first` (the reasoning
graph's steps, then the label); the label distribution is read after the reasoning in that order, so
asking to keep reasoning text with `label_first` is refused. Its pair budget defaults to
ZERO_SHOT_PROMPT_TOKENS, an instruct model's context being far longer than the tiny policy's.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobs.scoring.spec import BACKENDS, ScorerSettings, ScorerSpec, checked_verdicts_problem, scorer_settings
from schemas.config import ConfigError, config_date, help_field
from schemas.graph import ReasoningGraph
from schemas.judge_prompt import POLICY_PROMPT, JudgePrompt
from training.model_files import ModelFolderError, weight_files
from training.policy_format import POLICY_FORMAT_FILE, PolicyFormat, resolve_format, resolve_student_format
from training.predict import REASONING_MODES
from training.prompt import chat_template as template_to_render

ENGINES = ("local", "spark")
ZERO_SHOT_PROMPT_TOKENS = 256  # the pair's fields (query, title, type, attributes, description) in a zero-shot prompt


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
    prompt_tokens: int | None = help_field("Prompt token budget; default: the policy folder's policy.json (zero-shot: "
                                           f"{ZERO_SHOT_PROMPT_TOKENS}).", None)
    prompt: str = help_field("policy: the trained policy's own prompt; or judge zero-shot with any instruct model: a judge prompt's "
                             "name (zero_shot) or YAML file (a copy of schemas/prompts/zero_shot.yaml, edited).", POLICY_PROMPT)
    chat_template: str | None = help_field("Zero-shot: a Jinja chat template file, for a model folder without one.", None)
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
        if self.prompt != POLICY_PROMPT:
            self._check_zero_shot()
        resolve = resolve_student_format if self.backend == "student" else resolve_format
        object.__setattr__(self, "policy_format", resolve(self.model, graph=self.graph, label_set=self.label_set, order=self.zero_shot_order(),
                                                          prompt_tokens=self.zero_shot_budget()))
        scored = self.policy_format
        if self.prompt != POLICY_PROMPT and self.reasoning != "none" and ReasoningGraph.load(scored.graph).label_comes_first(scored.order):
            raise ConfigError(f"order={scored.order}: a zero-shot judge then answers with the label alone, so reasoning={self.reasoning!r} "
                              "has no text to keep; leave order out (reasoning_first: the reasoning, then the label) or give another order")
        problem = self.checked_verdicts and checked_verdicts_problem(self.backend, scored.graph)
        if problem:
            raise ConfigError(problem)

    def _check_zero_shot(self) -> None:
        if self.backend == "student":
            raise ConfigError(f"prompt={self.prompt!r}: a zero-shot prompt is for a causal LM (backend hf or vllm), not the student")
        if (Path(self.model) / POLICY_FORMAT_FILE).is_file():
            raise ConfigError(f"prompt={self.prompt!r}: {self.model} holds {POLICY_FORMAT_FILE}, a policy trained on its own prompt; "
                              "leave prompt out to score it with that prompt")
        if self.chat_template is not None and not self.chat_template.strip():
            raise ConfigError("chat_template: give a Jinja file's path, or leave it out to use the model folder's template")
        try:
            JudgePrompt.load(self.prompt)
        except (ValueError, OSError) as error:
            raise ConfigError(f"prompt: {error}") from None
        try:
            template_to_render(self.model, self.chat_template)
        except (ValueError, OSError) as error:
            raise ConfigError(f"chat_template: {error}") from None

    def zero_shot_order(self) -> str | None:
        """The CoT order given; a zero-shot judge's default follows the reasoning mode (see the module doc)."""
        if self.prompt == POLICY_PROMPT or self.order is not None:
            return self.order
        return "label_first" if self.reasoning == "none" else "reasoning_first"

    def zero_shot_budget(self) -> int | None:
        if self.prompt == POLICY_PROMPT or self.prompt_tokens is not None:
            return self.prompt_tokens
        return ZERO_SHOT_PROMPT_TOKENS

    @property
    def day(self) -> dt.date:
        return config_date(self.date)

    def spec(self) -> ScorerSpec:
        return ScorerSpec(backend=self.backend, model=self.model, **asdict(self.policy_format), prompt=self.prompt,
                          chat_template=self.chat_template, kv_cache_bytes=int(self.kv_cache_gib * (1 << 30)), **scorer_settings(self))
