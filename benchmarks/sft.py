"""Masked SFT of the tiny model on a synthetic world: wall time and validation quality per setting.

    .venv/bin/python benchmarks/sft.py [--preset tests] [--steps 300] [--p-mask 0 0.3] [--orders label_first reasoning_first]

Generates the world (`jobs.world`), builds the tiny model once (`training.model.init_tiny_model`),
then runs `training.sft.run` for each (order, p_mask) from the same initial weights, same seed and
budget, on 2 CPU threads. Writes benchmarks/results/sft.json after every run (partial results
survive an interrupted benchmark): train seconds, validation parse rate, label accuracy,
macro-F1 and per-node accuracy by greedy decoding of held-out queries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from jobs.world.config import WorldConfig  # noqa: E402
from jobs.world.generate import generate_world, write_world  # noqa: E402
from schemas.config import config_to_dict  # noqa: E402
from training.model import ModelInitConfig, init_tiny_model, load_model  # noqa: E402
from training.sft import SFTConfig, run  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sft.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tests")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--val-items", type=int, default=300)
    parser.add_argument("--p-mask", type=float, nargs="+", default=[0.0, 0.3])
    parser.add_argument("--orders", nargs="+", default=["label_first", "reasoning_first"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        world = Path(folder) / "world"
        write_world(generate_world(WorldConfig.preset(args.preset)), world)
        model_config = ModelInitConfig(world=world, out=Path(folder) / "model")
        init_tiny_model(model_config)
        model, _ = load_model(model_config.out)
        n_parameters = sum(p.numel() for p in model.parameters())
        del model
        result = {
            "preset": args.preset,
            "model": {**config_to_dict(model_config), "parameters": n_parameters},
            "runs": [],
            "machine": {"cpus": os.cpu_count(), "torch_threads": 2, "torch": torch.__version__, "platform": platform.platform()},
        }
        for order in args.orders:
            for p_mask in args.p_mask:
                config = SFTConfig(
                    world=world, model=model_config.out, out=Path(folder) / f"sft-{order}-{p_mask}", order=order,
                    p_mask=p_mask, max_steps=args.steps, batch_size=args.batch_size, prompt_tokens=args.prompt_tokens,
                    warmup_steps=max(1, args.steps // 20), val_items=args.val_items, checkpoint_every=0,
                )
                summary = run(config)
                result["runs"].append(
                    {"order": order, "p_mask": p_mask, "steps": args.steps, "batch_size": args.batch_size,
                     "train_seconds": round(summary["train_seconds"], 1), "eval_seconds": round(summary["eval_seconds"], 1),
                     "train_pairs": summary["train_pairs"], "val": {k: round(v, 4) for k, v in summary["val"].items()}}
                )
                args.results.parent.mkdir(parents=True, exist_ok=True)
                args.results.write_text(json.dumps(result, indent=2) + "\n")
                print(json.dumps(result["runs"][-1]), flush=True)


if __name__ == "__main__":
    main()
