"""`relevance train sft`: supervised fine-tuning on whole CoTs, with CoT random masking.

Algorithmic choices:
- Data: every judged (query, product) pair of the label set that has gold node values
  (`training.examples`); the target is the gold CoT plus EOS, the input the chat-templated prompt.
  The train split of `training_examples` (`relevance datasets`) trains, its validation split (whole
  queries, none in train) validates. A training pair is tokenized when a batch first draws it (a
  short run on a big world touches a fraction of the pairs; tokenizing all 40k demo pairs up front
  took about a minute).
- Loss: next-token cross-entropy on the CoT tokens and EOS; prompt tokens are -100. Per example and
  step, each reasoning node (every node but the label node) is dropped from the loss with
  probability `p_mask` (its tokens' labels -> -100, from the same token->node map the RL
  advantages use, `training.examples.token_node_map`); with `mask_input` those tokens are also
  replaced in the input by `<|mask|>`. The label node is always supervised. One optimizer step =
  `grad_accum` micro-batches, loss the weighted token mean over all of them (each micro-batch runs as
  `length_splits` passes over its examples sorted by length: the same sum, and at the demo's lengths padding
  falls from a fifth of the tokens computed to a twentieth): the tokens of the
  decisions (the graph's choice nodes and the label: ms, ma, y) weigh `decision_weight`, every other
  token 1. Those are three one-word lines among ~50 target tokens that mostly copy the prompt, and
  they are what the label is made of; at weight 1 a small model spends its first thousands of steps
  on the copying and learns the comparisons last.
- Value swaps (`value_swaps`, a share of the draws): a drawn pair whose query names one of its constraint values
  verbatim is trained with that value replaced by another of its key, the checks, `ma` and the label recomputed by the
  graph's rules (`training.value_swaps`); drawn per (seed, micro-batch) like the masks.
- Query typos (`query_typos`, a share of the draws, after the swaps): a drawn pair is trained with one single-letter
  typo in one word of its query, its nodes unchanged (`training.query_typos`); drawn per (seed, micro-batch) too.
- Optimizer: AdamW, linear warmup then cosine decay to `min_lr_ratio * lr`; full fine-tuning by
  default, LoRA (peft) optional: saved as an adapter folder naming its base (`save_merged`: merged into
  full weights instead); from an adapter folder, its adapter trains on.
- Determinism: the sample order (a permutation per epoch) and the masks are functions of
  (seed, step), not of generator state, so a run resumed from a checkpoint (model, optimizer, step)
  continues bit-for-bit on CPU.
- Validation: greedy decoding (`training.validation`); strict parse rate, label accuracy and
  macro-F1, per-node accuracy, lenient label accuracy; beside them the majority-class baseline (the
  train split's most frequent gold label) on the same pairs.
- Several processes (torchrun, `training.distributed`): `batch_size` is the global micro-batch; each
  process draws the same examples and masks and trains on its contiguous share, the step's token weight
  is all-reduced, so N processes take the optimizer step one process takes (up to float summation
  order). DDP by default, FSDP2 with `parallel=fsdp`; rank 0 writes metrics, checkpoints (the full
  state: a run resumes under another world size) and the model.
- Output: out/model holds the weights (with LoRA: the adapter folder), the tokenizer and `policy.json`
  (graph, label set, CoT order, prompt budget: the format every later reader of the policy takes from there).
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from schemas.config import ConfigError, check_choices, config_to_dict, help_field
from schemas.graph import DEFAULT_GRAPH, LabelSet, ReasoningGraph
from schemas.logs import progress
from training.cot import COT_TOKEN_BUDGET
from training.distributed import (
    Parallel,
    all_reduce,
    barrier,
    checkpoint_state,
    clip_gradients,
    gradient_sync,
    launched_world_size,
    local_device,
    parallel_field,
    parallel_run,
    run_on_local_processes,
    unsharded_model,
    wrap_model,
)
from training.examples import IGNORE, Example, encode_example, load_pairs
from training.loop import (
    autocast,
    enable_gradient_checkpointing,
    learning_rate,
    lora_save_base,
    micro_batch_indices,
    resolve_device,
    resolve_lora,
    resume_state,
    validation_subsample,
    wrap_lora,
)
from training.model import save_policy
from training.policy_format import PolicyFormat
from training.query_typos import draw_typos
from training.run_folder import RunFolder, val_entries
from training.validation import evaluate, majority_baseline
from training.value_swaps import ValueSwaps, swap_nodes

SFT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

log = logging.getLogger(__name__)

Rows = list[tuple[list[int], list[int], list[float]]]  # one micro-batch: (input ids, labels, loss weights) per example


@dataclass(frozen=True)
class SFTConfig:
    data: Path = help_field("Data root with training_examples (the output of `relevance datasets`).", Path("datasets"))
    model: Path = help_field("Model folder to start from (`relevance model init` or any local HF causal LM).", Path("models/tiny"))
    out: Path = help_field("Output folder: checkpoints/, metrics.jsonl, summary.json, model/.", Path("runs/sft"))
    graph: str = help_field("Reasoning graph name or YAML path.", DEFAULT_GRAPH)
    label_set: str = help_field("Label set of the judgments to train on (wands or esci).", "wands")
    order: str = help_field("CoT order, one of the graph's orders (relevance7 and relevance8: label_first, reasoning_first, product_first).", "product_first")
    prompt_tokens: int = help_field("Token budget of the prompt text (the description is cut first, then the title).", 48)
    p_mask: float = help_field(
        "Probability of dropping each reasoning node's span from the loss (0.1: test macro-F1 0.914 / 0.937 / 0.937 over three "
        "seeds of the 4000-step recipe with the 1024 vocabulary, against 0.898 / 0.900 / 0.901 with 0.3).", 0.1)
    decision_weight: float = help_field("Loss weight of the decision nodes' tokens (ms, ma and the label); other tokens weigh 1.", 1.0)
    mask_input: bool = help_field("Also replace the dropped nodes' input tokens by <|mask|>.", False)
    value_swaps: float = help_field(
        "Share of training examples drawn with a constraint value their query names replaced by another value of its key, in "
        "the query and in the nodes that follow from it (`training.value_swaps`): teaches reading a value off the query, "
        "where values few training queries name are otherwise misread (0: off; 0.25 at the demo's 1600 steps, two seeds: "
        "brand misreads 101 -> 17 and 3 -> 3 of 400 pairs, macro-F1 +0.007 / +0.051 as written, +0.022 / +0.009 checked).", 0.25)
    query_typos: float = help_field(
        "Share of training examples drawn with one typo in the query (a word's two neighbouring letters swapped, one dropped, "
        "doubled or replaced), the nodes unchanged (`training.query_typos`): teaches reading misspelled subjects and values "
        "(0: off; 0.1 in the recipe, seeds 1 / 2 on 2000 sampled test pairs: macro-F1 as written 0.950 -> 0.980 / 0.966 -> "
        "0.977, `ms` 0.940 -> 0.988 / 0.976 -> 0.988, and on the 13 queries that misspell their type `qs` 0.938 -> 0.996 / "
        "0.842 -> 0.977).", 0.1)
    lora: bool | None = help_field("Train LoRA adapters instead of all weights (default: true when --model is an adapter folder, "
                                   "whose adapter training continues; else false).", None)
    lora_rank: int | None = help_field("LoRA rank (default: the start adapter's, else 8).", None)
    lora_alpha: float | None = help_field("LoRA alpha, scale = alpha / rank (default: the start adapter's, else 16).", None)
    lora_targets: tuple[str, ...] | None = help_field(
        "Module names LoRA adapts (default: the start adapter's, else q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).", None)
    save_merged: bool = help_field("With LoRA: save out/model as full weights with the adapter merged in, instead of an adapter folder "
                                   "that names its base model folder.", False)
    lr: float = help_field("Peak learning rate.", 4e-3)
    min_lr_ratio: float = help_field("Final learning rate as a share of lr (cosine floor).", 0.1)
    weight_decay: float = help_field("AdamW weight decay.", 0.0)
    warmup_steps: int = help_field("Linear warmup steps.", 100)
    max_steps: int = help_field("Optimizer steps (5000: 28-34 minutes for the tiny policy on 2 cores as processes=2, threads=1, as this "
                                "machine's speed varies by day; with compile=true 30 minutes on a day the eager steps would have taken 30-34).", 5000)
    batch_size: int = help_field("Examples per micro-batch, over all processes (each of N processes under torchrun takes batch_size / N).", 32)
    grad_accum: int = help_field("Micro-batches per optimizer step.", 1)
    length_splits: int = help_field("Forward and backward passes per micro-batch, each over a part of its examples sorted by length: "
                                    "the same gradient, less padding (1: one pass over the micro-batch).", 4)
    max_grad_norm: float = help_field("Gradient clipping norm (0: off).", 1.0)
    seed: int = help_field("Seed of the sample order and the masks.", 0)
    checkpoint_every: int = help_field("Save a resumable checkpoint every N steps (0: only at the end).", 200)
    resume: bool = help_field("Continue from the latest checkpoint in out/checkpoints when there is one.", True)
    val_items: int = help_field("Validation pairs decoded per evaluation, evenly spaced over the held-out pairs (0: all).", 300)
    eval_every: int = help_field("Evaluate every N steps (0: only at the end).", 0)
    eval_batch_size: int = help_field("Prompts decoded at once during validation.", 64)
    max_new_tokens: int = help_field("Longest generated CoT during validation.", COT_TOKEN_BUDGET)
    threads: int = help_field("torch CPU threads (of each process).", 2)
    processes: int = help_field("Processes this command trains on, launched by itself on this machine (DDP: gloo on the CPU, one GPU each "
                                "under device=cuda), each with `threads` threads; 1: this process alone. The tiny policy on 2 cores: 2 "
                                "processes of 1 thread take a step 1.21x faster than 1 of 2 (the same steps, to float rounding). Under "
                                "torchrun leave it at 1: torchrun launched the processes already.", 1)
    device: str = help_field("auto (cuda when present, else cpu), cpu, cuda or cuda:N.", "auto")
    precision: str = help_field("auto (bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16.", "auto")
    parallel: str = parallel_field("model", ", for a model that does not fit one device")
    gradient_checkpointing: bool = help_field("Recompute each block's activations in backward instead of keeping them (less memory, "
                                              "one more forward pass of compute).", False)
    compile: bool = help_field("Train through torch.compile (inductor, dynamic shapes: one compilation for every batch width). It costs "
                               "45-65 s at the start and needs a C++ compiler on CPU; the steps then run faster (fused element-wise work: the tiny "
                               "policy's SFT steps 0.82-0.84x as long on 2 cores as processes=2, threads=1).",
                               False)
    tensorboard: bool = help_field("Also write the metrics as TensorBoard scalars under out/tensorboard.", False)

    def __post_init__(self) -> None:
        try:
            graph = ReasoningGraph.load(self.graph)
            graph.order(self.order)
        except ValueError as error:
            raise ConfigError(f"graph/order: {error}") from None
        if self.decision_weight <= 0:
            raise ConfigError(f"decision_weight: must be > 0, got {self.decision_weight}")
        if not 0.0 <= self.p_mask <= 1.0:
            raise ConfigError(f"p_mask: must be a probability in [0, 1], got {self.p_mask}")
        if not 0.0 <= self.value_swaps <= 1.0:
            raise ConfigError(f"value_swaps: must be a share in [0, 1], got {self.value_swaps}")
        if not 0.0 <= self.query_typos <= 1.0:
            raise ConfigError(f"query_typos: must be a share in [0, 1], got {self.query_typos}")
        if self.value_swaps:
            try:
                swap_nodes(graph)
            except ValueError as error:
                raise ConfigError(f"value_swaps: {error}; set value_swaps=0") from None
        resolve_lora(self, SFT_LORA_TARGETS)
        for name in ("max_steps", "batch_size", "grad_accum", "length_splits", "prompt_tokens", "max_new_tokens", "threads", "processes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive whole number, got {getattr(self, name)}")
        Parallel(device=None, world_size=self.processes).require_divisible("batch_size", self.batch_size)
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "val_items"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"lr must be > 0 and min_lr_ratio in [0, 1]; got lr={self.lr}, min_lr_ratio={self.min_lr_ratio}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision: choose auto, fp32, bf16 or fp16, got {self.precision!r}")
        check_choices(self)
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise ConfigError("precision: fp16 needs a loss scaler that FSDP's sharded gradients do not get here; use bf16 with parallel=fsdp")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: choose auto, cpu, cuda or cuda:N, got {self.device!r}")


# ---------------------------------------------------------------- masking, batches, loss


def draw_masked_nodes(reasoning_nodes: Sequence[str], p_mask: float, generator) -> list[str]:
    """The reasoning nodes dropped from one example's loss (each independently with p_mask)."""
    import torch

    draws = torch.rand(len(reasoning_nodes), generator=generator)
    return [node for node, draw in zip(reasoning_nodes, draws.tolist()) if draw < p_mask]


def example_tensors(example: Example, masked: Sequence[str], mask_input_id: int | None,
                    node_weights: Mapping[str, float] | None = None) -> tuple[list[int], list[int], list[float]]:
    """(input ids, labels, loss weights) of one example: labels -100 on the prompt and on masked nodes' tokens.

    With `mask_input_id`, the masked nodes' input tokens are replaced by it as well. A target token weighs
    `node_weights[its node]` (1 for nodes not named and for tokens of no node); prompt tokens weigh 0.
    """
    drop = set(masked)
    target_inputs = [
        mask_input_id if mask_input_id is not None and node in drop else token
        for token, node in zip(example.target_ids, example.target_nodes)
    ]
    target_labels = [IGNORE if node in drop else token for token, node in zip(example.target_ids, example.target_nodes)]
    weights = node_weights or {}
    target_weights = [0.0 if node in drop else weights.get(node, 1.0) for node in example.target_nodes]
    return (list(example.prompt_ids) + target_inputs, [IGNORE] * len(example.prompt_ids) + target_labels,
            [0.0] * len(example.prompt_ids) + target_weights)


ExamplesOf = Callable[[int, Sequence[int], slice], list[Example]]  # (micro-batch, its indices, this process's part) -> examples


def training_examples(config: SFTConfig, train: Sequence[dict], tokenizer, graph: ReasoningGraph, labels: LabelSet) -> ExamplesOf:
    """The examples of a micro-batch's part: each pair's encoding (tokenized when first drawn, then kept), or with
    `value_swaps` a swapped pair's (`training.value_swaps`) and with `query_typos` a pair's (swapped or not) with a typo
    in its query (`training.query_typos`), both drawn for the whole micro-batch as a function of (seed, micro-batch)
    like the masks, so a part's draws are those one process would draw."""
    encode = functools.partial(encode_example, tokenizer=tokenizer, graph=graph, order=config.order, prompt_tokens=config.prompt_tokens)
    example_at = functools.cache(lambda index: encode(train[index]))
    if not config.value_swaps and not config.query_typos:
        return lambda micro, indices, part: [example_at(index) for index in indices[part]]
    swaps = ValueSwaps(train, graph, labels) if config.value_swaps else None

    def examples_of(micro: int, indices: Sequence[int], part: slice) -> list[Example]:
        drawn = swaps.draw(indices, config.value_swaps, random.Random(f"value-swaps/{config.seed}/{micro}")) if swaps else [None] * len(indices)
        if config.query_typos:
            typed = draw_typos([pair or train[index] for index, pair in zip(indices, drawn)], config.query_typos,
                               random.Random(f"query-typos/{config.seed}/{micro}"))
            drawn = [typo or pair for typo, pair in zip(typed, drawn)]
        return [example_at(index) if pair is None else encode(pair) for index, pair in list(zip(indices, drawn))[part]]

    return examples_of


def masked_micro_batches(step: int, config: SFTConfig, examples_of: ExamplesOf, n_train: int,
                         reasoning_nodes: Sequence[str], mask_input_id: int | None, node_weights: Mapping[str, float],
                         part: slice = slice(None)) -> list[Rows]:
    """The `grad_accum` micro-batches of optimizer step `step`, each cut to its examples at `part` (this process's
    share); sample order and masks are functions of (seed, micro-batch), drawn for the whole micro-batch, so a
    share's masks are those one process would draw."""
    import torch

    batches = []
    for micro in range(step * config.grad_accum, (step + 1) * config.grad_accum):
        masks = torch.Generator().manual_seed(config.seed * 1_000_003 + micro)
        indices = micro_batch_indices(micro, n_train, config.batch_size, config.seed)
        masked = [draw_masked_nodes(reasoning_nodes, config.p_mask, masks) for _ in indices]
        batches.append([example_tensors(example, nodes, mask_input_id, node_weights)
                        for example, nodes in zip(examples_of(micro, indices, part), masked[part])])
    return batches


def collate(rows: Rows, pad_id: int):
    """Right-padded (input_ids, attention_mask, labels, loss weights) of shape (batch, longest)."""
    import torch

    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    weights = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (ids, row_labels, row_weights) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(row_labels)
        weights[i, : len(ids)] = torch.tensor(row_weights)
        attention[i, : len(ids)] = 1
    return input_ids, attention, labels, weights


def length_sorted_parts(rows: Rows, parts: int) -> list[Rows]:
    """`rows` sorted by length and cut into at most `parts` contiguous parts of near-equal size (as many parts for
    every process's equal share, so FSDP's collectives line up): padded to its own longest, each part pads little."""
    ordered = sorted(rows, key=lambda row: len(row[0]))
    size, extra = divmod(len(ordered), parts)
    bounds = [k * size + min(k, extra) for k in range(parts + 1)]
    return [ordered[start:end] for start, end in zip(bounds, bounds[1:]) if end > start]


def weighted_token_loss(logits, labels, weights, total_weight: float):
    """Sum over labelled positions of weight x next-token cross-entropy / total_weight (the step's summed weight)."""
    import torch.nn.functional as F

    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    losses = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE, reduction="none")
    return (losses * weights[:, 1:].reshape(-1)).sum() / total_weight


# ---------------------------------------------------------------- one optimizer step


@dataclass
class Optimisation:
    """The model being trained and what steps it: `trained`, the module the training passes go through (the
    model itself, or its DDP wrapper), AdamW over the trainable parameters, the gradient scaler (active with
    fp16 only), the autocast dtype (None: full precision) and the processes the batch is split over."""

    model: object
    trained: object
    params: list
    optimizer: object
    scaler: object
    device: object
    autocast_dtype: object
    parallel: Parallel
    length_splits: int = 1

    @classmethod
    def create(cls, model, config: SFTConfig, parallel: Parallel, autocast_dtype) -> Optimisation:
        import torch

        trained = wrap_model(model, parallel)
        if config.compile:
            trained = torch.compile(trained, dynamic=True)  # the wrapper compiled, so DDP's and FSDP's hooks stay in the graph
        params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP swaps in the shards
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        # fp16 needs loss scaling; bf16 and fp32 do not (the disabled scaler passes everything through).
        scaler = torch.amp.GradScaler(parallel.device.type, enabled=autocast_dtype == torch.float16)
        return cls(model, trained, params, optimizer, scaler, parallel.device, autocast_dtype, parallel, config.length_splits)

    def step(self, batches: Sequence[Rows], total_weight: float, lr: float, pad_id: int, max_grad_norm: float) -> tuple[float, float]:
        """Accumulate the loss over the micro-batches, each in `length_splits` passes (each a weighted sum over its tokens
        / the step's `total_weight`, the whole step's over all processes), clip, step; returns (this process's share of the loss, gradient norm)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        passes = [part for batch in batches for part in length_sorted_parts(batch, self.length_splits)]
        for k, part in enumerate(passes):
            input_ids, attention, batch_labels, weights = (t.to(self.device) for t in collate(part, pad_id))
            with gradient_sync(self.trained, self.parallel, enabled=k == len(passes) - 1):
                with autocast(self.device, self.autocast_dtype):
                    logits = self.trained(input_ids=input_ids, attention_mask=attention).logits
                loss = weighted_token_loss(logits, batch_labels, weights, total_weight)
                self.scaler.scale(loss * self.parallel.loss_scale).backward()
            loss_value += loss.item()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.params, max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss_value, grad_norm


# ---------------------------------------------------------------- the command


def run(config: SFTConfig) -> dict:
    """Train, checkpoint, validate, save; returns the summary written to out/summary.json. Under torchrun, or on the
    `processes` it launches, every process runs this (rank 0 writes)."""
    import torch

    if config.processes > 1 and launched_world_size() == 1:
        return run_on_local_processes(config.processes, run, config)
    torch.set_num_threads(config.threads)
    device, autocast_dtype = resolve_device(local_device(config.device), config.precision)
    with parallel_run(device, config.parallel) as parallel:
        return train_and_save(config, parallel, autocast_dtype)


def policy_to_train(config: SFTConfig):
    """(start policy on the CPU, with LoRA adapters when asked or continued from an adapter folder; tokenizer)."""
    from training.model import load_model_to_train
    from training.model_files import adapter_base

    model, tokenizer = load_model_to_train(config.model)  # an adapter folder: its base with the adapter trainable
    if config.lora and adapter_base(config.model) is None:
        model = wrap_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
    return model, tokenizer


def train_and_save(config: SFTConfig, parallel: Parallel, autocast_dtype) -> dict:
    """`run` on this process: its share of every batch, the same collectives as the other processes."""
    import torch

    parallel.require_divisible("batch_size", config.batch_size)
    if parallel.sharded and autocast_dtype == torch.float16:
        raise ConfigError("precision: this GPU has no bf16, and fp16 needs a loss scaler that FSDP's sharded gradients do not get here; "
                          "set precision=fp32 or parallel=ddp")
    graph, labels = ReasoningGraph.load(config.graph), LabelSet.load(config.label_set)
    model, tokenizer = policy_to_train(config)
    if not parallel.sharded:
        model.to(parallel.device)  # FSDP moves each block's shard as it shards it (`wrap_model`): the whole model never sits on one device
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    train = load_pairs(config.data, config.label_set, "train")
    val_pairs = validation_subsample(load_pairs(config.data, config.label_set, "validation"), config.val_items)
    val = [encode_example(pair, tokenizer, graph, config.order, config.prompt_tokens) for pair in val_pairs]
    training = Optimisation.create(model, config, parallel, autocast_dtype)
    mask_input_id = mask_token_id(tokenizer, config)

    folder = RunFolder(config.out, config_to_dict(config), writer=parallel.is_main)
    start_step = resume_state(folder, config.resume, parallel, model=model, optimizer=training.optimizer, scaler=training.scaler)
    folder.append({"event": "start", "step": start_step, "train_pairs": len(train), "val_pairs": len(val), "processes": parallel.world_size,
                   "config": folder.config})
    started = time.perf_counter()
    train_steps(config, training, tokenizer, train, val, graph, labels, folder, start_step, mask_input_id)
    train_seconds = time.perf_counter() - started

    eval_started = time.perf_counter()
    final = evaluate(model, tokenizer, val, graph, config.order, labels, config.max_new_tokens, config.eval_batch_size, parallel)
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
    folder.append({"step": config.max_steps, **val_entries(final)})
    saved = unsharded_model(model, parallel, lambda: policy_to_train(config)[0])
    if saved is not None:
        save_policy(saved, tokenizer, config.out / "model",
                    PolicyFormat(graph=config.graph, label_set=config.label_set, order=config.order, prompt_tokens=config.prompt_tokens),
                    lora_save_base(config))
        (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
        log_summary(config, summary, len(val))
    barrier(parallel)
    return summary


def mask_token_id(tokenizer, config: SFTConfig) -> int | None:
    """The id that replaces masked nodes' input tokens (`mask_input`), None without it."""
    mask_input_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token) if config.mask_input else None
    if config.mask_input and (tokenizer.mask_token is None or mask_input_id is None):
        raise ConfigError(f"mask_input: the tokenizer of {config.model} has no mask token; set mask_input=false")
    return mask_input_id


def train_steps(config: SFTConfig, training: Optimisation, tokenizer, train: Sequence[dict], val: Sequence[Example],
                graph: ReasoningGraph, labels: LabelSet, folder: RunFolder, start_step: int, mask_input_id: int | None) -> None:
    """Optimizer steps start_step .. max_steps: draw and mask -> step -> log -> validate / checkpoint when due."""
    examples_of = training_examples(config, train, tokenizer, graph, labels)
    reasoning_nodes = [node for node in graph.node_names if node != graph.label_node]
    node_weights = dict.fromkeys([*graph.decision_nodes, graph.label_node], config.decision_weight)
    parallel = training.parallel
    board = tensorboard_writer(config, start_step) if parallel.is_main else None
    bar = progress(range(start_step, config.max_steps), desc="sft", unit="step", initial=start_step, total=config.max_steps,
                   enabled=parallel.is_main)
    for step in bar:
        training.trained.train()
        batches = masked_micro_batches(step, config, examples_of, len(train), reasoning_nodes, mask_input_id, node_weights,
                                       parallel.part(config.batch_size))
        n_tokens = sum(label != IGNORE for batch in batches for _, row_labels, _ in batch for label in row_labels[1:])  # labels shift by one
        weight = sum(sum(row_weights[1:]) for batch in batches for _, _, row_weights in batch)
        n_tokens, total_weight = all_reduce(parallel, [n_tokens, weight])  # the loss is a mean over the whole step's tokens
        lr = learning_rate(step, config.lr, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        loss_share, grad_norm = training.step(batches, total_weight, lr, tokenizer.pad_token_id, config.max_grad_norm)
        (loss_value,) = all_reduce(parallel, [loss_share])
        bar.set_postfix(loss=f"{loss_value:.4f}")
        record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": int(n_tokens)}
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.max_steps:
            metrics = evaluate(training.model, tokenizer, val, graph, config.order, labels, config.max_new_tokens, config.eval_batch_size,
                               parallel)
            record.update(val_entries(metrics))
        folder.append(record)
        if board is not None:
            for key, value in record.items():
                board.add_scalar(key, value, step + 1)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            folder.save_checkpoint(step + 1, {**checkpoint_state(training.model, training.optimizer, parallel),
                                              "scaler": training.scaler.state_dict()})
    bar.close()
    if board is not None:
        board.close()


def tensorboard_writer(config: SFTConfig, start_step: int):
    """A SummaryWriter under out/tensorboard with `tensorboard`, else None."""
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(config.out / "tensorboard"), purge_step=start_step + 1)


def log_summary(config: SFTConfig, summary: dict, val_pairs: int) -> None:
    final, majority = summary["val"], summary["val_majority"]
    log.info(
        f"sft: {config.max_steps} steps in {summary['train_seconds']:.0f} s; validation ({val_pairs} pairs): parse rate "
        f"{final['parse_rate']:.3f}, label accuracy {final['label_accuracy']:.3f}, macro-F1 {final['label_macro_f1']:.3f} "
        f"(majority class: {majority['label_accuracy']:.3f} / {majority['label_macro_f1']:.3f}); model in {config.out / 'model'}"
    )
