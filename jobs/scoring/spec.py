"""What every scoring backend shares: the spec a scorer is opened with, the `Scorer` interface, the
backends by name, and the model version scores are cached under.

The backends (`jobs.scoring.backends`: hf, student; `jobs.scoring.vllm_scorer`: vllm), the Spark path
(`jobs.scoring.spark`) and the job (`jobs.scoring.run`) import from here and not from each other.

`ScorerSpec` is a plain frozen dataclass holding concrete values (the policy's format already
resolved from its folder), so the Spark path ships it to executors and each Python worker opens its
own scorer (one engine per executor) with `open_scorer`. `SCORERS` names each backend's class as
"module:Class", imported only when a scorer of that backend is opened, so vLLM is loaded only for
`vllm`.

The model version that scores are cached under (`Scorer.model_version`) is the weights' hash plus a
short hash of the settings that change the label distribution (CoT order, graph, label set, prompt
budget, checked decoding; the student's input length): the hf and vllm backends compute the same distribution, so
they share a version and each other's cached scores; the reasoning mode is not part of it (a cached
row keeps the reasoning it was scored with). A zero-shot judge's version also names its prompt and
hashes the prompt file's content, the text it renders (label definitions, reasoning steps) and the
chat template (`<weights>-<prompt name>-<hash>`): an edited prompt or template is another judge, and
nothing scored under the old one is reused.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from schemas.config import help_field
from schemas.graph import LabelSet, ReasoningGraph
from schemas.judge_prompt import POLICY_PROMPT, PRODUCT_FIELDS, JudgePrompt, ZeroShot
from training.cot import COT_TOKEN_BUDGET, checked_rules
from training.model_files import ModelFolderError, base_folder, weight_files
from training.policy_format import STUDENT_FILE, student_meta
from training.predict import REASONING_MODES

SCORERS = {
    "hf": "jobs.scoring.backends:HFScorer",
    "vllm": "jobs.scoring.vllm_scorer:VLLMScorer",
    "student": "jobs.scoring.backends:StudentScorer",
}
BACKENDS = tuple(SCORERS)
# What every model folder needs to load (save_pretrained writes them for a policy and a student alike).
MODEL_FILES = ("config.json", "tokenizer_config.json")


@dataclass(frozen=True, kw_only=True)
class ScorerSettings:
    """How a scorer runs, whatever the model: `relevance score` passes these to the spec as they are."""

    model_name: str = help_field("Name written to the rows; default: the model folder's name.", "")
    reasoning: str = help_field("Reasoning text kept: none (label_first: label step only), sample or all.", "none", choices=REASONING_MODES)
    reasoning_sample: float = help_field("Share of pairs whose reasoning is generated and kept with reasoning=sample.", 0.05)
    batch_size: int = help_field("Pairs per forward/generate batch (hf, student).", 64)
    max_new_tokens: int = help_field("Longest generated CoT.", COT_TOKEN_BUDGET)
    device: str = help_field("cpu, cuda or cuda:N (vllm: cuda:N makes only that GPU visible to the engine).", "cpu")
    dtype: str = help_field("Weights dtype of a policy: float32, bfloat16 or float16.", "float32")
    checked_verdicts: bool = help_field(
        "Checked decoding (hf, vllm): each attribute check's yes/no in the generated reasoning is the comparison of the two "
        "values the policy wrote, not its guess, and the subject match says match exactly when the two subjects written are the "
        "same; sound where values are canonical (training.cot).", False)


def checked_verdicts_problem(backend: str, graph: str) -> str | None:
    """Why checked decoding cannot apply to a scorer of `backend` and `graph`, or None."""
    if backend == "student":
        return "checked_verdicts: the student backend writes no reasoning whose verdicts could be checked"
    try:
        checked_rules(ReasoningGraph.load(graph))
    except ValueError as error:
        return str(error)
    return None


def scorer_settings(config: ScorerSettings) -> dict[str, Any]:
    """The `ScorerSettings` fields of `config` (a ScorerSettings or any subclass) by name."""
    return {field.name: getattr(config, field.name) for field in fields(ScorerSettings)}


@dataclass(frozen=True, kw_only=True)
class ScorerSpec(ScorerSettings):
    """What a scorer needs; everything the Spark path sends to executors."""

    backend: str
    model: str
    graph: str = "relevance7"
    label_set: str = "wands"
    order: str = "label_first"
    prompt_tokens: int = 48
    prompt: str = POLICY_PROMPT  # or a zero-shot judge prompt: a bundled name or a YAML path (schemas.judge_prompt)
    chat_template: str | None = None  # zero-shot: a Jinja file used instead of the model folder's chat template
    seed: int = 0
    kv_cache_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.backend not in SCORERS:
            raise ValueError(f"unknown scoring backend {self.backend!r}; known: {sorted(SCORERS)}")
        weight_files(self.model)  # the weights are there (one file or every shard), not only pickles; check_model_folder reads them
        problem = self.checked_verdicts and checked_verdicts_problem(self.backend, self.graph)
        if problem:
            raise ValueError(problem)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model).name

    def zero_shot(self) -> ZeroShot | None:
        """The zero-shot judge this spec scores with, or None for a trained policy's own prompt."""
        return None if self.prompt == POLICY_PROMPT else _zero_shot(self.prompt, self.label_set, self.graph, self.order)


@functools.cache
def _zero_shot(prompt: str, label_set: str, graph: str, order: str) -> ZeroShot:
    # read once per process: the version the job computes first and the text its scorer renders are the same file's
    return ZeroShot(JudgePrompt.load(prompt), LabelSet.load(label_set), ReasoningGraph.load(graph), order)


def judge_tokenizer(tokenizer, spec: ScorerSpec):
    """`tokenizer` with the chat template a zero-shot spec renders with (its file, else the folder's own; see
    `training.prompt.chat_template`); a policy's tokenizer as it is."""
    if spec.prompt != POLICY_PROMPT:
        from training.prompt import chat_template

        template = chat_template(spec.model, spec.chat_template)  # refuses a folder without one when no file is given
        if spec.chat_template:
            tokenizer.chat_template = template
    return tokenizer


class Scorer(Protocol):
    model_name: str
    model_version: str

    def score(self, pairs: Sequence[dict], ds: dt.date) -> pa.Table:
        """RELEVANCE rows of `pairs` (in their order), partition `ds`."""

    def close(self) -> None:
        """Free the model (and the engine's processes)."""


def open_scorer(spec: ScorerSpec) -> Scorer:
    """The scorer of `spec.backend` (a known one: the spec checks), its module imported now (vLLM only when asked for)."""
    module, name = SCORERS[spec.backend].split(":")
    return getattr(importlib.import_module(module), name)(spec)


def check_model_folder(spec: ScorerSpec) -> None:
    """Refuse, naming the file, a model folder that would fail to load: called before any data work, so a
    bad folder fails a night in a second rather than after its Spark steps. Reads only the header of each weight
    file, every shard and the adapter (safetensors checks it covers the whole file, which a truncated copy does not)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(spec.model)
    needed = MODEL_FILES + ((STUDENT_FILE,) if spec.backend == "student" else ())
    places = {folder, base_folder(folder)}  # an adapter folder's config.json is its base's
    missing = [name for name in needed if not any((place / name).is_file() for place in places)]
    if missing:
        raise ModelFolderError(f"model folder {folder} lacks {', '.join(missing)}: not a complete saved model")
    if spec.prompt != POLICY_PROMPT:
        from training.prompt import chat_template

        chat_template(folder, spec.chat_template)
    if spec.backend == "vllm":
        from training.vllm_engine import check_servable

        check_servable(folder)
    for weights in weight_files(folder):
        if weights.suffix != ".safetensors":
            continue  # the index and the adapter's config: JSON, read by weight_files
        try:
            with safe_open(str(weights), framework="numpy"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelFolderError(f"{weights}: unreadable weights ({error}); the file is truncated or not safetensors") from None


def pair_dicts(pairs: pa.Table) -> list[dict]:
    """Scorer input: one dict per pair, the facets as a dict."""
    return [{**row, "attributes": dict(row["attributes"])} for row in pairs.to_pylist()]


def settings_version(weights_version: str, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]
    return f"{weights_version}-{digest}"


def scorer_version(spec: ScorerSpec) -> str:
    """The version `spec`'s scores are cached under, without loading the model (see the module doc)."""
    from training.model_files import model_version

    weights = model_version(spec.model)
    if spec.backend == "student":
        return settings_version(weights, {"max_length": student_meta(spec.model)["max_length"]})
    settings = {"graph": spec.graph, "label_set": spec.label_set, "order": spec.order, "prompt_tokens": spec.prompt_tokens}
    if spec.checked_verdicts:  # another label distribution, one per set of rules; the versions scored without it stay as they were
        settings["checked_verdicts"] = checked_rules(ReasoningGraph.load(spec.graph)).to_json()
    zero_shot = spec.zero_shot()
    if zero_shot is None:
        return settings_version(weights, settings)
    from training.prompt import chat_template

    placeholders = {name: f"${name}" for name in ("query", *PRODUCT_FIELDS)}
    rendered = json.dumps(zero_shot.messages(placeholders))  # the label set's definitions and the graph's steps as the model reads them
    settings |= {"prompt": zero_shot.prompt.digest, "rendered": _sha(rendered), "chat_template": _sha(chat_template(spec.model, spec.chat_template))}
    return settings_version(f"{weights}-{zero_shot.prompt.name}", settings)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
