"""The run-loop pieces the training commands (SFT, GRPO, distillation) share: device and precision,
gradient checkpointing, the learning-rate schedule, the sample order, the validation subset, LoRA, resume
and saving a policy. Several processes (torchrun) are `training.distributed`'s part.

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
from training.policy_format import PolicyFormat
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


def save_policy(model, tokenizer, folder: Path, lora: bool, policy_format: PolicyFormat) -> None:
    """Save a trained policy: weights (LoRA merged in) as safetensors, the tokenizer, and `policy.json`."""
    saved = model.merge_and_unload() if lora else model
    saved.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    policy_format.save(folder)
