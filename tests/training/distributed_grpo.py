"""GRPO steps on every process of a torchrun launch, each process's policy and phi saved for
tests/training/test_distributed.py to compare (run as a script under torchrun, or `run_steps` on one process).

`python distributed_grpo.py SCENARIOS.json` runs each scenario in turn, {"config": GRPOConfig values, "mode":
..., "dump": folder}, and writes `dump/rank-R.pt`:
- `same_rollouts`: every process draws the whole step's rollouts itself, with one process's seed, so all
  hold the rollouts one process would draw; then `learn` splits the update over them: against one process.
- `own_rollouts`: `train_step`, each process sampling its share of the prompts, as `relevance train grpo` does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from schemas.config import load_config
from training.distributed import Parallel, local_device, parallel_run
from training.grpo.trainer import GRPOConfig, learn, log_step, start_run, train_step
from training.loop import resolve_device


def run_steps(config: GRPOConfig, mode: str, parallel: Parallel | None = None) -> dict:
    """The run's steps on this process (one, or this rank of a torchrun launch); returns its policy's state (FSDP: gathered
    whole on every process) and phi."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(config.threads)
    state = start_run(config, replace(parallel, mode=config.parallel) if parallel is not None else None)
    for step in range(state.start_step, config.steps):
        if mode == "same_rollouts":
            examples = state.prompt_batch(step)
            rollouts = state.backend.generate([e.prompt_ids for e in examples], state.sampling, seed=config.seed * 1_000_003 + step)
            record = learn(state, step, examples, rollouts)
        else:
            record = train_step(state, step)
        log_step(state, step, record)
    weights = (get_model_state_dict(state.model, options=StateDictOptions(full_state_dict=True)) if state.parallel.sharded
               else state.model.state_dict())
    return {"model": {name: value.detach().clone() for name, value in weights.items()}, "phi": state.controller.phi()}


if __name__ == "__main__":
    scenarios = json.loads(Path(sys.argv[1]).read_text())
    with parallel_run(resolve_device(local_device("cpu"), "fp32")[0], "ddp") as parallel:  # one process group for all scenarios
        for scenario in scenarios:
            dumped = run_steps(load_config(GRPOConfig, values=scenario["config"]), scenario["mode"], parallel)
            Path(scenario["dump"]).mkdir(parents=True, exist_ok=True)
            torch.save(dumped, Path(scenario["dump"]) / f"rank-{parallel.rank}.pt")
