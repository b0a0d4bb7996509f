"""The run-loop pieces the training commands (SFT, GRPO, distillation) share: device and precision,
gradient checkpointing, the learning-rate schedule, the sample order, the validation subset, LoRA and resume
(saving a policy: `training.model.save_policy`). Several processes (torchrun) are `training.distributed`'s part.

Sample order and schedule are functions of (seed, step), not of generator state, so a run resumed
from a checkpoint continues bit-for-bit on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from schemas.config import ConfigError
from training.distributed import Parallel, load_sharded_state
from training.model_files import adapter_base, adapter_config
from training.run_folder import RunFolder

Item = TypeVar("Item")


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


def autocast(device, dtype):
    """The context of the training forward passes: autocast to `dtype` on `device`, or full precision when None."""
    import torch

    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def enable_gradient_checkpointing(model) -> None:
    """Keep only each transformer block's inputs and recompute its activations during backward (transformers'
    gradient checkpointing; non-reentrant, which works under DDP, FSDP and LoRA). Active in train mode only."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def learning_rate(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to lr over warmup_steps, then cosine to min_lr_ratio * lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def validation_subsample(pairs: Sequence[Item], val_items: int) -> list[Item]:
    """At most `val_items` pairs evenly spaced over `pairs` (0: all), so the held-out queries are spread, not the first few."""
    if val_items and len(pairs) > val_items:
        return list(pairs[:: len(pairs) // val_items][:val_items])
    return list(pairs)


LORA_RANK, LORA_ALPHA = 8, 16.0  # the LoRA settings of a fresh adapter when none are given


def resolve_lora(config, default_targets: tuple[str, ...]) -> None:
    """Fill the LoRA settings of a training config (SFT, GRPO) while it is built: `lora`, `lora_rank`, `lora_alpha`,
    `lora_targets` (None: not given) and check `save_merged`.

    From an adapter folder (`training.model_files`), training continues its adapter: LoRA is on and the settings are
    the adapter's; a given one that differs is refused, as is lora=false. Otherwise LoRA is off unless asked, and the
    settings not given take the defaults (`default_targets` for the targets).
    """
    given = {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha, "lora_targets": config.lora_targets}
    if adapter_base(config.model) is None:
        lora = bool(config.lora)
        settings = {"lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_targets": default_targets}
        settings.update({name: value for name, value in given.items() if value is not None})
    else:
        if config.lora is False:
            raise ConfigError(f"lora: {config.model} is a LoRA adapter folder, which training continues as LoRA; leave lora unset, or "
                              "train all weights from a merged copy (`relevance model merge`)")
        lora, stored = True, adapter_config(config.model)
        targets = stored.get("target_modules")
        settings = {"lora_rank": stored.get("r"), "lora_alpha": float(stored.get("lora_alpha", 0)),
                    "lora_targets": tuple(sorted(targets)) if isinstance(targets, list) else (targets,)}
        clashes = [f"{name}={value!r} but the adapter in {config.model} has {settings[name]!r}" for name, value in given.items()
                   if value is not None and (set(value) != set(settings[name]) if name == "lora_targets" else value != settings[name])]
        if clashes:
            raise ConfigError("; ".join(clashes) + " (leave the setting out to continue the adapter as it is)")
    for name, value in {"lora": lora, **settings}.items():
        object.__setattr__(config, name, value)  # frozen: filled once, while the config is built
    if config.lora and config.lora_rank < 1:
        raise ConfigError(f"lora_rank: must be a positive whole number, got {config.lora_rank}")
    if config.lora and not config.lora_targets:
        raise ConfigError("lora_targets: name at least one module (e.g. q_proj,v_proj) when lora=true")
    if config.save_merged and not config.lora:
        raise ConfigError("save_merged: applies to a LoRA policy only (without LoRA the full weights are saved); set lora=true or drop it")


def lora_save_base(config) -> Path | None:
    """The base model folder a training run's LoRA policy is saved against (the start adapter's base, or the start
    model), or None when the policy is saved as full weights (no LoRA, or `save_merged`)."""
    if not config.lora or config.save_merged:
        return None
    return adapter_base(config.model) or Path(config.model)


def wrap_lora(model, rank: int, alpha: float, targets: Sequence[str]):
    """`model` with LoRA adapters (peft, no dropout) on the named modules; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, task_type="CAUSAL_LM"))


def resume_state(folder: RunFolder, resume: bool, parallel: Parallel | None = None, **stateful) -> int:
    """The step to start from: the latest checkpoint's when `resume` and there is one, after loading its
    state dict into each named object (model=..., optimizer=...); 0 otherwise (the metrics log starts empty).
    Checkpoints hold the full state (`training.distributed.checkpoint_state`), whatever the world size."""
    state = folder.start(resume)
    if state is None:
        return 0
    if parallel is not None and parallel.sharded:  # FSDP holds shards: each rank cuts its part out of the full state
        load_sharded_state(stateful.pop("model"), stateful.pop("optimizer"), state["model"], state["optimizer"])
    for name, target in stateful.items():
        target.load_state_dict(state[name])
    return state["step"]
