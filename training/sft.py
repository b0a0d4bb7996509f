"""`relevance train sft`: supervised fine-tuning on whole CoTs, with CoT random masking.

Algorithmic choices:
- Data: every judged (query, product) pair of the label set that has gold node values; the target
  is the gold CoT (`training.cot.render_cot`, y from gold_nodes so the CoT is self-consistent),
  the input the chat-templated prompt (`training.prompt.build_prompt`; the brand joins the
  attributes, as in gold `pa`). Pairs come from `training_examples` (`relevance datasets`): its
  train split trains, its validation split (whole queries, none in train) validates. A training
  pair is tokenized when a batch first draws it (a short run on a big world touches a fraction of
  the pairs; tokenizing all 40k demo pairs up front took about a minute).
- Loss: next-token cross-entropy on the CoT tokens and EOS; prompt tokens are -100. Per example and
  step, each reasoning node (every node but the label node) is dropped from the loss with
  probability `p_mask` (its tokens' labels -> -100, from the same token->node map the RL
  advantages use); with `mask_input` those tokens are also replaced in the input by `<|mask|>`.
  The label node is always supervised. One optimizer step = `grad_accum` micro-batches, loss the
  token mean over all of them.
- Optimizer: AdamW, linear warmup then cosine decay to `min_lr_ratio * lr`; full fine-tuning by
  default, LoRA (peft) optional, merged into the saved model at the end.
- Determinism: the sample order (a permutation per epoch) and the masks are functions of
  (seed, step), not of generator state, so a run resumed from a checkpoint (model, optimizer, step)
  continues bit-for-bit on CPU.
- Validation: greedy decoding; strict parse rate (exact lines then EOS), label accuracy and
  macro-F1 (an unparsed label counts as wrong), per-node accuracy, lenient label accuracy; beside
  them the majority-class baseline (the train split's most frequent gold label) on the same pairs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from schemas.config import ConfigError, config_to_dict, help_field
from schemas.graph import LabelSet, ReasoningGraph
from schemas.storage import read_table
from schemas.tables import TRAINING_EXAMPLES
from training.cot import node_correct, node_spans, parse_cot, render_cot, token_nodes
from training.prompt import build_prompt, prompt_offsets
from training.run_folder import RunFolder

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class SFTConfig:
    data: Path = help_field("Data root with training_examples (the output of `relevance datasets`).", Path("datasets"))
    model: Path = help_field("Model folder to start from (`relevance model init` or any local HF causal LM).", Path("models/tiny"))
    out: Path = help_field("Output folder: checkpoints/, metrics.jsonl, summary.json, model/.", Path("runs/sft"))
    graph: str = help_field("Reasoning graph name or YAML path.", "relevance7")
    label_set: str = help_field("Label set of the judgments to train on (wands or esci).", "wands")
    order: str = help_field("CoT order: label_first or reasoning_first (the graph's orders).", "label_first")
    prompt_tokens: int = help_field("Token budget of the prompt text (the description is cut first, then the title).", 48)
    p_mask: float = help_field("Probability of dropping each reasoning node's span from the loss.", 0.3)
    mask_input: bool = help_field("Also replace the dropped nodes' input tokens by <|mask|>.", False)
    lora: bool = help_field("Train LoRA adapters instead of all weights.", False)
    lora_rank: int = help_field("LoRA rank.", 8)
    lora_alpha: float = help_field("LoRA alpha (scale = alpha / rank).", 16.0)
    lora_targets: tuple[str, ...] = help_field(
        "Module names LoRA adapts.", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    lr: float = help_field("Peak learning rate.", 6e-3)
    min_lr_ratio: float = help_field("Final learning rate as a share of lr (cosine floor).", 0.1)
    weight_decay: float = help_field("AdamW weight decay.", 0.0)
    warmup_steps: int = help_field("Linear warmup steps.", 30)
    max_steps: int = help_field("Optimizer steps.", 1000)
    batch_size: int = help_field("Examples per micro-batch.", 32)
    grad_accum: int = help_field("Micro-batches per optimizer step.", 1)
    max_grad_norm: float = help_field("Gradient clipping norm (0: off).", 1.0)
    seed: int = help_field("Seed of the sample order and the masks.", 0)
    checkpoint_every: int = help_field("Save a resumable checkpoint every N steps (0: only at the end).", 200)
    resume: bool = help_field("Continue from the latest checkpoint in out/checkpoints when there is one.", True)
    val_items: int = help_field("Validation pairs decoded per evaluation, evenly spaced over the held-out pairs (0: all).", 300)
    eval_every: int = help_field("Evaluate every N steps (0: only at the end).", 0)
    eval_batch_size: int = help_field("Prompts decoded at once during validation.", 64)
    max_new_tokens: int = help_field("Longest generated CoT during validation.", 96)
    threads: int = help_field("torch CPU threads.", 2)
    device: str = help_field("auto (cuda when present, else cpu), cpu, cuda or cuda:N.", "auto")
    precision: str = help_field("auto (bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16.", "auto")
    tensorboard: bool = help_field("Also write the metrics as TensorBoard scalars under out/tensorboard.", False)

    def __post_init__(self) -> None:
        try:
            ReasoningGraph.load(self.graph).order(self.order)
        except ValueError as error:
            raise ConfigError(f"graph/order: {error}") from None
        if not 0.0 <= self.p_mask <= 1.0:
            raise ConfigError(f"p_mask: must be a probability in [0, 1], got {self.p_mask}")
        for name in ("max_steps", "batch_size", "grad_accum", "prompt_tokens", "max_new_tokens", "threads", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive whole number, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "val_items"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"lr must be > 0 and min_lr_ratio in [0, 1]; got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision: choose auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: choose auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.lora and not self.lora_targets:
            raise ConfigError("lora_targets: name at least one module (e.g. q_proj,v_proj) when lora=true")


@dataclass(frozen=True)
class Example:
    """One tokenized pair: prompt ids (chat template applied) and target ids (CoT + EOS).

    `target_nodes[i]` is the node of target token i (None: separators and EOS), from `token_nodes`.
    """

    query_id: str
    product_id: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    target_nodes: tuple[str | None, ...]
    gold: dict[str, str]


# ---------------------------------------------------------------- data


def load_pairs(data: Path, label_set: str, split: str) -> list[dict]:
    """The `split` rows of `label_set` in `training_examples` (written by `relevance datasets`) that
    have gold node values, sorted by key. Rows without nodes (weak labels) have no CoT to imitate
    and are skipped, with a count in the log."""
    rows = read_table(TRAINING_EXAMPLES, data).to_pylist()
    chosen = [row for row in rows if row["split"] == split and row["label_set"] == label_set]
    if not chosen:
        raise ValueError(f"{data}: training_examples has no {split!r} rows with label_set={label_set!r} (run `relevance datasets`)")
    pairs = [
        {
            "query_id": row["query_id"],
            "product_id": row["product_id"],
            "query": row["query"],
            "title": row["title"],
            "product_type": row["product_type"],
            "attributes": dict(row["facets"]),
            "description": row["description"],
            "gold": dict(row["nodes"]),
        }
        for row in sorted(chosen, key=lambda row: (row["query_id"], row["product_id"]))
        if row["nodes"] is not None
    ]
    if len(pairs) < len(chosen):
        log.warning("%s: %d of %d %s rows have no gold nodes (weak labels) and are skipped", data, len(chosen) - len(pairs), len(chosen), split)
    return pairs


def prompt_ids(tokenizer, prompt_text: str) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt_text}], add_generation_prompt=True, tokenize=True
    )
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_example(pair: dict, tokenizer, graph: ReasoningGraph, order: str, prompt_tokens: int) -> Example:
    prompt = build_prompt(
        pair["query"], pair["title"], pair["product_type"], pair["attributes"], pair["description"],
        prompt_offsets(tokenizer), prompt_tokens,
    )
    cot = render_cot(pair["gold"], graph, order)
    encoded = tokenizer(cot, add_special_tokens=False, return_offsets_mapping=True)
    nodes = token_nodes(encoded["offset_mapping"], node_spans(cot, graph))
    return Example(
        query_id=pair["query_id"],
        product_id=pair["product_id"],
        prompt_ids=tuple(prompt_ids(tokenizer, prompt.text)),
        target_ids=tuple(encoded["input_ids"]) + (tokenizer.eos_token_id,),
        target_nodes=tuple(nodes) + (None,),
        gold=pair["gold"],
    )


# ---------------------------------------------------------------- masking and batches


def draw_masked_nodes(reasoning_nodes: Sequence[str], p_mask: float, generator) -> list[str]:
    """The reasoning nodes dropped from one example's loss (each independently with p_mask)."""
    import torch

    draws = torch.rand(len(reasoning_nodes), generator=generator)
    return [node for node, draw in zip(reasoning_nodes, draws.tolist()) if draw < p_mask]


def example_tensors(example: Example, masked: Sequence[str], mask_input_id: int | None) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: labels -100 on the prompt and on masked nodes' tokens.

    With `mask_input_id`, the masked nodes' input tokens are replaced by it as well.
    """
    drop = set(masked)
    target_inputs = [
        mask_input_id if mask_input_id is not None and node in drop else token
        for token, node in zip(example.target_ids, example.target_nodes)
    ]
    target_labels = [IGNORE if node in drop else token for token, node in zip(example.target_ids, example.target_nodes)]
    return list(example.prompt_ids) + target_inputs, [IGNORE] * len(example.prompt_ids) + target_labels


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) LongTensors of shape (batch, longest)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(row_labels)
        attention[i, : len(ids)] = 1
    return input_ids, attention, labels


def micro_batch_indices(micro: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of global micro-batch `micro`: a fresh permutation per epoch, from (seed, epoch)."""
    import torch

    positions = range(micro * batch_size, (micro + 1) * batch_size)
    permutations: dict[int, list[int]] = {}
    result = []
    for position in positions:
        epoch = position // n
        if epoch not in permutations:
            permutations[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        result.append(permutations[epoch][position % n])
    return result


def learning_rate(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to lr over warmup_steps, then cosine to min_lr_ratio * lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def token_mean_loss(logits, labels, n_tokens: int):
    """Sum of next-token cross-entropy over labelled positions / n_tokens (the step's token count)."""
    import torch.nn.functional as F

    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE, reduction="sum") / n_tokens


# ---------------------------------------------------------------- validation


def cot_metrics(
    generations: Sequence[tuple[str, bool]], golds: Sequence[dict[str, str]], graph: ReasoningGraph, order: str, labels: LabelSet
) -> dict[str, float]:
    """Metrics of generated CoTs (text without EOS, whether EOS was emitted) against gold node values."""
    from sklearn.metrics import f1_score

    n = len(generations)
    if n == 0:
        raise ValueError("cot_metrics: no generations")
    strict = [parse_cot(text, graph, order, labels.names, "strict") for text, _ in generations]
    lenient = [parse_cot(text, graph, order, labels.names, "lenient") for text, _ in generations]
    y = graph.label_node
    gold_labels = [gold[y] for gold in golds]
    predicted = [parsed.get(y) or "<none>" for parsed in strict]
    metrics = {
        "n": float(n),
        "parse_rate": sum(p.well_formed and eos for p, (_, eos) in zip(strict, generations)) / n,
        "label_accuracy": sum(p == g for p, g in zip(predicted, gold_labels)) / n,
        "label_macro_f1": float(f1_score(gold_labels, predicted, labels=labels.names, average="macro", zero_division=0)),
        "label_accuracy_lenient": sum(p.get(y) == g for p, g in zip(lenient, gold_labels)) / n,
    }
    for node in graph.node_names:
        kind = graph.node(node).kind
        metrics[f"node_accuracy/{node}"] = sum(node_correct(kind, p.get(node), g[node]) for p, g in zip(strict, golds)) / n
    return metrics


def majority_baseline(train_labels: Sequence[str], val_labels: Sequence[str], labels: LabelSet) -> dict:
    """Scores of predicting the train split's most frequent label (ties: label set order) for every val pair."""
    from sklearn.metrics import f1_score

    majority = max(labels.names, key=lambda name: sum(label == name for label in train_labels))
    predicted = [majority] * len(val_labels)
    return {
        "label": majority,
        "label_accuracy": sum(label == majority for label in val_labels) / len(val_labels),
        "label_macro_f1": float(f1_score(val_labels, predicted, labels=labels.names, average="macro", zero_division=0)),
    }


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int):
    """(input_ids, attention_mask) (B, longest) long tensors of prompts padded on the left, as generation wants."""
    import torch

    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[i, width - len(ids) :] = 1
    return input_ids, attention


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> list[tuple[str, bool]]:
    """Greedy generations (text up to EOS, whether EOS came) for prompt id lists, left-padded batches."""
    import torch

    results = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        input_ids, attention = left_padded(prompts[start : start + batch_size], tokenizer.pad_token_id)
        width = input_ids.shape[1]
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in output[:, width:].tolist():
            ended = tokenizer.eos_token_id in row
            tokens = row[: row.index(tokenizer.eos_token_id)] if ended else row
            results.append((tokenizer.decode(tokens, skip_special_tokens=False), ended))
    return results


def evaluate(model, tokenizer, examples: Sequence[Example], graph, order, labels, max_new_tokens, batch_size) -> dict[str, float]:
    generations = generate(model, tokenizer, [e.prompt_ids for e in examples], max_new_tokens, batch_size)
    return cot_metrics(generations, [e.gold for e in examples], graph, order, labels)


# ---------------------------------------------------------------- the loop


def resolve_device(device: str, precision: str):
    """(torch.device, autocast dtype or None): mixed precision only on a GPU (bf16 where supported)."""
    import torch

    chosen = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if chosen.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ConfigError(f"precision={precision} needs a GPU; this run is on {chosen}")
        return chosen, None
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return chosen, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def run(config: SFTConfig) -> dict:
    """Train, checkpoint, validate; returns the summary written to out/summary.json."""
    import time

    import torch
    from tqdm import tqdm

    from training.model import load_model

    torch.set_num_threads(config.threads)
    graph, labels = ReasoningGraph.load(config.graph), LabelSet.load(config.label_set)
    device, autocast_dtype = resolve_device(config.device, config.precision)
    model, tokenizer = load_model(config.model)
    model.to(device)
    train = load_pairs(config.data, config.label_set, "train")
    val_pairs = load_pairs(config.data, config.label_set, "validation")
    if config.val_items and len(val_pairs) > config.val_items:
        val_pairs = val_pairs[:: len(val_pairs) // config.val_items][: config.val_items]  # spread over the held-out queries
    val = [encode_example(pair, tokenizer, graph, config.order, config.prompt_tokens) for pair in val_pairs]
    encoded: dict[int, Example] = {}  # train pairs are tokenized when a batch first draws them

    def train_example(index: int) -> Example:
        if index not in encoded:
            encoded[index] = encode_example(train[index], tokenizer, graph, config.order, config.prompt_tokens)
        return encoded[index]
    if config.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets), lora_dropout=0.0, task_type="CAUSAL_LM"),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # fp16 needs loss scaling; bf16 and fp32 do not (the disabled scaler passes everything through).
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    reasoning_nodes = [node for node in graph.node_names if node != graph.label_node]
    mask_input_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token) if config.mask_input else None
    if config.mask_input and (tokenizer.mask_token is None or mask_input_id is None):
        raise ConfigError(f"mask_input: the tokenizer of {config.model} has no mask token; set mask_input=false")

    folder = RunFolder(config.out)
    start_step = 0
    state = folder.start(config.resume)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step = state["step"]
    board = None
    if config.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        board = SummaryWriter(str(config.out / "tensorboard"), purge_step=start_step + 1)
    folder.append({"event": "start", "step": start_step, "train_pairs": len(train), "val_pairs": len(val), "config": config_to_dict(config)})

    started = time.perf_counter()
    bar = tqdm(range(start_step, config.max_steps), desc="sft", unit="step", initial=start_step, total=config.max_steps)
    for step in bar:
        model.train()
        rows = []
        for micro in range(step * config.grad_accum, (step + 1) * config.grad_accum):
            masks = torch.Generator().manual_seed(config.seed * 1_000_003 + micro)
            indices = micro_batch_indices(micro, len(train), config.batch_size, config.seed)
            rows.append([example_tensors(train_example(i), draw_masked_nodes(reasoning_nodes, config.p_mask, masks), mask_input_id) for i in indices])
        n_tokens = sum(label != IGNORE for batch in rows for _, row_labels in batch for label in row_labels[1:])
        lr = learning_rate(step, config.lr, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for batch in rows:
            input_ids, attention, batch_labels = (t.to(device) for t in collate(batch, tokenizer.pad_token_id))
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=input_ids, attention_mask=attention).logits
            loss = token_mean_loss(logits, batch_labels, n_tokens)
            scaler.scale(loss).backward()
            loss_value += loss.item()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        bar.set_postfix(loss=f"{loss_value:.4f}")
        record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "tokens": n_tokens}
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.max_steps:
            record.update({f"val/{k}": v for k, v in evaluate(model, tokenizer, val, graph, config.order, labels, config.max_new_tokens, config.eval_batch_size).items()})
        folder.append(record)
        if board is not None:
            for key, value in record.items():
                board.add_scalar(key, value, step + 1)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            folder.save_checkpoint(step + 1, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()})
    bar.close()
    if board is not None:
        board.close()
    train_seconds = time.perf_counter() - started

    eval_started = time.perf_counter()
    final = evaluate(model, tokenizer, val, graph, config.order, labels, config.max_new_tokens, config.eval_batch_size)
    summary = {
        "steps": config.max_steps,
        "resumed_from": start_step,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - eval_started,
        "train_pairs": len(train),
        "val": final,
        "val_majority": majority_baseline(
            [pair["gold"][graph.label_node] for pair in train], [e.gold[graph.label_node] for e in val], labels
        ),
    }
    folder.append({"step": config.max_steps, **{f"val/{k}": v for k, v in final.items()}})
    saved = model.merge_and_unload() if config.lora else model
    saved.save_pretrained(config.out / "model", safe_serialization=True)
    tokenizer.save_pretrained(config.out / "model")
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    majority = summary["val_majority"]
    print(
        f"sft: {config.max_steps} steps in {train_seconds:.0f} s; validation ({len(val)} pairs): parse rate "
        f"{final['parse_rate']:.3f}, label accuracy {final['label_accuracy']:.3f}, macro-F1 {final['label_macro_f1']:.3f} "
        f"(majority class: {majority['label_accuracy']:.3f} / {majority['label_macro_f1']:.3f}); model in {config.out / 'model'}"
    )
    return summary
