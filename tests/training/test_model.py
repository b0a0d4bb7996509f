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


def test_with_space_tokens_a_query_word_is_the_cot_value_it_names():
    """Byte-level BPE writes ` metal` (the query's word) and `metal` (after `material=`) as different tokens; with
    `space_tokens` they are the same ids, and text still decodes to itself."""
    from training.model import train_tokenizer

    texts = ["query: metal coffee table", "pa: brand=Nordholm; material=metal", "title: Metal coffee table | Nordholm"] * 50
    tokenizer = train_tokenizer(iter(texts), 320, space_tokens=True)
    query, cot = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("query: metal coffee", "qa: material=metal"))
    metal = tokenizer("metal", add_special_tokens=False)["input_ids"]
    assert query[-len(metal) - 2:-2] == metal == cot[-len(metal):]
    assert tokenizer.decode(query) == "query: metal coffee" and tokenizer.decode(cot) == "qa: material=metal"
    byte_level = train_tokenizer(iter(texts), 320)
    assert byte_level.tokenize("query: metal")[-1] == "Ġmetal" != byte_level.tokenize("material=metal")[-1]
