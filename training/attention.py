"""The attention function policies run with: transformers' SDPA attention, except that on the CPU grouped
key/value heads reach the kernel as they are.

transformers' `sdpa` copies each key/value head to every query head of its group (`repeat_kv`) whenever the
call has a mask, because CUDA's fast kernels take grouped heads only without one. Left-padded decoding always
has a mask, so on the CPU every decoding step copied the whole KV cache twice over for the tiny policy (4 query
heads, 2 key/value heads). PyTorch's CPU kernel takes grouped heads with a mask (`enable_gqa`), with the same
result. Measured on the tiny policy, greedy decoding of 1024 test prompts at batch 256: 1.07-1.23x the
pairs/s, the same ids for every prompt.

`use_shared_kv_attention(model)` switches a loaded model that runs transformers' `sdpa` to it; other devices,
models without grouped heads and calls without a mask go to transformers' function unchanged.
"""

from __future__ import annotations

SDPA_SHARED_KV = "sdpa_shared_kv"


def _sdpa_shared_kv(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.device.type != "cpu" or attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                                      **kwargs)
    # with a mask transformers' function passes is_causal=False as well: the mask holds the causal pattern
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                                              enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


def use_shared_kv_attention(model) -> None:
    """Run `model` (a transformers model, or a peft model around one) with `_sdpa_shared_kv` when it runs `sdpa`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(SDPA_SHARED_KV, _sdpa_shared_kv)
    AttentionMaskInterface.register(SDPA_SHARED_KV, sdpa_mask)  # the masks sdpa takes
    model.set_attn_implementation(SDPA_SHARED_KV)
