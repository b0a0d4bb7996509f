"""Masked SFT of the tiny model on a synthetic world: the issue's grid of wall time and validation quality.

    .venv/bin/python benchmarks/sft.py [--preset demo] [--p-mask 0 0.3] [--orders label_first reasoning_first]

Generates the world (`jobs.world`), builds its datasets (`relevance datasets`), builds the tiny model once with the default `ModelInitConfig`
(`relevance model init`), then runs `training.sft.run` with the default `SFTConfig` (`relevance
train sft`) for each (order, p_mask), from the same initial weights, seed and budget. For each run:
SFT wall time (tokenizing, training, the final validation, saving) and its parts, the load average
of the machine before and after (other jobs share the CPU), validation parse rate, label accuracy,
macro-F1 and per-node accuracy by greedy decoding of held-out queries, and the majority-class
baseline on the same pairs. Writes benchmarks/results/sft.json after every run, so partial results
survive an interrupted benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from jobs.datasets import DatasetsConfig  # noqa: E402
from jobs.datasets import run as build_datasets  # noqa: E402
from jobs.world.config import WorldConfig  # noqa: E402
from jobs.world.generate import generate_world, write_world  # noqa: E402
from schemas.config import config_to_dict  # noqa: E402
from training.model import ModelInitConfig, init_tiny_model, load_model  # noqa: E402
from training.sft import SFTConfig, run  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sft.json"


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--p-mask", type=float, nargs="+", default=[0.0, SFTConfig().p_mask])
    parser.add_argument("--orders", nargs="+", default=["label_first", "reasoning_first"])
    parser.add_argument("--threads", type=int, default=SFTConfig().threads, help="torch CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        world = Path(folder) / "world"
        write_world(generate_world(WorldConfig.preset(args.preset)), world)
        datasets = Path(folder) / "datasets"
        build_datasets(DatasetsConfig(data=str(world), out=str(datasets)))
        model_config = ModelInitConfig(world=world, out=Path(folder) / "model")
        started = time.perf_counter()
        init_tiny_model(model_config)
        init_seconds = time.perf_counter() - started
        model, tokenizer = load_model(model_config.out)
        n_parameters = sum(p.numel() for p in model.parameters())
        del model
        result = {
            "preset": args.preset,
            "model": {**config_to_dict(model_config), "parameters": n_parameters, "vocabulary": len(tokenizer),
                      "init_seconds": round(init_seconds, 1)},
            "sft": {k: v for k, v in config_to_dict(SFTConfig(threads=args.threads)).items()
                    if k not in ("data", "model", "out", "order", "p_mask")},
            "runs": [],
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
        }
        for order in args.orders:
            for p_mask in args.p_mask:
                config = SFTConfig(data=datasets, model=model_config.out, out=Path(folder) / f"sft-{order}-{p_mask}",
                                   order=order, p_mask=p_mask, threads=args.threads)
                load_before, started = _load(), time.perf_counter()
                summary = run(config)
                result["runs"].append(
                    {"order": order, "p_mask": p_mask, "wall_seconds": round(time.perf_counter() - started, 1),
                     "train_seconds": round(summary["train_seconds"], 1), "eval_seconds": round(summary["eval_seconds"], 1),
                     "load_average_before": load_before, "load_average_after": _load(),
                     "train_pairs": summary["train_pairs"], "val": {k: round(v, 4) for k, v in summary["val"].items()},
                     "val_majority": {k: round(v, 4) if isinstance(v, float) else v for k, v in summary["val_majority"].items()}}
                )
                args.results.parent.mkdir(parents=True, exist_ok=True)
                args.results.write_text(json.dumps(result, indent=2) + "\n")
                print(json.dumps(result["runs"][-1]), flush=True)


if __name__ == "__main__":
    main()
