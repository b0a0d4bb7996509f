"""A training run's folder, the same for every trainer: `metrics.jsonl` (one JSON record per line, each
with its `step`) and `checkpoints/step-NNNNNN/state.pt` (whatever state the trainer saves, plus `step`).

Resuming loads the latest checkpoint and drops the metric records written after its step, so the
resumed run's log reads as if it had never stopped; a fresh run starts an empty log. In a run of several
processes only rank 0's folder is the `writer`: the others read the checkpoint and write nothing.

Each checkpoint also holds the settings of the run that wrote it (`config_to_dict` of the trainer's config). A run
resumes only from a checkpoint its own settings wrote, up to `EXECUTION_FIELDS`, which say how the run executes and
what it records, not what it learns: run again with another `--set lr=...` and the same `out`, and it is refused
with a one-line error instead of silently continuing the other run's state. Checkpoints written before they held
their settings resume unchecked, with a warning.

A checkpoint is loaded with `torch.load(weights_only=True)`: only tensors, containers and plain scalars
are unpickled, so a `state.pt` planted in a run folder cannot run code. Everything the trainers save
(model, optimizer, grad scaler and edge-controller state dicts, the step) is of those kinds.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

from schemas.storage import clear_stale_staging, replace_file

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# settings a resumed run may change: how it runs (processes, device, precision, ...), what it records and how long it
# goes on (a run is extended by resuming it with more steps); any other difference means another run
EXECUTION_FIELDS = frozenset({
    "out", "resume", "max_steps", "steps", "checkpoint_every", "eval_every", "val_items", "eval_batch_size",
    "teacher_batch_size", "threads", "processes", "device", "precision", "parallel", "gradient_checkpointing", "compile",
    "length_splits", "backend", "tensorboard",
})


def val_entries(metrics: dict[str, float]) -> dict[str, float]:
    """Validation metrics as metrics.jsonl entries `val/<metric>`."""
    return {f"val/{key}": value for key, value in metrics.items()}


def start_validation(metrics_file: Path) -> dict[str, float] | None:
    """The validation metrics a run recorded before its first step (Graph-GRPO validates the policy it starts from), or
    None; reads the log only up to that record."""
    if not metrics_file.is_file():
        return None
    with metrics_file.open() as lines:
        for line in lines:
            record = json.loads(line)
            if record.get("step") == 0 and any(key.startswith("val/") for key in record):
                return {key.removeprefix("val/"): value for key, value in record.items() if key.startswith("val/")}
    return None


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely: not tensors and plain data, or not a torch file at all."""


def changed_settings(saved: dict, current: dict) -> list[str]:
    """`name saved -> current` for each setting outside EXECUTION_FIELDS whose value differs."""
    names = sorted((saved.keys() | current.keys()) - EXECUTION_FIELDS)
    return [f"{name} {saved.get(name)!r} -> {current.get(name)!r}" for name in names if saved.get(name) != current.get(name)]


class RunFolder:
    def __init__(self, out: Path, config: dict, writer: bool = True) -> None:
        """`config`: the run's settings as `config_to_dict` writes them, saved with each checkpoint and compared at resume."""
        self.out = Path(out)
        self.config = config
        self.writer = writer
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = self.out / METRICS_FILE

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.out / "checkpoints").glob("step-*/state.pt"))
        return found[-1] if found else None

    def start(self, resume: bool) -> dict | None:
        """The latest checkpoint's state when `resume` and there is one (metrics after its step dropped);
        otherwise None and the metrics log starts empty."""
        import torch

        if self.writer:  # a run killed while saving a checkpoint left its staging copy beside the step's state.pt
            for step_folder in (self.out / "checkpoints").glob("step-*"):
                for line in clear_stale_staging(step_folder / "state.pt"):
                    log.info("%s", line)
        checkpoint = self.latest_checkpoint() if resume else None
        if checkpoint is None:
            if self.writer:
                self.metrics.unlink(missing_ok=True)
            return None
        try:
            state = torch.load(checkpoint, weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(f"{checkpoint}: refused to resume: it holds objects other than tensors and plain data, "
                                  "and unpickling them could run code; delete it or run with resume=false") from error
        except (RuntimeError, EOFError) as error:
            raise CheckpointError(f"{checkpoint}: cannot resume: not a readable torch checkpoint (truncated or corrupt); "
                                  "delete it or run with resume=false") from error
        if "config" not in state:
            log.warning("%s: written before checkpoints held their run's settings: resuming without checking them", checkpoint)
        elif changed := changed_settings(state["config"], self.config):
            raise CheckpointError(f"{checkpoint}: refused to resume: written by a run with other settings ({'; '.join(changed)}); "
                                  "run with those settings, or start afresh with resume=false or another out")
        if not self.writer:
            return state
        lines = self.metrics.read_text().splitlines() if self.metrics.exists() else []
        kept = [line for line in lines if json.loads(line).get("step", 0) <= state["step"]]
        self.metrics.write_text("".join(line + "\n" for line in kept))
        log.info("resumed from %s at step %d", checkpoint, state["step"])
        return state

    def append(self, record: dict) -> None:
        if not self.writer:
            return
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def save_checkpoint(self, step: int, state: dict) -> Path:
        import torch

        folder = self.out / "checkpoints" / f"step-{step:06d}"
        if not self.writer:
            return folder
        # written beside and renamed in: a run killed while saving leaves the previous checkpoint the latest, not a torn one
        replace_file(folder / "state.pt", lambda staging: torch.save({**state, "step": step, "config": self.config}, staging))
        return folder
