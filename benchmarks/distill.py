"""Distilled students against their teacher: quality on the test split and serving throughput on this CPU.

    .venv/bin/python benchmarks/distill.py [--root demo_output] [--steps 400] [--test-pairs 1000] [--threads 2] [--checked-verdicts]

From a demo root (`make demo` writes datasets/ and the SFT teacher sft/model), trains three students
with `training.distill.run` on the same teacher targets, seed and budget: the multi-head student
(the default heads and node tables) with the default mix of teacher and gold targets, the same student
by pure distillation (`gold_weight=0`: it never sees a gold label, so its quality is the teacher's to
pass on), and the single-head student (y only; `--skip-single-head` leaves it out). Then, on the same test pairs (whole queries, a fixed
sample across the split): macro-F1, accuracy and per-class F1 of the teacher (its label distribution read by
teacher forcing, `training.predict.relevance_rows`, label-first fast path), of the students and the
share of the teacher's macro-F1 each keeps; the students' node accuracy; the pure student served with
its node tables switched off (all, then all but one: what each table adds); and throughput in
pairs/s, text to label probabilities, tokenization included, best of `--repeats` passes after one
warm-up batch: both students (`training.student.student_rows`), the multi-head student exported to
ONNX and quantized to int8 (`export_onnx`, `quantize_onnx`, `OnnxStudent`; its quality is reported
too), sentence-transformers' CrossEncoder
on the same encoder with the same batch size and max length, and the teacher. Writes
benchmarks/results/distill.json and distill.png.

With `--checked-verdicts` the teacher is the one the nightly stage publishes: the students learn its targets under checked
decoding (`DistillConfig.checked_verdicts`), and its quality, node accuracy and throughput are measured decoding that way.

With `--work W --reuse`, a student whose folder under W holds a finished run made with the very config
the benchmark would use (the config its metrics.jsonl starts with) is scored as it is, not trained again;
its entry in `runs` says `reused` and carries that run's own summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import load_average  # noqa: E402

from schemas.config import config_to_dict  # noqa: E402
from schemas.graph import LabelSet, ReasoningGraph  # noqa: E402
from training.distill import TEACHER_CACHE, DistillConfig, run  # noqa: E402
from training.examples import load_pairs, whole_queries  # noqa: E402
from training.policy_format import PolicyFormat  # noqa: E402
from training.student import OnnxStudent, default_encoder, export_onnx, load_student, product_text, quantize_onnx, student_rows  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "distill.json"


def best_rate(score, n: int, repeats: int) -> float:
    """Pairs per second of the fastest of `repeats` calls of `score()` over n pairs."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        score()
        seconds.append(time.perf_counter() - started)
    return n / min(seconds)


def label_quality(gold: list[str], predicted: list[str], names: list[str]) -> dict:
    """Macro-F1, accuracy and per-class F1 by the project's one definition (`evaluation.metrics.label_scores`)."""
    from evaluation.metrics import label_scores

    scores = label_scores(gold, predicted, names)
    return {
        "macro_f1": float(scores.macro_f1),
        "accuracy": float(scores.accuracy),
        "per_class_f1": {name: float(value) for name, value in zip(names, scores.f1)},
    }


def teacher_scorer(teacher: Path, pairs: list[dict], graph: ReasoningGraph, labels: LabelSet, policy: PolicyFormat, batch_size: int,
                   reasoning: str = "none", checked_verdicts: bool = False):
    """A callable that labels `pairs` with the teacher from text (prompt building included) and returns its RELEVANCE rows
    (with `reasoning="all"` its node decisions too: label_first then generates the CoT it otherwise skips; `checked_verdicts`:
    under checked decoding)."""
    from training.examples import prompt_ids
    from training.model import load_model
    from training.predict import relevance_rows
    from training.prompt import build_prompt, prompt_offsets

    model, tokenizer = load_model(teacher)
    offsets = prompt_offsets(tokenizer)

    def score(chosen=pairs):
        prompts = [prompt_ids(tokenizer, build_prompt(p["query"], p["title"], p["product_type"], p["attributes"], p["description"], offsets,
                                                      policy.prompt_tokens).text) for p in chosen]
        return relevance_rows(model, tokenizer, chosen, prompts, graph, labels, policy.order, reasoning=reasoning, model_name="teacher",
                              model_version="teacher", ds=dt.date.today(), batch_size=batch_size, checked_verdicts=checked_verdicts)

    return score


def finished_run(config: DistillConfig) -> dict | None:
    """The summary of the finished run in config.out when that run started with this very config; None otherwise."""
    summary, metrics = config.out / "summary.json", config.out / "metrics.jsonl"
    if not (summary.exists() and metrics.exists()):
        return None
    start = json.loads(metrics.read_text().splitlines()[0])
    return json.loads(summary.read_text()) if start.get("config") == json.loads(json.dumps(config_to_dict(config))) else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality, speed = result["test"], result["throughput_pairs_per_s"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(quality)
    left.bar([n.replace("_", "\n", 1) for n in names], [quality[n]["macro_f1"] for n in names], color=["gray", "tab:blue", "tab:orange", "tab:cyan"])
    left.axhline(0.95 * quality["teacher"]["macro_f1"], color="black", linestyle="--", linewidth=1, label="95% of the teacher")
    left.set_ylabel("macro-F1 on the test split")
    left.set_title(f"quality ({result['test_pairs']} test pairs)")
    left.legend()
    names = list(speed)
    right.bar([n.replace("_", "\n", 1) for n in names], [speed[n] for n in names], color=["tab:blue", "tab:orange", "tab:cyan", "tab:green", "gray"])
    right.set_ylabel("pairs / s")
    right.set_title(f"throughput, batch {result['batch_size']}, {result['threads']} CPU threads")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("demo_output"), help="demo root with datasets/ and sft/model")
    parser.add_argument("--teacher", type=Path, help="teacher folder (default: ROOT/sft/model)")
    parser.add_argument("--steps", type=int, default=DistillConfig().max_steps)
    parser.add_argument("--train-batch-size", type=int, default=DistillConfig().batch_size)
    parser.add_argument("--warmup-steps", type=int, default=DistillConfig().warmup_steps)
    parser.add_argument("--val-items", type=int, default=DistillConfig().val_items)
    parser.add_argument("--test-pairs", type=int, default=1000, help="test pairs (whole queries, a fixed sample: training.examples.whole_queries; 0: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="inference batch size of every scorer")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per scorer (the best counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="folder for the student runs (default: a temporary one)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--checked-verdicts", action="store_true", help="distil from and measure the teacher under checked decoding")
    parser.add_argument("--reuse", action="store_true", help="score the finished runs under --work made with the same config instead of training them")
    parser.add_argument("--skip-single-head", action="store_true",
                        help="train only the two multi-head students the targets read (the single-head one adds a third run of the same length)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    teacher = args.teacher or args.root / "sft" / "model"
    work = args.work or Path(tempfile.mkdtemp(prefix="distill-"))
    common = dict(data=args.root / "datasets", teacher=teacher, max_steps=args.steps, batch_size=args.train_batch_size, warmup_steps=args.warmup_steps,
                  val_items=args.val_items, checkpoint_every=0, resume=False, threads=args.threads, checked_verdicts=args.checked_verdicts)
    configs = {"student_multi_head": DistillConfig(out=work / "multi", **common),
               "student_multi_head_pure": DistillConfig(out=work / "pure", gold_weight=0.0, **common),
               "student_single_head": DistillConfig(out=work / "single", single_head=True, **common)}
    if args.skip_single_head:
        del configs["student_single_head"]
    policy = configs["student_multi_head"].teacher_format()
    graph, labels = ReasoningGraph.load(policy.graph), LabelSet.load(policy.label_set)
    runs = {}
    for name, config in configs.items():
        reused = finished_run(config) if args.reuse else None
        if reused is not None:
            runs[name] = {**reused, "reused": True}
            continue
        if name != "student_multi_head" and (work / "multi" / TEACHER_CACHE).exists():  # same pairs drawn: reuse the teacher's targets
            config.out.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "multi" / TEACHER_CACHE, config.out / TEACHER_CACHE)
        load_before = load_average()
        summary = run(config)
        runs[name] = {**summary, "load_before": load_before, "load_after": load_average()}

    pairs = whole_queries(load_pairs(args.root / "datasets", labels.name, "test"), args.test_pairs)
    gold = [pair["gold"][graph.label_node] for pair in pairs]
    config = configs["student_multi_head"]

    score_teacher = teacher_scorer(teacher, pairs, graph, labels, policy, args.batch_size, checked_verdicts=args.checked_verdicts)
    teacher_rows = teacher_scorer(teacher, pairs, graph, labels, policy, args.batch_size, reasoning="all",
                                  checked_verdicts=args.checked_verdicts)().to_pylist()
    test = {"teacher": label_quality(gold, [row["label"] for row in teacher_rows], labels.names)}
    students = {name: load_student(run_config.out / "model") for name, run_config in configs.items()}

    def quality(rows: list[dict], meta: dict) -> dict:
        measured = label_quality(gold, [row["label"] for row in rows], labels.names)
        measured["share_of_teacher_macro_f1"] = measured["macro_f1"] / test["teacher"]["macro_f1"]
        measured["node_accuracy"] = {head: sum(dict(row["node_decisions"])[head] == pair["gold"][head] for row, pair in zip(rows, pairs)) / len(pairs)
                                     for head in meta["heads"] if head != graph.label_node}
        return measured

    def without_tables(model, tokenizer, meta) -> dict:
        """The student served with its node tables switched off, all of them, then all but one (an emptied table, no
        counts, leaves its node to its own head); its tables are restored afterwards."""
        counts = {node: getattr(model, f"table_{node}").clone() for node in model.table_parents}
        if not counts:
            return {}
        measured = {}
        for kept in [()] + ([(node,) for node in counts] if len(counts) > 1 else []):
            for node, counted in counts.items():
                getattr(model, f"table_{node}").copy_(counted if node in kept else torch.zeros_like(counted))
            rows = student_rows(model, tokenizer, pairs, labels, graph.label_node, max_length=meta["max_length"], model_name="student",
                                model_version="bench", ds=dt.date.today(), batch_size=args.batch_size).to_pylist()
            measured["heads alone" if not kept else f"only the {kept[0]} table"] = quality(rows, meta)
        for node, counted in counts.items():
            getattr(model, f"table_{node}").copy_(counted)
        return measured

    model, tokenizer, meta = students["student_multi_head"]
    onnx_path = export_onnx(model, tokenizer, work / "multi" / "student.onnx", meta["max_length"])
    int8 = OnnxStudent(quantize_onnx(onnx_path, work / "multi" / "student.int8.onnx"), meta["heads"], threads=args.threads)
    students["student_multi_head_onnx_int8"] = (int8, tokenizer, meta)
    scorers = {}
    for name, (model, tokenizer, meta) in students.items():

        def score(chosen=pairs, model=model, tokenizer=tokenizer, meta=meta):
            return student_rows(model, tokenizer, chosen, labels, graph.label_node, max_length=meta["max_length"], model_name="student",
                                model_version="bench", ds=dt.date.today(), batch_size=args.batch_size)

        test[name] = quality(score().to_pylist(), meta)
        scorers[name] = score
    test["student_multi_head_pure"]["served_without_tables"] = without_tables(*students["student_multi_head_pure"])

    from sentence_transformers import CrossEncoder

    encoder = config.encoder or default_encoder()
    cross_encoder = CrossEncoder(str(encoder), num_labels=len(labels.names), max_length=config.max_length, local_files_only=True, device="cpu")
    texts = [(pair["query"], product_text(pair, config.max_length)) for pair in pairs]
    scorers["cross_encoder_same_encoder"] = lambda chosen=texts: cross_encoder.predict(chosen, batch_size=args.batch_size, show_progress_bar=False)
    scorers["teacher"] = score_teacher
    throughput = {}
    for name, score in scorers.items():
        warm = texts[: args.batch_size] if name.startswith("cross") else pairs[: args.batch_size]
        score(warm)
        throughput[name] = best_rate(score, len(pairs), args.repeats)

    multi, pure = test["student_multi_head"], test["student_multi_head_pure"]
    teacher_nodes = {head: sum(dict(row["node_decisions"]).get(head) == pair["gold"][head] for row, pair in zip(teacher_rows, pairs)) / len(pairs)
                     for head in pure["node_accuracy"]}
    test["teacher"]["node_accuracy"] = teacher_nodes
    result = {
        "root": str(args.root), "teacher": str(teacher), "teacher_checked_verdicts": args.checked_verdicts, "encoder": str(encoder), "test_pairs": len(pairs), "batch_size": args.batch_size,
        "threads": args.threads,
        "distill": {k: v for k, v in config_to_dict(config).items() if k not in ("data", "teacher", "out")},
        "runs": runs, "test": test, "throughput_pairs_per_s": throughput,
        "targets": {
            "multi_head_keeps_95pct_of_teacher_macro_f1": multi["share_of_teacher_macro_f1"] >= 0.95,
            "pure_distillation_keeps_95pct_of_teacher_macro_f1": pure["share_of_teacher_macro_f1"] >= 0.95,
            "pure_distillation_node_accuracy_minus_teacher": {head: pure["node_accuracy"][head] - teacher_nodes[head] for head in teacher_nodes},
            "multi_head_throughput_over_cross_encoder": throughput["student_multi_head"] / throughput["cross_encoder_same_encoder"],
            "multi_head_onnx_int8_throughput_over_cross_encoder":
                throughput["student_multi_head_onnx_int8"] / throughput["cross_encoder_same_encoder"],
        },
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(), "load": load_average()},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    plot(result, args.results.with_suffix(".png"))
    print(json.dumps({"test": {k: {m: v[m] for m in ("macro_f1", "share_of_teacher_macro_f1") if m in v} for k, v in test.items()},
                      "throughput_pairs_per_s": throughput, "targets": result["targets"]}, indent=2))
    print(f"results: {args.results} and {args.results.with_suffix('.png')}")


if __name__ == "__main__":
    main()
