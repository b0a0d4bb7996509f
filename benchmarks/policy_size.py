"""Is what the recipe misses a matter of the policy's size? The same SFT recipe at several sizes, then the quality diagnosis.

    python benchmarks/policy_size.py --world WORLD --data DATASETS [--unseen OTHER_DATASETS] \\
        --arm 4x128 --arm 8x256:lr=2e-3 --arm 8x512:lr=1e-3:seed=1 [--device cuda] [--parallel 6] [--work DIR] \\
        [--sft-set length_splits=1 ...]

An arm is LAYERSxWIDTH with optional `lr=` and `seed=` (the recipe's defaults otherwise). Its policy is
`relevance model init` at that size (4 heads of 32 up to width 128, heads of 64 above; half as many
key/value heads; MLP 3x the width; the tokenizer trained on WORLD, the same for every size), then
`relevance train sft` with the recipe's defaults and `eval_every` validation points, each run a process of
its own (`--parallel` at once: small policies leave a GPU mostly idle, so several share it). Each trained
policy then goes through `benchmarks/quality.py` (greedy CoTs of the test split against gold and against
its own extraction; the unseen world's test split with `--unseen`; scoring throughput), also one process per
arm. `--sft-set KEY=VALUE` passes a setting to every SFT run (on a GPU `length_splits=1`: padding costs
nothing there and the gradient is the same).

Writes `policy_size.{json,md}` to `--results`: per arm the parameters, SFT time and steps/s, the validation
curve, and test / unseen-world macro-F1 and node accuracy.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NODES = ("qs", "ps", "qa", "pa", "ms", "ac", "ma", "y")


@dataclass(frozen=True)
class Arm:
    layers: int
    width: int
    lr: float | None = None
    seed: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Arm:
        size, *options = spec.split(":")
        match = re.fullmatch(r"(\d+)x(\d+)", size)
        if match is None:
            raise ValueError(f"arm {spec!r}: the size must be LAYERSxWIDTH, e.g. 8x512")
        settings = dict(option.split("=", 1) for option in options)
        unknown = set(settings) - {"lr", "seed"}
        if unknown:
            raise ValueError(f"arm {spec!r}: unknown options {sorted(unknown)} (lr=, seed=)")
        return cls(int(match[1]), int(match[2]), float(settings["lr"]) if "lr" in settings else None,
                   int(settings["seed"]) if "seed" in settings else None)

    @property
    def size(self) -> str:
        return f"{self.layers}x{self.width}"

    @property
    def name(self) -> str:
        return self.size + (f"_lr{self.lr:g}" if self.lr is not None else "") + (f"_seed{self.seed}" if self.seed is not None else "")

    def init_settings(self) -> dict[str, object]:
        heads = self.width // 32 if self.width <= 128 else self.width // 64
        return {"num_layers": self.layers, "hidden_size": self.width, "num_heads": heads, "num_kv_heads": max(1, heads // 2),
                "intermediate_size": 3 * self.width}

    def sft_settings(self) -> dict[str, object]:
        return {key: value for key, value in (("lr", self.lr), ("seed", self.seed)) if value is not None}


def cli(*words: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", *words]


def settings_args(settings: dict[str, object]) -> list[str]:
    return [word for key, value in settings.items() for word in ("--set", f"{key}={value}")]


def run_all(jobs: dict[str, list[tuple[str, list[str]]]], logs: Path, parallel: int) -> dict[str, dict[str, float]]:
    """Run each job's commands one after the other, `parallel` jobs at once, each command logging to
    logs/<phase>/<job>.log; per job the wall seconds of each phase that succeeded. A failed command ends its
    job (reported with its log's end), not the others."""
    waiting, running, seconds = list(jobs), {}, {name: {} for name in jobs}

    def start(name: str) -> None:
        phase, command = jobs[name][len(seconds[name])]
        (logs / phase).mkdir(parents=True, exist_ok=True)
        log = (logs / phase / f"{name}.log").open("w")
        running[name] = (subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), time.perf_counter(), log, phase)

    while waiting or running:
        while waiting and len(running) < parallel:
            start(waiting.pop(0))
        time.sleep(1)
        for name, (process, started, log, phase) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            if process.returncode:
                tail = "\n".join((logs / phase / f"{name}.log").read_text().splitlines()[-15:])
                print(f"{name}: {phase} failed (exit {process.returncode}):\n{tail}", file=sys.stderr, flush=True)
                continue
            seconds[name][phase] = time.perf_counter() - started
            print(f"{name}: {phase} done in {seconds[name][phase]:.0f} s", flush=True)
            if len(seconds[name]) < len(jobs[name]):
                start(name)
    return seconds


def validation_curve(run: Path) -> dict[str, list]:
    """Validation macro-F1 and node accuracy at each evaluation of an SFT run (its metrics.jsonl)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [record for record in records if "val/label_macro_f1" in record]
    return {"steps": [r["step"] for r in evals], "label_macro_f1": [r["val/label_macro_f1"] for r in evals],
            **{node: [r.get(f"val/node_accuracy/{node}") for r in evals] for node in NODES}}


def parameters(init_folder: Path) -> int:
    """Weights of the policy an init folder's config.json describes (tied embeddings once), counted without allocating them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(init_folder)).num_parameters()


def arm_result(work: Path, name: str, arm: Arm) -> dict:
    """What an arm's folders under `work` hold: its validation curve so far, and once finished the final validation,
    SFT time and the diagnosis. A run stopped early (a time limit) still gives its curve and the step it reached."""
    init, run, diagnosis = work / "init" / arm.size, work / "runs" / name, work / "quality" / name / "quality_diagnosis.json"
    found = {"size": arm.size, "init": arm.init_settings(), "sft": arm.sft_settings(),
             "parameters": parameters(init) if (init / "config.json").exists() else None, "finished": diagnosis.exists()}
    if not (run / "metrics.jsonl").exists():
        return found
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    found["steps_done"] = max(record.get("step", 0) for record in records)
    found["validation_curve"] = validation_curve(run)
    if (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
        found.update({"train_seconds": summary["train_seconds"],
                      "steps_per_second": (summary["steps"] - summary["resumed_from"]) / summary["train_seconds"],
                      "validation": summary["val"]})
    if diagnosis.exists():
        policy = json.loads(diagnosis.read_text())["policies"][name]
        found["test"] = {key: policy[key] for key in ("pairs", "parse_rate", "label_macro_f1", "composed_label_macro_f1", "node_accuracy",
                                                      "contradictions")}
        if "unseen" in policy:
            found["unseen"] = {key: policy["unseen"][key] for key in ("pairs", "label_macro_f1", "node_accuracy")}
        found["throughput_pairs_per_s"] = policy["throughput_pairs_per_s"]
    return found


def markdown(result: dict) -> str:
    lines = [f"# The SFT recipe by policy size ({result['machine']})", "",
             f"World `{result['world']}`, data `{result['data']}`, unseen world `{result['unseen']}`; SFT settings beyond the recipe's "
             f"defaults: {result['sft_settings'] or 'none'} (`benchmarks/policy_size.py`). Test and unseen: greedy CoTs of every pair of "
             "the split, parsed strictly, against the noise-free gold.", "",
             "| arm | parameters | SFT s | steps/s | validation macro-F1 (step) | test macro-F1 | "
             + " | ".join(f"test {node}" for node in ("qs", "ps", "qa", "pa", "ms", "ma")) + " | unseen macro-F1 | pairs/s |",
             "|---" * 14 + "|"]
    for name, arm in result["arms"].items():
        curve = arm.get("validation_curve")
        points = " / ".join(f"{f1:.3f} ({step})" for step, f1 in zip(curve["steps"], curve["label_macro_f1"])) if curve else "-"
        size = f"{arm['parameters'] / 1e6:.2f}M" if arm["parameters"] else "-"
        seconds = f"{arm['train_seconds']:.0f} | {arm['steps_per_second']:.1f}" if "train_seconds" in arm else "- | -"
        if "test" in arm:
            test, unseen = arm["test"], arm.get("unseen")
            nodes = " | ".join(f"{test['node_accuracy'][node]:.3f}" for node in ("qs", "ps", "qa", "pa", "ms", "ma"))
            tail = (f"{test['label_macro_f1']:.3f} | {nodes} | {unseen['label_macro_f1']:.3f}" if unseen else
                    f"{test['label_macro_f1']:.3f} | {nodes} | -") + f" | {arm['throughput_pairs_per_s']:.0f}"
        else:
            reached = "trained" if "validation" in arm else f"stopped at step {arm.get('steps_done', 0)}"
            tail = f"{reached}, not diagnosed" + " |" * 8
        lines.append(f"| {name} | {size} | {seconds} | {points} | {tail} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, required=True, help="The world folder the tokenizer is trained on.")
    parser.add_argument("--data", type=Path, required=True, help="`relevance datasets` output of that world.")
    parser.add_argument("--unseen", type=Path, help="`relevance datasets` output of a world with another seed (same vocabulary).")
    parser.add_argument("--arm", action="append", required=True, help="LAYERSxWIDTH[:lr=X][:seed=N] (repeatable).")
    parser.add_argument("--device", default="cpu", help="Where SFT and the diagnosis run: cpu, cuda or cuda:N.")
    parser.add_argument("--parallel", type=int, default=1, help="Arms trained (and diagnosed) at once.")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of each SFT process.")
    parser.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE", help="An SFT setting for every arm (repeatable).")
    parser.add_argument("--batch-size", type=int, default=256, help="Prompts decoded at once in the diagnosis.")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "policy_size")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--collect", action="store_true", help="Run nothing: write the results from what --work holds "
                        "(a run stopped by a time limit, or brought back from another machine).")
    args = parser.parse_args()
    arms = {arm.name: arm for arm in map(Arm.parse, args.arm)}
    shared = dict(entry.split("=", 1) for entry in args.sft_set)
    work = args.work.resolve()
    if not args.collect:
        train(args, arms, shared, work)
    collect(args, arms, shared, work)


def train(args, arms: dict[str, Arm], shared: dict[str, str], work: Path) -> None:
    """Init each size, then per arm SFT and the diagnosis, `args.parallel` arms at once."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "machine.json").write_text(json.dumps({"machine": machine(args.device)}) + "\n")
    sizes = {arm.size: arm for arm in arms.values()}
    initialised = run_all({size: [("init", cli("model", "init", *settings_args({"world": args.world.resolve(), "out": work / "init" / size,
                                                                                 **arm.init_settings()})))]
                           for size, arm in sizes.items()}, work / "logs", args.parallel)
    run_all({name: [
        ("sft", cli("train", "sft", *settings_args({"data": args.data.resolve(), "model": work / "init" / arm.size, "out": work / "runs" / name,
                                                   "device": args.device, "eval_every": args.eval_every, "threads": args.threads,
                                                   "checkpoint_every": 0, **shared, **arm.sft_settings()}))),
        ("quality", [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--data", str(args.data.resolve()),
                     "--policy", f"{name}={work / 'runs' / name / 'model'}", "--device", args.device, "--batch-size", str(args.batch_size),
                     "--results", str(work / "quality" / name), *(["--unseen", str(args.unseen.resolve())] if args.unseen else [])]),
    ] for name, arm in arms.items() if initialised[arm.size]}, work / "logs", args.parallel)


def collect(args, arms: dict[str, Arm], shared: dict[str, str], work: Path) -> None:
    """policy_size.{json,md} from what `work` holds (on the machine the runs were measured on: work/machine.json)."""
    measured_on = json.loads((work / "machine.json").read_text())["machine"] if (work / "machine.json").exists() else machine(args.device)
    result = {"world": str(args.world), "data": str(args.data), "unseen": str(args.unseen) if args.unseen else None,
              "device": args.device, "machine": measured_on, "parallel": args.parallel,
              "sft_settings": shared,
              "arms": {name: arm_result(work, name, arm) for name, arm in arms.items()}}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "policy_size.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "policy_size.md").write_text(markdown(result))
    print(markdown(result))
    if not all(arm["finished"] for arm in result["arms"].values()):
        raise SystemExit("some arms did not finish: see their logs under " + str(work / "logs"))


if __name__ == "__main__":
    main()
