"""Models: load any Hugging Face causal LM from a local folder, or build a tiny one from the world.

`init_tiny_model(config)` (the `relevance model init` command) trains a byte-level BPE tokenizer
on the catalog and query text plus the CoT vocabulary of the graph and label set, adds the special
tokens and a ChatML chat template, builds a small Qwen2 config from the config's sizes, and saves
both with `save_pretrained` (safetensors), loadable by `AutoModelForCausalLM` / `AutoTokenizer`.
Nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from schemas.config import ConfigError, help_field
from schemas.graph import FACETS_NONE, LabelSet, ReasoningGraph, format_facets
from schemas.storage import read_table
from schemas.tables import CATALOG, QUERIES
from training.model_files import refuse_adapter, weight_files
from training.prompt import product_facets, render_fields

log = logging.getLogger(__name__)

PAD, BOS, EOS, MASK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, MASK)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ModelInitConfig:
    world: Path = help_field("Folder with the world's tables (catalog, queries) to train the tokenizer on.", Path("world"))
    out: Path = help_field("Folder to write the model and tokenizer to.", Path("models/tiny"))
    graph: str = help_field("Reasoning graph name or YAML path (its tags and values join the vocabulary).", "relevance7")
    label_set: str = help_field("Label set name or YAML path (its labels join the vocabulary).", "wands")
    vocab_size: int = help_field("BPE vocabulary size, special tokens included.", 1024)
    hidden_size: int = help_field("Transformer width.", 128)
    num_layers: int = help_field("Transformer layers.", 4)
    num_heads: int = help_field("Attention heads (must divide hidden_size; vLLM on CPU needs a head size of 32, 64, 80, 96, 112, 128, ...).", 4)
    num_kv_heads: int = help_field("Key/value heads (grouped-query attention; must divide num_heads).", 2)
    intermediate_size: int = help_field("MLP width.", 384)
    max_positions: int = help_field("Longest sequence (prompt + CoT) in tokens.", 512)
    seed: int = help_field("Seed of the weight initialisation.", 0)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive whole number, got {getattr(self, name)}")
        if self.vocab_size < 300:
            raise ConfigError(f"vocab_size: must be at least 300 (256 bytes + specials), got {self.vocab_size}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"num_heads: {self.num_heads} must divide hidden_size {self.hidden_size} into an even head size"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_kv_heads: {self.num_kv_heads} must divide num_heads {self.num_heads}")


def load_model(path: str | Path, dtype: str = "float32"):
    """(model, tokenizer) from a local folder; the tokenizer pads on the left for generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json); run `relevance model init` first")
    weight_files(path)  # refuses a folder whose weights are only pickles, or whose index names a missing shard, before any loading
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # safetensors only (one file or an index and its shards): a pickled pytorch_model.bin is never unpickled
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False)
    return model, tokenizer


def load_model_to_train(path: str | Path):
    """`load_model` for the start of a training run (SFT, GRPO). A folder with a LoRA adapter is refused: transformers
    attaches it unmerged and then saves only the adapter, so the trained policy would be saved without its base."""
    refuse_adapter(path, "a policy trained from it would be saved as the adapter alone")
    return load_model(path)


def _vocabulary_text(world: Path, graph: ReasoningGraph, labels: LabelSet) -> Iterator[str]:
    """The text the tokenizer learns merges from: what the model reads and writes.

    Products and queries as the prompt writes them (`type: ...`, the attributes with the brand), and
    the fixed text of CoTs (node tags, choice values, labels) repeated once per product, so that a tag or a label is as frequent as a catalog word and gets a
    token of its own instead of being spelled out in bytes.
    """
    catalog = read_table(CATALOG, world, columns=["title", "description", "product_type", "attributes", "brand"])
    for row in catalog.to_pylist():
        yield render_fields(
            {"title": row["title"], "type": row["product_type"], "attributes": format_facets(product_facets(row)),
             "description": row["description"] or ""}
        )
    for row in read_table(QUERIES, world, columns=["query"]).to_pylist():
        yield render_fields({"query": row["query"]})
    fixed = [f"{node.name}: " + " ".join(node.values) for node in graph.nodes]
    fixed += [f"{graph.label_node}: {name}" for name in labels.names]
    fixed += [f"{FACETS_NONE} user assistant"]
    for _ in range(catalog.num_rows):
        yield from fixed


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """A byte-level BPE fast tokenizer with the special tokens, EOS = `<|im_end|>`, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=PAD, bos_token=BOS, mask_token=MASK
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def init_tiny_model(config: ModelInitConfig) -> Path:
    """Train the tokenizer, build a randomly initialised Qwen2 model, save both to `config.out`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    graph, labels = ReasoningGraph.load(config.graph), LabelSet.load(config.label_set)
    tokenizer = train_tokenizer(_vocabulary_text(config.world, graph, labels), config.vocab_size)
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(model_config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    config.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(config.out, safe_serialization=True)
    tokenizer.save_pretrained(config.out)
    log.info("tiny policy (%s parameters, vocabulary %d) written to %s", f"{model.num_parameters():,}", len(tokenizer), config.out)
    return config.out


def run(config: ModelInitConfig) -> Path:
    return init_tiny_model(config)
