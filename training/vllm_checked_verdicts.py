"""Checked decoding inside a vLLM engine (0.32, V1): a logits processor that does what `training.cot.CheckedVerdicts`
does in the transformers decoding loop.

`training.vllm_engine.build_engine(checked_verdicts=True)` names `CheckedVerdictsProcessor` by its qualified name, so the
engine core process imports it (this module imports vLLM, the rest of the project only where it builds an engine). A
request opts in with `SamplingParams(extra_args={CHECKED_VERDICTS_ARGUMENT: checked_rules(graph).to_json()})`; requests without it
pass untouched.
At each step of an opted-in request, the processor sets to -inf the likelier tokens `CheckedVerdicts.pick` refuses (those
that would write a wrong verdict or a decision its parents contradict), so greedy sampling takes the token the transformers loop takes. It runs after the
structured-output grammar has masked the logits (vLLM applies the grammar bitmask before the sampler's processors), so
it only ranks tokens the CoT format allows: where the transformers loop's checked text is well formed, the engine writes
the same text.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from training.cot import CheckedRules, CheckedVerdicts
from training.vllm_engine import CHECKED_VERDICTS_ARGUMENT


class CheckedVerdictsProcessor(AdapterLogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer, trust_remote_code=False)
        self.checked: dict[str, CheckedVerdicts] = {}  # per rules (as JSON), shared by the requests (its per-token cache fills once)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy sampling takes

    def new_req_logits_processor(self, params: SamplingParams) -> Callable | None:
        rules = (params.extra_args or {}).get(CHECKED_VERDICTS_ARGUMENT)
        if rules is None:
            return None
        if rules not in self.checked:
            self.checked[rules] = CheckedVerdicts(self.tokenizer, CheckedRules.from_json(rules))
        checked = self.checked[rules]

        def refuse_what_breaks_a_rule(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            _, refused = checked.pick(output_ids, logits)
            if refused:
                logits[refused] = float("-inf")
            return logits

        return refuse_what_breaks_a_rule
