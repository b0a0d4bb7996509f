"""Every advantage estimator from the same SFT checkpoint, same data, same budget, several seeds.

    .venv/bin/python benchmarks/credit_assignment.py [--steps 60] [--seeds 0 1 2] [--estimators grpo ... graph_grpo]
        [--from-demo demo_output] [--work benchmarks/work/credit_assignment] [--test-pairs 1000]
        [--rl-data DATASETS] [--set KEY=VALUE ...] [--parallel 2 --threads 1]

Setup: with `--from-demo DIR` the demo's world, datasets and SFT policy are reused (`make demo`
writes them); otherwise the demo-size world is generated, its datasets built and the tiny policy
trained with the default SFT config, all under `--work`. Each (estimator, seed) run is
`training.grpo.trainer.run` with the default `GRPOConfig` except steps, seed, evaluation cadence and the
`--set` overrides, which every run shares. The RL prompts come from the SFT's datasets unless `--rl-data`
names another datasets root: a policy trained for epochs on its train split has memorised much of it
(rater noise included), so most rollout groups agree there and carry no outcome signal; a world generated
with another seed gives prompts the policy never saw. `--parallel N` trains N runs at once (and labels N
test splits at once), each in its own process with `--threads` threads. Every run checkpoints every
`--checkpoint-every` steps, so a stopped benchmark continues inside the runs it had started (prompt order and sampling
are functions of (seed, step): the resumed run is the same run); a run folder's checkpoints from another config are
removed first, so they never seed a run they do not belong to.
Each final policy and the SFT starting point label the same test pairs (`training.predict.score_split`,
whole queries, label probabilities from the label tokens, reasoning by greedy decoding) and
`relevance evaluate` scores them all in one run against the noise-free gold: macro-F1, per-class F1
and per-node accuracy with 95% bootstrap intervals resampling queries, and paired comparisons with
the SFT policy (macro-F1, and each reasoning node's accuracy: where a run lost reasoning). Writes
benchmarks/results/credit_assignment.{json,md,png}: the tables, the training curves (outcome reward,
mean node verifier accuracy, validation label accuracy) and the phi trajectories of graph_grpo. The JSON is rewritten after every run, so partial results survive.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.relabel import write_scored_gold  # noqa: E402
from schemas.config import config_to_dict, load_config  # noqa: E402
from schemas.graph import ReasoningGraph  # noqa: E402
from schemas.storage import write_table  # noqa: E402
from schemas.tables import RELEVANCE  # noqa: E402
from training.grpo.estimators import ESTIMATORS  # noqa: E402
from training.grpo.trainer import GRPOConfig  # noqa: E402
from training.grpo.trainer import run as train_grpo  # noqa: E402
from training.sft import SFTConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ORDER = ("grpo", "sam", "process", "shaped", "graph_fixed", "graph_grpo")


def prepare(args) -> tuple[Path, Path, Path]:
    """(world, datasets, SFT policy folder), reused from the demo or built under --work."""
    if args.from_demo:
        demo = Path(args.from_demo)
        return demo / "world", demo / "datasets", demo / "sft" / "model"
    from jobs.datasets import DatasetsConfig
    from jobs.datasets import run as build_datasets
    from jobs.world.config import WorldConfig
    from jobs.world.generate import generate_world, write_world
    from training.model import ModelInitConfig, init_tiny_model
    from training.sft import run as train_sft

    world, datasets, work = args.work / "world", args.work / "datasets", args.work
    if not (world / "world.json").exists():
        write_world(generate_world(WorldConfig.preset("demo")), world)
    if not (datasets / "_datasets" / "datasets.json").exists():
        build_datasets(DatasetsConfig(data=str(world), out=str(datasets)))
    if not (work / "sft" / "model" / "config.json").exists():
        init_tiny_model(ModelInitConfig(world=world, out=work / "tiny_init"))
        train_sft(SFTConfig(data=datasets, model=work / "tiny_init", out=work / "sft", threads=args.threads))
    return world, datasets, work / "sft" / "model"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curves(run_dir: Path, graph: ReasoningGraph) -> dict[str, list]:
    """Per-step training series and the evaluation points of one run."""
    reasoning = [node for node in graph.node_names if node != graph.label_node]
    train = [r for r in records(run_dir) if "train/loss" in r]
    evals = [r for r in records(run_dir) if "val/label_accuracy" in r]
    return {
        "step": [r["step"] for r in train],
        "reward": [r["reward/outcome"] for r in train],
        "node_verifier_accuracy": [float(np.mean([r[f"reward/verifier/{node}"] for node in reasoning])) for r in train],
        "kl": [r.get("train/kl", 0.0) for r in train],
        "response_length": [r["response/length"] for r in train],
        "phi": {edge: [r[f"phi/{edge}"] for r in train if f"phi/{edge}" in r] for edge in [f"{a}->{b}" for a, b in graph.edges]},
        "advantage_abs_mean": {node: float(np.mean([r[f"adv/{node}/abs_mean"] for r in train])) for node in graph.node_names},
        "advantage_mean": {node: float(np.mean([r[f"adv/{node}/mean"] for r in train])) for node in graph.node_names},
        "eval_step": [r["step"] for r in evals],
        "val_label_accuracy": [r["val/label_accuracy"] for r in evals],
        "val_macro_f1": [r["val/label_macro_f1"] for r in evals],
        "val_node_accuracy": [float(np.mean([r[f"val/node_accuracy/{node}"] for node in reasoning])) for r in evals],
        "uniform_group_share": [r["groups/uniform_share"] for r in train],
        # with sampling_rounds > 1 (refill): prompt batches drawn per step, and the share of the drawn groups that agreed
        "batches_drawn": [r.get("sampling/draws", 1) for r in train],
        "drawn_uniform_share": [r.get("sampling/drawn_uniform_share", r["groups/uniform_share"]) for r in train],
        "seconds_per_step": float(np.mean([r["time/step"] for r in train])),
    }


def exit_with_benchmark() -> None:
    """Pool initializer: the worker exits once the benchmark process that spawned it is gone. A killed benchmark's
    workers would otherwise train on, and beside a restarted benchmark write the same run folders twice."""
    benchmark = os.getppid()

    def watch() -> None:
        while os.getppid() == benchmark:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def started_by(config: GRPOConfig) -> bool:
    """Whether the run folder's log was started by this config (its first record, the start, holds the config)."""
    log = config.out / "metrics.jsonl"
    if not log.exists():
        return False
    with log.open() as lines:
        first = lines.readline()
    return bool(first) and json.loads(first).get("config") == config_to_dict(config)


def discard_foreign_checkpoints(config: GRPOConfig) -> None:
    """Remove the checkpoints in the run folder when its log was started by another config (or is gone): the trainer
    would refuse another run's checkpoint, and a grid re-run with a changed `--set` starts those runs afresh instead."""
    checkpoints = config.out / "checkpoints"
    if checkpoints.exists() and not started_by(config):
        shutil.rmtree(checkpoints)


def train_one(settings: dict) -> tuple[dict, dict]:
    """(summary, timing) of one GRPO run; `settings` is the config as `config_to_dict` writes it (a worker process
    rebuilds the config from it). `seconds` counts this call only: from `resumed_from` > 0 on, an earlier call trained the
    first steps (`seconds_per_step` in the curves covers every step)."""
    config = load_config(GRPOConfig, values=settings)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    summary = train_grpo(config)
    timing = {"seconds": round(time.perf_counter() - started, 1), "resumed_from": summary["resumed_from"],
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    (config.out / "benchmark_timing.json").write_text(json.dumps(timing))
    return summary, timing


def label_test_split(model: Path, datasets: Path, name: str, target: Path, test_pairs: int, threads: int, batch_size: int,
                     checked_verdicts: bool) -> Path:
    from training.predict import score_split

    torch.set_num_threads(threads)
    rows = score_split(model, datasets, "test", reasoning="all", model_name=name, max_pairs=test_pairs, batch_size=batch_size,
                       checked_verdicts=checked_verdicts)
    write_table(RELEVANCE, rows, target)
    return target


def evaluate_all(predictions: dict[str, Path], world: Path, work: Path, report: str) -> dict:
    """One `relevance evaluate` run over every labelled test split (the first, the SFT policy, is the baseline), its
    report in `work / report`."""
    from evaluation.command import EvaluateConfig
    from evaluation.command import run as evaluate

    gold = write_scored_gold(next(iter(predictions.values())), world, work / "evaluation_gold")
    result = evaluate(EvaluateConfig(predictions={name: str(path) for name, path in predictions.items()}, gold_source="nodes",
                                     gold_nodes=str(gold), queries=str(world), catalog=str(world),
                                     out=str(work / report)))
    table = {}
    for model in result.models:
        metrics = model.metrics
        table[model.name] = {
            "macro_f1": [float(metrics["macro_f1"].estimate), float(metrics["macro_f1"].low), float(metrics["macro_f1"].high)],
            "accuracy": [float(metrics["accuracy"].estimate), float(metrics["accuracy"].low), float(metrics["accuracy"].high)],
            "f1": {label: [float(metrics["f1"].estimate[k]), float(metrics["f1"].low[k]), float(metrics["f1"].high[k])]
                   for k, label in enumerate(model.labels)},
            "node_accuracy": {node: [float(metrics["node_accuracy"].estimate[k]), float(metrics["node_accuracy"].low[k]),
                                     float(metrics["node_accuracy"].high[k])] for k, node in enumerate(model.node_names)},
            "pairs": model.n_covered, "queries": model.n_queries,
        }
    for comparison in result.comparisons:
        table[comparison.other]["vs_sft"] = comparison.verdict
        if comparison.node_names:
            change = comparison.metrics["node_accuracy_difference"]
            table[comparison.other]["node_change_vs_sft"] = {
                node: [float(change.estimate[k]), float(change.low[k]), float(change.high[k])] for k, node in enumerate(comparison.node_names)}
    return {"models": table, "report": str(work / report / "report.html")}


def summarise(runs: list[dict], evaluation: dict, graph: ReasoningGraph) -> dict[str, dict]:
    """Per estimator: each seed's test macro-F1 and the means over seeds."""
    by_estimator: dict[str, dict] = {}
    for run in runs:
        model = evaluation["models"][run["name"]]
        entry = by_estimator.setdefault(run["estimator"], {"seeds": [], "macro_f1": [], "accuracy": [], "node_accuracy": [],
                                                           "seconds_per_step": [], "vs_sft": []})
        entry["seeds"].append(run["seed"])
        entry["seconds_per_step"].append(run["curves"]["seconds_per_step"])
        entry["vs_sft"].append(model.get("vs_sft", ""))
        entry["macro_f1"].append(model["macro_f1"][0])
        entry["accuracy"].append(model["accuracy"][0])
        entry["node_accuracy"].append(float(np.mean([value[0] for node, value in model["node_accuracy"].items() if node != graph.label_node])))
    for entry in by_estimator.values():
        for key in ("macro_f1", "accuracy", "node_accuracy", "seconds_per_step"):
            entry[f"{key}_mean"] = float(np.mean(entry[key]))
            entry[f"{key}_sd"] = float(np.std(entry[key], ddof=1)) if len(entry[key]) > 1 else 0.0
    if "grpo" in by_estimator:
        for entry in by_estimator.values():
            entry["step_cost_over_grpo"] = entry["seconds_per_step_mean"] / by_estimator["grpo"]["seconds_per_step_mean"]
    return by_estimator


def markdown(result: dict, graph: ReasoningGraph) -> str:
    models = result["evaluation"]["models"]
    labels = list(next(iter(models.values()))["f1"])
    nodes = list(next(iter(models.values()))["node_accuracy"])
    head = ["model", "macro-F1 [95% CI]", "accuracy", *[f"F1 {label}" for label in labels], *[f"acc {node}" for node in nodes], "vs SFT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, model in models.items():
        f1 = model["macro_f1"]
        cells = [name, f"{f1[0]:.3f} [{f1[1]:.3f}, {f1[2]:.3f}]", f"{model['accuracy'][0]:.3f}",
                 *[f"{model['f1'][label][0]:.3f}" for label in labels], *[f"{model['node_accuracy'][node][0]:.3f}" for node in nodes],
                 model.get("vs_sft", "")]
        lines.append("| " + " | ".join(cells) + " |")
    changed = {name: model["node_change_vs_sft"] for name, model in models.items() if "node_change_vs_sft" in model}
    if changed:
        changed_nodes = [node for node in nodes if node != graph.label_node and all(node in change for change in changed.values())]
        lines += ["", "Paired change of each reasoning node's accuracy against the SFT start (95% query-bootstrap interval; "
                  "an interval under 0 is reasoning the run lost):", "",
                  "| model | " + " | ".join(changed_nodes) + " |", "|---|" + "---|" * len(changed_nodes)]
        for name, change in changed.items():
            lines.append(f"| {name} | " + " | ".join(f"{change[node][0]:+.3f} [{change[node][1]:+.3f}, {change[node][2]:+.3f}]"
                                                     for node in changed_nodes) + " |")
    lines += ["", "| estimator | seeds | test macro-F1 mean (sd) | accuracy mean | reasoning-node accuracy mean | s/step (x grpo) |",
              "|---|---|---|---|---|---|"]
    for name, entry in result["by_estimator"].items():
        cost = f"{entry['seconds_per_step_mean']:.2f} ({entry.get('step_cost_over_grpo', float('nan')):.2f}x)"
        lines.append(f"| {name} | {entry['seeds']} | {entry['macro_f1_mean']:.3f} ({entry['macro_f1_sd']:.3f}) | "
                     f"{entry['accuracy_mean']:.3f} | {entry['node_accuracy_mean']:.3f} | {cost} |")
    lines += ["", "Where each estimator's credit went (means over seeds and steps): the mean |advantage| of each node's tokens, "
              "the share of the trained rollout groups whose outcomes all agreed (no outcome signal), the prompt batches drawn "
              "per step and the share of all drawn groups that agreed (both differ from 1 and the trained share only with "
              "`sampling_rounds` > 1), and graph_grpo's final phi per edge.", "",
              "| estimator | uniform groups | batches drawn | uniform among drawn | "
              + " | ".join(f"\\|adv\\| {node}" for node in graph.node_names) + " |",
              "|---|---|---|---|" + "---|" * len(graph.node_names)]
    for name in result["by_estimator"]:
        runs = [run["curves"] for run in result["runs"] if run["estimator"] == name]
        sampling = [float(np.mean([np.mean(c[key]) for c in runs])) for key in ("uniform_group_share", "batches_drawn", "drawn_uniform_share")]
        advantage = [float(np.mean([c["advantage_abs_mean"][node] for c in runs])) for node in graph.node_names]
        lines.append(f"| {name} | " + " | ".join(f"{value:.2f}" for value in sampling) + " | "
                     + " | ".join(f"{value:.3f}" for value in advantage) + " |")
    learned = [run for run in result["runs"] if run["estimator"] == "graph_grpo"]
    if learned:
        edges = list(learned[0]["phi"])
        lines += ["", "| graph_grpo | " + " | ".join(edges) + " |", "|---|" + "---|" * len(edges)]
        lines += [f"| seed {run['seed']} | " + " | ".join(f"{run['phi'][edge]:.2f}" for edge in edges) + " |" for run in learned]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(17, 9))
    colors = {name: plt.cm.tab10(k) for k, name in enumerate(ORDER)}
    window = 5

    def smooth(values):
        values = np.asarray(values, dtype=float)
        if len(values) < window:
            return values
        return np.convolve(values, np.ones(window) / window, mode="valid")

    for run in result["runs"]:
        c, color = run["curves"], colors.get(run["estimator"], "black")
        label = run["estimator"] if run["seed"] == result["seeds"][0] else None
        axes[0, 0].plot(c["step"][window - 1 :] if len(c["step"]) >= window else c["step"], smooth(c["reward"]), color=color, label=label, alpha=0.8)
        axes[0, 1].plot(c["step"][window - 1 :] if len(c["step"]) >= window else c["step"], smooth(c["node_verifier_accuracy"]), color=color, alpha=0.8)
        axes[0, 2].plot(c["eval_step"], c["val_label_accuracy"], marker="o", color=color, alpha=0.8)
        axes[1, 0].plot(c["eval_step"], c["val_node_accuracy"], marker="o", color=color, alpha=0.8)
        if run["estimator"] == "graph_grpo":
            for e, (edge, values) in enumerate(c["phi"].items()):
                axes[1, 1].plot(range(1, len(values) + 1), values, color=plt.cm.Dark2(e), label=edge if run["seed"] == result["seeds"][0] else None)
    axes[0, 0].set_title(f"rollout outcome reward (moving mean of {window})")
    axes[0, 1].set_title("rollout reasoning-node verifier accuracy")
    axes[0, 2].set_title("validation label accuracy (greedy)")
    axes[1, 0].set_title("validation reasoning-node accuracy (greedy)")
    axes[1, 1].set_title("graph_grpo: phi per edge (all seeds)")
    axes[0, 0].legend(fontsize=8)
    axes[1, 1].legend(fontsize=7)
    names = list(result["by_estimator"])
    models = result["evaluation"]["models"]
    for k, name in enumerate(names):
        for j, run in enumerate(r for r in result["runs"] if r["estimator"] == name):
            f1 = models[run["name"]]["macro_f1"]
            axes[1, 2].errorbar(k + 0.15 * (j - 1), f1[0], yerr=[[f1[0] - f1[1]], [f1[2] - f1[0]]], fmt="o", color=colors.get(name, "black"))
    sft = models["sft"]["macro_f1"]
    axes[1, 2].axhspan(sft[1], sft[2], color="grey", alpha=0.2)
    axes[1, 2].axhline(sft[0], color="grey", label="SFT start [95% CI]")
    axes[1, 2].set_xticks(range(len(names)), names, rotation=30)
    axes[1, 2].set_title("test macro-F1 per run, 95% CI by query")
    axes[1, 2].legend(fontsize=8)
    for axis in axes.flat[:5]:
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--estimators", nargs="+", default=list(ORDER), choices=sorted(ESTIMATORS))
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--val-items", type=int, default=300)
    parser.add_argument("--test-pairs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained (and test splits labelled) at once, one process each")
    parser.add_argument("--rl-data", type=Path, default=None, help="datasets root of the RL prompts (default: the SFT policy's datasets)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="GRPOConfig override shared by every run (repeatable), e.g. prompts_per_step=8")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts decoded at once when labelling the test split")
    parser.add_argument("--from-demo", type=Path, default=None, help="reuse a demo output folder's world, datasets and SFT policy")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/credit_assignment"))
    parser.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse a run of the same config that finished in --work (a stopped benchmark continues where it was)")
    parser.add_argument("--checkpoint-every", type=int, default=50,
                        help="each run saves a resumable checkpoint every N steps (0: a stopped run starts again)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--checked-verdicts", action="store_true",
                        help="label the test pairs with checked decoding (each attribute check's yes/no computed from its two values, "
                             "the subject match's match from the two subjects)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    graph = ReasoningGraph.load(SFTConfig().graph)
    world, datasets, sft_model = prepare(args)

    base = load_config(GRPOConfig, overrides=args.overrides, values={
        "data": args.rl_data or datasets, "model": sft_model, "steps": args.steps, "eval_every": args.eval_every,
        "val_items": args.val_items, "threads": args.threads, "checkpoint_every": args.checkpoint_every, "resume": True})
    result = {
        "setup": {"world": str(world), "sft_model": str(sft_model), "rl_data": str(base.data), "steps": args.steps, "seeds": args.seeds,
                  "grpo": {k: v for k, v in config_to_dict(base).items() if k not in ("data", "model", "out", "estimator", "seed")},
                  "test_pairs": args.test_pairs, "parallel": args.parallel, "checked_verdicts": args.checked_verdicts},
        "seeds": args.seeds,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()},
        "runs": [],
    }
    json_path = args.results / "credit_assignment.json"
    configs = {f"{estimator}-seed{seed}": replace(base, out=args.work / "runs" / f"{estimator}-seed{seed}", estimator=estimator, seed=seed)
               for seed in args.seeds for estimator in args.estimators}

    def record(name: str, outcome: tuple[dict, dict]) -> None:
        summary, timing = outcome
        config = configs[name]
        result["runs"].append({"name": name, "estimator": config.estimator, "seed": config.seed, **timing,
                               "validation": summary["val"], "phi": summary["phi"], "curves": curves(config.out, graph)})
        json_path.write_text(json.dumps(result, indent=1))
        print(f"[credit_assignment] {name}: {timing['seconds']} s, validation macro-F1 {summary['val']['label_macro_f1']:.3f}", flush=True)

    pending = []
    for name, config in configs.items():
        finished = config.out / "summary.json"
        if args.reuse and finished.exists() and started_by(config):
            # the same run (same config, so the same seeds) finished before: its outputs are reused
            record(name, (json.loads(finished.read_text()), json.loads((config.out / "benchmark_timing.json").read_text())))
        else:
            discard_foreign_checkpoints(config)
            pending.append(name)
    with ProcessPoolExecutor(args.parallel, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_benchmark) as pool:
        futures = {pool.submit(train_one, config_to_dict(configs[name])): name for name in pending}
        for future in as_completed(futures):
            record(futures[future], future.result())
    result["runs"].sort(key=lambda run: list(configs).index(run["name"]))

    models = {"sft": sft_model, **{name: config.out / "model" for name, config in configs.items()}}
    checked = "_checked" if args.checked_verdicts else ""
    labelled = args.work / f"predictions{checked}"
    with ProcessPoolExecutor(args.parallel, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_benchmark) as pool:
        futures = {name: pool.submit(label_test_split, model, datasets, name, labelled / name, args.test_pairs,
                                     args.threads, args.batch_size, args.checked_verdicts) for name, model in models.items()}
        predictions = {name: future.result() for name, future in futures.items()}
    result["evaluation"] = evaluate_all(predictions, world, args.work, f"evaluation{checked}")
    result["by_estimator"] = summarise(result["runs"], result["evaluation"], graph)
    json_path.write_text(json.dumps(result, indent=1))
    (args.results / "credit_assignment.md").write_text(markdown(result, graph))
    plot(result, args.results / "credit_assignment.png")
    print(markdown(result, graph))
    print(f"wrote {json_path}, {args.results / 'credit_assignment.md'}, {args.results / 'credit_assignment.png'}")


if __name__ == "__main__":
    main()
