"""Models: load any Hugging Face causal LM from a local folder (an adapter folder: its base with the LoRA adapter,
unmerged), save a trained policy, merge an adapter folder into full weights, or build a tiny model from the world.

`init_tiny_model(config)` (the `relevance model init` command) trains a byte-level BPE tokenizer
on the catalog and query text plus the CoT vocabulary of the graph and label set, adds the special
tokens and a ChatML chat template, builds a small Qwen2 config from the config's sizes, and saves
both with `save_pretrained` (safetensors), loadable by `AutoModelForCausalLM` / `AutoTokenizer`.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from schemas.config import ConfigError, help_field
from schemas.graph import DEFAULT_GRAPH, FACETS_NONE, LabelSet, ReasoningGraph, format_facets
from schemas.storage import read_table
from schemas.tables import CATALOG, QUERIES
from training.attention import use_shared_kv_attention
from training.model_files import (
    ADAPTER_CONFIG_FILE,
    ModelFolderError,
    adapter_base,
    model_version,
    record_adapter_base,
    refuse_adapter,
    remove_weights,
    weight_files,
)
from training.policy_format import PolicyFormat
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
    graph: str = help_field("Reasoning graph name or YAML path (its tags and values join the vocabulary).", DEFAULT_GRAPH)
    label_set: str = help_field("Label set name or YAML path (its labels join the vocabulary).", "wands")
    vocab_size: int = help_field(
        "BPE vocabulary size, special tokens included (2048: the demo world's value forms become whole tokens; with the SFT "
        "recipe, test qa 0.896-0.924 and macro-F1 0.932-0.969 over three seeds, where 1024 gave 0.756-0.829 and 0.914-0.937).", 2048)
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


def load_model(path: str | Path, dtype: str = "float32", trainable_adapter: bool = False):
    """(model, tokenizer) from a local folder; the tokenizer pads on the left for generation.

    An adapter folder (`training.model_files`) gives its base with the adapter attached unmerged (a peft model;
    `trainable_adapter`: its weights train), after checking the base is the version it was trained on.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    base = adapter_base(path)
    weights = base or path
    if not (weights / "config.json").is_file():
        raise FileNotFoundError(f"{weights} is not a model folder (no config.json); run `relevance model init` first")
    # refuses a folder whose weights are only pickles, or whose index names a missing shard, before any loading; an adapter
    # folder's base other than the one it was trained on (hashing each file once per process)
    if base is not None:
        model_version(path)
    else:
        weight_files(path)
    # the policy's own tokenizer: an adapter folder holds one beside its adapter (else its base's)
    tokenizer = AutoTokenizer.from_pretrained(path if (path / "tokenizer_config.json").is_file() else weights, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # safetensors only (one file or an index and its shards): a pickled pytorch_model.bin is never unpickled
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False)
    use_shared_kv_attention(model)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path, is_trainable=trainable_adapter)
    return model, tokenizer


def load_model_to_train(path: str | Path):
    """`load_model` for the start of a training run (SFT, GRPO): an adapter folder gives its base with the adapter
    trainable (training continues it). An adapter saved beside full weights is refused: transformers attaches it
    unmerged, and the folder it would be saved against as its base holds that adapter too."""
    refuse_adapter(path, "a policy trained from it would be saved as the adapter alone")
    return load_model(path, trainable_adapter=True)


@dataclass(frozen=True)
class ModelMergeConfig:
    model: Path = help_field("Adapter folder to merge (a LoRA-trained policy: `relevance train sft|grpo` with lora=true wrote it).",
                             Path("runs/grpo/model"))
    out: Path = help_field("Folder to write the merged policy to: full safetensors weights, tokenizer, policy.json.", Path("models/merged"))
    max_shard_size: str = help_field("Largest weights file; a bigger model is saved in shards with an index (save_pretrained's).", "5GB")

    def __post_init__(self) -> None:
        try:
            base = adapter_base(self.model)
        except ModelFolderError as error:
            raise ConfigError(f"model: {error}") from None
        if base is None:
            raise ConfigError(f"model: {self.model} is not an adapter folder (no {ADAPTER_CONFIG_FILE} without full weights beside it); "
                              "its weights are full already")
        if self.out.resolve() in (Path(self.model).resolve(), base.resolve()):
            raise ConfigError(f"out: {self.out} is the adapter folder or its base; merge into a folder of its own")


def merge_adapter(config: ModelMergeConfig) -> Path:
    """The adapter folder's policy as one folder of full weights (the `relevance model merge` command): base + adapter
    merged (peft's `merge_and_unload`, in float32), saved in the base's dtype, with the tokenizer and policy.json."""
    import torch

    from training.policy_format import resolve_format

    saved = json.loads((adapter_base(config.model) / "config.json").read_text())
    dtype = getattr(torch, str(saved.get("dtype") or saved.get("torch_dtype") or "float32"))  # the base's as saved
    model, tokenizer = load_model(config.model)
    merged = model.merge_and_unload().to(dtype)
    save_policy(merged, tokenizer, config.out, resolve_format(config.model), max_shard_size=config.max_shard_size)
    log.info(f"merged {config.model} into its base {adapter_base(config.model)}: {config.out}")
    return config.out


def save_policy(model, tokenizer, folder: Path, policy_format: PolicyFormat, base: Path | None = None, **save_options) -> None:
    """Save a trained policy into `folder`: the weights, the tokenizer and `policy.json`.

    A peft LoRA model with a `base` is saved as an adapter folder (`training.model_files`): peft's adapter files, with
    `base_model_name_or_path` the base folder's absolute path, and the base's version in `adapter_base.json`.
    Otherwise the full weights, LoRA merged in, as safetensors (`save_options` go to `save_pretrained`, e.g.
    `max_shard_size`). Weight files an earlier save left in the folder are removed first.
    """
    from peft import PeftModel

    folder.mkdir(parents=True, exist_ok=True)
    remove_weights(folder)
    if isinstance(model, PeftModel) and base is not None:
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = str(Path(base).resolve())
        model.save_pretrained(folder, safe_serialization=True)
        record_adapter_base(folder, base)
    else:
        saved = model.merge_and_unload() if isinstance(model, PeftModel) else model
        saved.save_pretrained(folder, safe_serialization=True, **save_options)
    tokenizer.save_pretrained(folder)
    policy_format.save(folder)


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
