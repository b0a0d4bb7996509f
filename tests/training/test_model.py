"""`init_tiny_model` writes a folder that the Auto classes load, with our tokens and chat template."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.graph import LabelSet, ReasoningGraph
from training.cot import render_cot
from training.model import EOS, MASK, PAD, load_model


def test_tiny_model_loads_with_auto_classes(tiny_model):
    assert (tiny_model / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "qwen2" and model.config.hidden_size == 32
    assert model.config.vocab_size == len(tokenizer) <= 400
    assert tokenizer.eos_token == EOS and tokenizer.pad_token == PAD and tokenizer.mask_token == MASK
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids(EOS)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "query: sofa"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nquery: sofa<|im_end|>\n<|im_start|>assistant\n"


def test_cot_text_survives_encode_decode(tiny_model):
    _, tokenizer = load_model(tiny_model)
    values = {"qs": "sofa", "qa": "color=gray", "ps": "sofa", "pa": "color=gray; material=wool", "ms": "match", "ma": "match", "y": "Exact"}
    text = render_cot(values, ReasoningGraph.load("relevance7"), "reasoning_first")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids(EOS) not in ids


def test_cot_tags_choices_and_labels_are_whole_tokens(tiny_model):
    """The tokenizer sees the CoT's fixed text as often as the catalog's, so each piece is one token."""
    _, tokenizer = load_model(tiny_model)
    graph, labels = ReasoningGraph.load("relevance7"), LabelSet.load("wands")
    for node in graph.nodes:
        assert tokenizer.tokenize(f"{node.name}:") == [node.name, ":"]
    for value in (*graph.node("ms").values, *graph.node("ma").values, *labels.names):
        assert tokenizer.tokenize(f" {value}") == [f"Ġ{value}"]  # Ġ: byte-level BPE's leading space
