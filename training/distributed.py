"""One training run on several processes (torchrun): which process this is and its device, the model
wrapped for data parallelism (DDP) or sharded (FSDP2), the collectives the trainers need, and checkpoints
of the full state.

- Launch: `torchrun --nproc_per_node N -m jobs.cli train sft|grpo|distill ...` sets WORLD_SIZE, RANK and
  LOCAL_RANK; or a command launches its own N processes on this machine (`run_on_local_processes`, torch's
  elastic launcher, which torchrun is a front of), as SFT does with `processes`. `parallel_run` reads
  them, joins the process group (nccl on CUDA, gloo on CPU) on the device of LOCAL_RANK (`local_device`).
  Without them, or with WORLD_SIZE=1, nothing is initialised and every helper here is the identity: a
  single-process run is what it was.
- `mode` (the trainers' `parallel` setting): `ddp` keeps a whole replica per process and all-reduces the
  gradients during backward; `fsdp` shards parameters, gradients and optimizer state over the processes
  with `torch.distributed.fsdp.fully_shard` (each transformer block, then the whole model), for models
  that do not fit one device.
- Batches are global: every process computes the same sample order and takes its contiguous share
  (`Parallel.part`), so N processes train on the examples one process does at each optimizer step. A
  rank's loss is its share of the whole batch's loss (divided by the whole batch's normaliser); DDP and
  FSDP average gradients over ranks, so backward runs on the share times `loss_scale` (N) and the synced
  gradient is the whole batch's.
- Rank 0 writes (metrics, checkpoints, the final model); the others compute the same collectives and
  skip the writes. Checkpoints hold the full model and optimizer state in the single-process layout
  (`checkpoint_state`; under FSDP gathered from the shards, the optimizer's state keyed by parameter
  index as `Optimizer.state_dict` keys it), so a run resumes under any world size and either mode. Every
  process reads the checkpoint from the run folder, which must be one they all see (always so on one node).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from schemas.config import ConfigError, help_field

PARALLEL_MODES = ("ddp", "fsdp")


def parallel_field(unit: str, caveat: str = "") -> Any:
    """The `parallel` setting of a trainer whose model is a `unit` (checked by `schemas.config.check_choices`)."""
    return help_field(f"Under torchrun: ddp (a whole {unit} per process, gradients all-reduced) or fsdp (parameters, gradients and "
                      f"optimizer state sharded over the processes with FSDP2{caveat}).", "ddp", choices=PARALLEL_MODES)
Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Parallel:
    """This process's place in the run; world_size 1 is a single-process run."""

    device: Any  # torch.device this process trains on
    mode: str = "ddp"
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Parameters are FSDP shards: every rank must take part in each forward pass and state gathering."""
        return self.distributed and self.mode == "fsdp"

    @property
    def loss_scale(self) -> int:
        """Factor on a rank's loss share before backward: DDP and FSDP average gradients, the whole batch's is their sum."""
        return self.world_size

    def part(self, n: int) -> slice:
        """This rank's contiguous share of n items (equal shares when the world size divides n)."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def require_divisible(self, name: str, value: int) -> None:
        """A ConfigError unless the world size divides `value` (a global batch split into equal shares)."""
        if value % self.world_size:
            raise ConfigError(f"{name}: {value} is the global batch, split over {self.world_size} processes; make it a multiple of "
                              f"{self.world_size}")


SINGLE_PROCESS = Parallel(device=None)  # the default of functions that may run inside a several-process run; its device is never read


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, or `run_on_local_processes`) started this one among; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: str) -> str:
    """The device setting for this process: under torchrun `auto` (with CUDA present) and `cuda` mean the GPU of LOCAL_RANK."""
    import torch

    if launched_world_size() == 1:
        return device
    if device.startswith("cuda:"):
        raise ConfigError(f"device: {device} names one GPU, but under torchrun each process takes the GPU of its LOCAL_RANK; "
                          "set device=auto or device=cuda")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu" if device == "auto" else device


def run_on_local_processes(processes: int, entry: Callable[[Any], Result], config: Any) -> Result:
    """`entry(config)` on `processes` new local processes joined as one run (torchrun --standalone's rendezvous, no restart);
    returns what rank 0's returned. The processes log as this one does (the `relevance` log setup is redone in each)."""
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from schemas import logs

    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5, start_method="spawn")
    returned = elastic_launch(launch, _logged_entry)(entry, config, logs.settings())
    return returned[0]


def _logged_entry(entry: Callable[[Any], Result], config: Any, log_settings: dict) -> Result:
    from schemas import logs

    logs.setup(**log_settings)
    return entry(config)


@contextlib.contextmanager
def parallel_run(device, mode: str) -> Iterator[Parallel]:
    """This process's `Parallel` on `device` (a torch.device, from `local_device`); under torchrun it joins the
    process group for the run and leaves it afterwards (a group someone else started is left alone)."""
    import torch
    import torch.distributed as dist

    if mode not in PARALLEL_MODES:
        raise ConfigError(f"parallel: {mode!r} is not one of {list(PARALLEL_MODES)}")
    world_size = launched_world_size()
    if world_size == 1:
        yield Parallel(device=device, mode=mode)
        return
    started = not dist.is_initialized()
    if started:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    try:
        yield Parallel(device=device, mode=mode, rank=dist.get_rank(), world_size=dist.get_world_size())
    finally:
        if started:
            # a wrapped model sits in reference cycles, so only the collector frees it; left to interpreter exit, its hold on
            # the gloo group can be released after the group's threads are gone, which aborts the process ("terminate called
            # without an active exception", seen once after a two-process FSDP run had finished): collect it here instead
            gc.collect()
            dist.destroy_process_group()


# ---------------------------------------------------------------- the model


def wrap_model(model, parallel: Parallel):
    """The module training forward and backward passes go through: the model itself on one process; under
    DDP a DistributedDataParallel around it; under FSDP the model itself, sharded in place block by block
    (the blocks are the classes transformers names in `_no_split_modules`; each moves to the device as it
    is sharded, so a model loaded on the CPU never sits whole on one GPU). Build the optimizer afterwards:
    FSDP replaces the parameters by their shards."""
    if not parallel.distributed:
        return model
    if parallel.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[parallel.device.index] if parallel.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # the mesh of this run's device type (FSDP's default is CUDA whenever there is one, even for a gloo run on the CPU)
    mesh = init_device_mesh(parallel.device.type, (parallel.world_size,))
    blocks = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(trained, parallel: Parallel, enabled: bool) -> Iterator[None]:
    """With `enabled=False`, backward passes inside accumulate local gradients without communicating
    (the last micro-batch of a step syncs them all)."""
    if not parallel.distributed or enabled:
        yield
    elif parallel.mode == "ddp":
        with trained.no_sync():
            yield
    else:
        trained.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            trained.set_requires_gradient_sync(True)


def clip_gradients(params: Sequence, max_norm: float) -> float:
    """Clip the (synced) gradients to `max_norm` (0: no clipping); returns their total norm. Under FSDP the
    gradients are shards and the norm comes back as a replicated DTensor."""
    import torch

    total = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


# ---------------------------------------------------------------- collectives


def all_reduce(parallel: Parallel, values: Sequence[float]) -> list[float]:
    """`values` summed over the ranks, element-wise, in float64."""
    if not parallel.distributed:
        return [float(value) for value in values]
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(value) for value in values], dtype=torch.float64, device=parallel.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_tensors(parallel: Parallel, tensors: list) -> list:
    """The tensors (one dtype, on this process's device) summed over the ranks, in one all-reduce."""
    if not parallel.distributed:
        return tensors
    import torch
    import torch.distributed as dist

    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(flat)
    return [piece.view_as(tensor) for piece, tensor in zip(flat.split([tensor.numel() for tensor in tensors]), tensors)]


def all_gather(parallel: Parallel, value: Item) -> list[Item]:
    """Every rank's `value` (any picklable object), in rank order."""
    if not parallel.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list = [None] * parallel.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def gathered_map(parallel: Parallel, items: Sequence[Item], fn: Callable[[list[Item]], Sequence[Result]]) -> list[Result]:
    """`fn` (a list of items -> one result per item) over `items`, each rank taking a contiguous share; every
    rank gets all results in item order. Shares are padded to one length with the last item (its extra
    results dropped), so each rank runs `fn` on as many items, and FSDP's forward passes line up."""
    if not parallel.distributed:
        return list(fn(list(items)))
    if not items:
        return []
    size = -(-len(items) // parallel.world_size)
    share = list(items[parallel.rank * size : (parallel.rank + 1) * size])
    results = list(fn(share + [items[-1]] * (size - len(share))))[: len(share)]
    return [result for part in all_gather(parallel, results) for result in part]


# ---------------------------------------------------------------- checkpoints


def checkpoint_state(model, optimizer, parallel: Parallel) -> dict:
    """{"model": state dict, "optimizer": state dict} in the single-process layout on rank 0; empty on the
    other ranks, which do not write. `model` is the unwrapped model; under FSDP every rank must call this
    (the full state is gathered from the shards)."""
    if not parallel.sharded:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()} if parallel.is_main else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": model_state, "optimizer": _keyed_by_index(optimizer_state)} if parallel.is_main else {}


def load_sharded_state(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load a full (single-process layout) model and optimizer state into an FSDP-sharded model and its
    optimizer: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    name_of = {id(param): name for name, param in model.named_parameters()}
    names = [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]
    by_name = {
        "state": {names[index]: value for index, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [names[index] for index in group["params"]]} for group in optimizer_state["param_groups"]],
    }
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=by_name, options=StateDictOptions(full_state_dict=True))


def _keyed_by_index(optimizer_state: dict) -> dict:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's) keyed by parameter index
    instead, numbered over the param groups in order, as `Optimizer.state_dict` numbers them."""
    index = {name: i for i, name in enumerate(name for group in optimizer_state["param_groups"] for name in group["params"])}
    return {
        "state": {index[name]: value for name, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in optimizer_state["param_groups"]],
    }


def unsharded_model(model, parallel: Parallel, build: Callable[[], Any]):
    """The trained model whole, on rank 0, to save; None on the other ranks. Under FSDP every rank takes part in
    gathering the weights, and rank 0 loads them into a fresh CPU copy from `build()` (the model as it was
    before sharding, LoRA adapters included); otherwise the model itself."""
    if not parallel.sharded:
        return model if parallel.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not parallel.is_main:
        return None
    copy = build()
    copy.load_state_dict(state)
    return copy


def barrier(parallel: Parallel) -> None:
    """Wait for every rank (the others wait here while rank 0 writes the final model)."""
    if parallel.distributed:
        import torch.distributed as dist

        dist.barrier()
