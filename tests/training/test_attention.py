"""The attention policies run with: grouped key/value heads go to the CPU kernel as they are, with transformers' results."""

from __future__ import annotations

from unittest import mock

import torch
from transformers.integrations import sdpa_attention

from training.attention import SDPA_SHARED_KV
from training.decoding import left_padded


def test_a_loaded_policy_attends_with_shared_heads_and_the_logits_and_gradients_of_sdpa(tiny_model):
    from training.model import load_model

    model, _ = load_model(tiny_model)
    assert model.config._attn_implementation == SDPA_SHARED_KV and model.config.num_key_value_heads < model.config.num_attention_heads
    input_ids, attention = left_padded([[1, 5, 6, 7, 8], [1, 9], [1, 20, 21]], pad_id=0)  # left padding: a mask at every layer

    def logits_and_gradient(implementation: str):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        with mock.patch.object(sdpa_attention, "repeat_kv", wraps=sdpa_attention.repeat_kv) as copies:
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            (logits * attention[..., None]).sum().backward()
        gradient = model.model.layers[0].self_attn.k_proj.weight.grad.clone()
        return logits.detach(), gradient, copies.call_count

    shared_logits, shared_gradient, shared_copies = logits_and_gradient(SDPA_SHARED_KV)
    logits, gradient, copies = logits_and_gradient("sdpa")
    assert shared_copies == 0 and copies == 2 * model.config.num_hidden_layers  # transformers copies keys and values per layer
    assert torch.allclose(shared_logits, logits, atol=1e-5) and torch.allclose(shared_gradient, gradient, atol=1e-5)
