"""A real-shaped checkpoint folder for the commands to load: a tiny random Mistral on a production tokenizer,
saved in shards (session fixture, registered in tests/conftest.py).

The tokenizer is Mistral's tekken (`tekken_240911.json`, 131,072 tokens) as the mistral_common package ships
it, converted by transformers with mistral_common's own chat template (`<s>[INST]...[/INST]`): labels and
node tags are ordinary words of its vocabulary, often several tokens, and nothing is added to it (EOS `</s>`
and PAD `<pad>` are its own). The model is 2 layers x 64 with a head size of 32 (the smallest vLLM's CPU
attention runs), saved with a small `max_shard_size`, so the folder holds `model.safetensors.index.json`
and several shards instead of `model.safetensors`.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

# small enough that the 2 x 64 layers fill a shard of their own beside the embedding's (33 MB, a shard alone)
MAX_SHARD_SIZE = "200KB"


def tekken_file() -> Path:
    """The tekken vocabulary file mistral_common ships (a dependency of vLLM; the test extra names it too)."""
    pytest.importorskip("mistral_common", reason="mistral_common ships the production tokenizer these tests load")
    return Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tekken_240911.json"


def save_sharded(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(folder)
    return folder


def reshard(policy: Path, folder: Path) -> Path:
    """A copy of the saved policy in `policy` (weights, tokenizer, policy.json) whose weights are in shards."""
    from training.model import load_model
    from training.policy_format import POLICY_FORMAT_FILE

    save_sharded(*load_model(policy), folder)
    shutil.copy(policy / POLICY_FORMAT_FILE, folder / POLICY_FORMAT_FILE)
    return folder


@pytest.fixture(scope="session")
def sharded_policy(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig
    from transformers.integrations.mistral import convert_tekken_tokenizer

    tokenizer = convert_tekken_tokenizer(str(tekken_file()))  # the chat template: mistral_common's for this tokenizer
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return save_sharded(model, tokenizer, tmp_path_factory.mktemp("sharded_policy"))
