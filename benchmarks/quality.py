"""Where a policy's labels are lost: its greedy CoTs against gold, and against its own extracted nodes.

    .venv/bin/python benchmarks/quality.py --demo demo_output [--split test] [--policies sft grpo] [--unseen other_world/datasets] [--checked-verdicts]
    .venv/bin/python benchmarks/quality.py --data datasets --policy sft=runs/sft/model --policy rf=runs/rf/model [--unseen ...]
    .venv/bin/python benchmarks/quality.py --curves runs/sft_a runs/sft_b   # SFT runs trained with eval_every

`--curves` plots each SFT run's validation per-node accuracy and macro-F1 against steps (from its
`metrics.jsonl`) into `benchmarks/results/quality_curves.{json,png}`.

For each policy folder of a finished demo (`<demo>/sft/model`, `<demo>/grpo/model`), greedy CoTs of the
split's pairs (`training_examples` of `<demo>/datasets`) are parsed strictly and compared twice:
- with gold: per-node accuracy and label macro-F1 (the project's one definition);
- with the policy's own extraction: the decisions the world's rules derive from the policy's own `qs`,
  `ps`, `qa`, `pa` (`ms`: match when the subjects agree, related when the vocabulary relates them;
  `ma`: how many of its own query constraints its own product attributes satisfy; `y`: the label set's
  rule on its own written `ms`, `ma`). A decision that differs from the one its own reasoning implies is
  a contradiction: the policy copied a decision instead of deriving it.
The "composed" label is the label its own extraction implies; its macro-F1 is what the policy would
score if it only extracted and the rules decided, which splits the loss between extraction and
composition. Beside quality, each policy's scoring throughput: pairs/s of `training.predict.relevance_rows`
with no reasoning kept (the nightly path: one forward pass per pair in `label_first`, the whole CoT
generated in `reasoning_first`), prompt building included, on the first `--throughput-pairs` pairs.

What stops `qa` (the query's constraints): each query text is read with the world's vocabulary (every value's
surface forms, the brands, the type names, the query templates' own words, the noise words), every way
it can be segmented. Pairs whose text has exactly one reading, equal to gold, bound what a policy can
reach from the text alone; the rest are several readings (`natural wood`: color, or color and
material) or none (a typo). The policy's `qa` accuracy is split by how many training queries wrote the
rarest of the pair's gold values with the same surface form, and its wrong constraints by kind:
missed, added, wrong value, and how many of the added or wrong values are the product's own (copied
from the product's facets written before them).

`--unseen DATA` runs the same diagnosis on the test split of another world's `relevance datasets`
output (generated with a seed the policies never saw, same vocabulary): generalisation, not memory.
Writes `benchmarks/results/quality_diagnosis.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.metrics import label_scores  # noqa: E402
from jobs.world.reading import QueryReader  # noqa: E402
from jobs.world.vocabulary import load_vocabulary  # noqa: E402
from schemas.graph import LabelSet, ReasoningGraph, attribute_match, parse_facets  # noqa: E402
from training.cot import COT_TOKEN_BUDGET, CheckedVerdicts, checked_rules, node_correct, parse_cot  # noqa: E402
from training.decoding import generate  # noqa: E402
from training.examples import encode_example, load_pairs  # noqa: E402
from training.model import load_model  # noqa: E402
from training.policy_format import PolicyFormat  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EXTRACTED = ("qs", "ps", "qa", "pa")
COVERAGE_BUCKETS = ((0, "0"), (1, "1-2"), (3, "3-9"), (10, ">=10"))  # lower bound, name: training queries per surface form


def facets(text: str | None) -> dict[str, str] | None:
    """A facets node's key -> value ({} for `none`); None when missing or malformed."""
    return None if text is None else parse_facets(text)


def implied_ms(qs: str | None, ps: str | None, related: set[tuple[str, str]]) -> str | None:
    if qs is None or ps is None:
        return None
    return "match" if qs == ps else ("related" if (qs, ps) in related else "mismatch")


def implied_ma(qa: str | None, pa: str | None) -> str | None:
    wanted, have = facets(qa), facets(pa)
    return None if wanted is None or have is None else attribute_match(wanted, have)


def implied_label(ms: str | None, ma: str | None, labels: LabelSet) -> str | None:
    if ms is None or ma is None:
        return None
    try:
        return labels.label_from_nodes({"ms": ms, "ma": ma})
    except ValueError:
        return None


def text_reading(reader: QueryReader, query: str, gold: dict[str, str]) -> str:
    readings = reader.readings(query)
    if not readings:
        return "none (a typo)"
    if len(readings) > 1:
        return "several, gold among them" if frozenset(gold.items()) in readings else "several, gold not among them"
    return "one, equal to gold" if frozenset(gold.items()) in readings else "one, not gold"


def coverage_bucket(reader: QueryReader, query: str, gold: dict[str, str], train_surfaces: Counter) -> str:
    """How many training queries wrote the rarest of `gold`'s values in the surface form this query uses."""
    if not gold:
        return "no constraint"
    written = reader.surfaces(query)
    counts = [max((train_surfaces[s] for s in written if s[1:] == (key, value)), default=None) for key, value in gold.items()]
    if None in counts:
        return "a value not spelled as the vocabulary has it"
    return next(name for bound, name in reversed(COVERAGE_BUCKETS) if min(counts) >= bound)


def qa_breakdown(reader: QueryReader, pairs: list[dict], parsed: list, train_surfaces: Counter) -> dict:
    """The text's readings, qa accuracy by training coverage of the values' surface forms, and qa's wrong constraints by kind."""
    readings, by_coverage, errors = Counter(), {}, Counter()
    per_query = {}  # a query's reading and bucket, once: a split holds each query with many products
    for pair, cot in zip(pairs, parsed):
        gold, written = facets(pair["gold"]["qa"]), facets(cot.get("qa"))
        if pair["query"] not in per_query:
            per_query[pair["query"]] = (text_reading(reader, pair["query"], gold), coverage_bucket(reader, pair["query"], gold, train_surfaces))
        reading, coverage = per_query[pair["query"]]
        readings[reading] += 1
        bucket = by_coverage.setdefault(coverage, {"pairs": 0, "right": 0})
        bucket["pairs"] += 1
        bucket["right"] += written == gold
        if written is None:
            errors["not written or malformed"] += 1
            continue
        product = facets(pair["gold"]["pa"]) or {}
        errors["missed"] += len(gold.keys() - written.keys())
        for key in written.keys() - gold.keys():
            errors["added" + (", the product's value" if product.get(key) == written[key] else "")] += 1
        for key in gold.keys() & written.keys():
            if gold[key] != written[key]:
                errors["wrong value" + (", the product's value" if product.get(key) == written[key] else "")] += 1
    order = [name for _, name in COVERAGE_BUCKETS] + ["no constraint", "a value not spelled as the vocabulary has it"]
    return {"text_readings": dict(readings),
            "accuracy_by_training_coverage": {name: {**by_coverage[name], "accuracy": by_coverage[name]["right"] / by_coverage[name]["pairs"]}
                                              for name in order if name in by_coverage},
            "wrong_constraints": dict(errors)}


def training_surfaces(reader: QueryReader, data: Path, label_set: str) -> Counter:
    """Training queries per (surface form, key, value) written in them."""
    return Counter(s for query in {pair["query"] for pair in load_pairs(data, label_set, "train")} for s in reader.surfaces(query))


@dataclass(frozen=True)
class Policy:
    """A policy folder loaded once: its format, graph, label set, model and tokenizer."""

    folder: Path
    format: PolicyFormat
    graph: ReasoningGraph
    labels: LabelSet
    model: object
    tokenizer: object

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> Policy:
        policy_format = PolicyFormat.load(folder) or PolicyFormat()
        model, tokenizer = load_model(folder)
        return cls(folder, policy_format, ReasoningGraph.load(policy_format.graph), LabelSet.load(policy_format.label_set),
                   model.to(device), tokenizer)


def throughput(policy: Policy, pairs: list[dict], batch_size: int, checked_verdicts: bool = False) -> float:
    """Pairs/s of the nightly scoring path (label distribution, no reasoning kept) on `pairs`, prompts built from text."""
    import datetime as dt
    import time

    from training.predict import pair_prompts, relevance_rows

    started = time.perf_counter()
    prompts = pair_prompts(policy.tokenizer, pairs, policy.format.prompt_tokens)
    relevance_rows(policy.model, policy.tokenizer, pairs, prompts, policy.graph, policy.labels, policy.format.order, reasoning="none",
                   model_name="bench", model_version="bench", ds=dt.date.today(), batch_size=batch_size, checked_verdicts=checked_verdicts)
    return len(pairs) / (time.perf_counter() - started)


def diagnose(policy: Policy, data: Path, split: str, related: set[tuple[str, str]], batch_size: int, max_new_tokens: int,
             reader: QueryReader, train_surfaces: Counter, checked_verdicts: bool = False) -> dict:
    """Node accuracy, contradictions, the composed label and what stops `qa`, for one policy's greedy CoTs on `split`
    (with `checked_verdicts`, decoded as the nightly labels are: `training.cot.CheckedVerdicts`)."""
    policy_format, graph, labels, model, tokenizer = policy.format, policy.graph, policy.labels, policy.model, policy.tokenizer
    pairs = load_pairs(data, policy_format.label_set, split)
    examples = [encode_example(pair, tokenizer, graph, policy_format.order, policy_format.prompt_tokens) for pair in pairs]
    chooser = CheckedVerdicts(tokenizer, checked_rules(graph)) if checked_verdicts else None
    generations = generate(model, tokenizer, [e.prompt_ids for e in examples], max_new_tokens=max_new_tokens, batch_size=batch_size,
                           chooser=chooser)
    parsed = [parse_cot(text, graph, policy_format.order, labels.names, "strict") for text in generations.texts]
    golds = [pair["gold"] for pair in pairs]
    n = len(pairs)
    y = graph.label_node
    node_accuracy = {node: sum(node_correct(graph.node(node).kind, p.get(node), g[node]) for p, g in zip(parsed, golds)) / n
                     for node in graph.node_names}
    # what its own extraction implies: ms and ma from its qs/ps/qa/pa, y from its own written ms and ma
    own = [{"ms": implied_ms(p.get("qs"), p.get("ps"), related), "ma": implied_ma(p.get("qa"), p.get("pa")),
            y: implied_label(p.get("ms"), p.get("ma"), labels)} for p in parsed]
    contradictions = {}
    for node in ("ms", "ma", y):
        comparable = [(p.get(node), o[node]) for p, o in zip(parsed, own) if p.get(node) is not None and o[node] is not None]
        contradictions[node] = {"pairs": len(comparable), "contradicted": sum(a != b for a, b in comparable)}
    subjects_right = [i for i, (p, g) in enumerate(zip(parsed, golds)) if p.get("qs") == g["qs"] and p.get("ps") == g["ps"]]
    attributes_right = [i for i, (p, g) in enumerate(zip(parsed, golds))
                        if node_correct(graph.node("qa").kind, p.get("qa"), g["qa"]) and node_correct(graph.node("pa").kind, p.get("pa"), g["pa"])]
    gold_labels = [g[y] for g in golds]
    predicted = [p.get(y) for p in parsed]
    composed = [implied_label(o["ms"], o["ma"], labels) for o in own]  # the label its own extraction implies
    ms_confusion = Counter((g["ms"], p.get("ms")) for p, g in zip(parsed, golds))
    return {
        "policy": str(policy.folder), "format": policy_format.__dict__, "checked_verdicts": checked_verdicts, "pairs": n,
        "parse_rate": sum(p.well_formed for p in parsed) / n,
        "label_macro_f1": float(label_scores(gold_labels, predicted, labels.names).macro_f1),
        "label_accuracy": sum(a == b for a, b in zip(predicted, gold_labels)) / n,
        "composed_label_macro_f1": float(label_scores(gold_labels, composed, labels.names).macro_f1),
        "composed_label_accuracy": sum(a == b for a, b in zip(composed, gold_labels)) / n,
        "node_accuracy": node_accuracy,
        "contradictions": contradictions,
        "ms_wrong_where_both_subjects_right": {"pairs": len(subjects_right),
                                               "wrong": sum(parsed[i].get("ms") != golds[i]["ms"] for i in subjects_right)},
        "ma_wrong_where_both_facets_right": {"pairs": len(attributes_right),
                                             "wrong": sum(parsed[i].get("ma") != golds[i]["ma"] for i in attributes_right)},
        "ms_confusion_gold_to_predicted": {f"{g}->{p}": c for (g, p), c in sorted(ms_confusion.items(), key=str)},
        "predicted_label_counts": dict(Counter(label or "<unparsed>" for label in predicted)),
        "gold_label_counts": dict(Counter(gold_labels)),
        "qa": qa_breakdown(reader, pairs, parsed, train_surfaces),
    }


def machine(device: str) -> str:
    """Where the figures were measured: the CPUs and their load, and the GPU when the policies decode on one."""
    import torch

    cpus = f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    return f"{torch.cuda.get_device_name(torch.device(device))}, {cpus}" if device.startswith("cuda") else cpus


def markdown(result: dict) -> str:
    nodes = [node for node in ("qs", "ps", "qa", "pa", "ac", "ms", "ma", "y") if any(node in run["node_accuracy"] for run in result["policies"].values())]
    lines = [f"# Quality diagnosis ({result['split']} split of `{result['data']}`, {result['machine']})", "",
             "Greedy CoTs of each policy" + (" under checked decoding" if result["checked_verdicts"] else "")
             + ", parsed strictly, against gold and against the policy's own extraction "
             "(`benchmarks/quality.py`; the module docstring defines every column).", "",
             "| policy | order | parse | macro-F1 | composed macro-F1 | " + " | ".join(f"acc {n}" for n in nodes)
             + " | ms contradicts own qs/ps | ma contradicts own qa/pa | y contradicts own ms/ma | ms wrong with qs, ps right |",
             "|---" * (len(nodes) + 9) + "|"]
    for name, run in result["policies"].items():
        contradiction = {node: f"{c['contradicted']}/{c['pairs']}" for node, c in run["contradictions"].items()}
        wrong = run["ms_wrong_where_both_subjects_right"]
        lines.append(
            f"| {name} | {run['format']['order']} | {run['parse_rate']:.3f} | {run['label_macro_f1']:.3f} | {run['composed_label_macro_f1']:.3f} | "
            + " | ".join(f"{run['node_accuracy'][n]:.3f}" if n in run["node_accuracy"] else "-" for n in nodes)
            + f" | {contradiction['ms']} | {contradiction['ma']} | {contradiction['y']} | {wrong['wrong']}/{wrong['pairs']} |")
    if any("unseen" in run for run in result["policies"].values()):
        reasoning = [node for node in nodes if node != "y"]
        lines += ["", f"Generalisation: the test split of a world the policies never saw (`{result['unseen']}`, same vocabulary).", "",
                  "| policy | macro-F1 own test | macro-F1 unseen world | difference | " + " | ".join(f"unseen acc {n}" for n in reasoning)
                  + " |", "|---" * (len(reasoning) + 4) + "|"]
        for name, run in result["policies"].items():
            unseen = run["unseen"]
            lines.append(f"| {name} | {run['label_macro_f1']:.3f} | {unseen['label_macro_f1']:.3f} | {unseen['label_macro_f1'] - run['label_macro_f1']:+.3f} | "
                         + " | ".join(f"{unseen['node_accuracy'][n]:.3f}" if n in unseen["node_accuracy"] else "-" for n in reasoning) + " |")
    lines += qa_markdown(result)
    lines += ["", "Scoring throughput (pairs/s, nightly path, no reasoning kept): "
              + ", ".join(f"{name} {run['throughput_pairs_per_s']:.1f}" for name, run in result["policies"].items()) + "."]
    return "\n".join(lines) + "\n"


def qa_markdown(result: dict) -> list[str]:
    """What stops `qa`: the texts' readings (the same for every policy), accuracy by training coverage, wrong constraints."""
    runs = result["policies"]
    first = next(iter(runs.values()))["qa"]
    pairs = sum(first["text_readings"].values())
    lines = ["", f"What stops `qa`: the {result['split']} texts read with the world's vocabulary ({pairs} pairs): "
             + ", ".join(f"{kind} {count} ({count / pairs:.1%})" for kind, count in sorted(first["text_readings"].items(), key=lambda kv: -kv[1]))
             + ".", "", "`qa` accuracy by how many training queries wrote the pair's rarest gold value in the same surface form (pairs):", ""]
    buckets = list(first["accuracy_by_training_coverage"])
    lines += ["| policy | " + " | ".join(f"{name} ({first['accuracy_by_training_coverage'][name]['pairs']})" for name in buckets) + " |",
              "|---" * (len(buckets) + 1) + "|"]
    for name, run in runs.items():
        cells = run["qa"]["accuracy_by_training_coverage"]
        lines.append(f"| {name} | " + " | ".join(f"{cells[b]['accuracy']:.3f}" if b in cells else "-" for b in buckets) + " |")
    kinds = sorted({kind for run in runs.values() for kind in run["qa"]["wrong_constraints"]})
    lines += ["", "`qa`'s wrong constraints by kind:", "", "| policy | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(run["qa"]["wrong_constraints"].get(kind, 0)) for kind in kinds) + " |" for name, run in runs.items()]
    return lines


def curves(runs: list[Path], results: Path, keep_previous: bool = False) -> dict:
    """Validation metrics against steps of each SFT run folder (its `metrics.jsonl` records with `val/...`), with the
    model size and order of each; `keep_previous` keeps the curves of earlier runs already in quality_curves.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    previous = results / "quality_curves.json"
    found = json.loads(previous.read_text()) if keep_previous and previous.exists() else {}
    for run in runs:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        start = next(record for record in records if record.get("event") == "start")
        evals = [record for record in records if "val/label_macro_f1" in record]
        model_config = json.loads((Path(start["config"]["model"]) / "config.json").read_text())
        size = f"{model_config['num_hidden_layers']}x{model_config['hidden_size']}"
        found[run.name] = {"order": start["config"]["order"], "model": size, "steps": [r["step"] for r in evals],
                           **{key[len("val/"):]: [r[key] for r in evals] for key in evals[-1] if key.startswith("val/")}}
    nodes = ("qs", "ps", "qa", "pa", "ms", "ma", "y")
    figure, grid = plt.subplots(2, 4, figsize=(15, 7.5), sharex=True)
    axes = list(grid.flat)
    for name, run in found.items():
        for axis, node in zip(axes, nodes):
            axis.plot(run["steps"], run[f"node_accuracy/{node}"], marker="o", label=f"{name} ({run.get('model', '2x128')}, {run['order']})")
            axis.set_title(f"{node} accuracy")
        axes[-1].plot(run["steps"], run["label_macro_f1"], marker="o", label=f"{name} ({run.get('model', '2x128')}, {run['order']})")
        axes[-1].set_title("label macro-F1")
    figure.legend(*axes[-1].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    for axis in axes:
        axis.set_xlabel("SFT step")
        axis.set_ylim(0, 1)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    results.mkdir(parents=True, exist_ok=True)
    figure.savefig(results / "quality_curves.png", dpi=80)
    (results / "quality_curves.json").write_text(json.dumps(found, indent=2) + "\n")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="A finished `relevance demo` output folder (its datasets/ and <name>/model policies).")
    parser.add_argument("--data", type=Path, help="A `relevance datasets` output folder (with --policy, instead of --demo).")
    parser.add_argument("--policy", action="append", default=[], metavar="NAME=FOLDER", help="A policy folder to diagnose (repeatable).")
    parser.add_argument("--unseen", type=Path, help="`relevance datasets` output of a world with a seed the policies never saw.")
    parser.add_argument("--throughput-pairs", type=int, default=512)
    parser.add_argument("--curves", type=Path, nargs="+", help="SFT run folders trained with eval_every: plot their validation curves.")
    parser.add_argument("--keep-previous", action="store_true", help="with --curves: keep the runs already in quality_curves.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--checked-verdicts", action="store_true",
                        help="decode as the nightly labels do: each attribute check's yes/no and the subject match computed from the "
                             "values the policy wrote")
    parser.add_argument("--policies", nargs="+", default=["sft", "grpo"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=COT_TOKEN_BUDGET)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cpu", help="Where the policies decode: cpu, cuda or cuda:N.")
    args = parser.parse_args()
    if args.curves:
        print(json.dumps(curves(args.curves, args.results, args.keep_previous), indent=1))
        return
    if args.demo is not None:
        data, policies = args.demo / "datasets", {name: args.demo / name / "model" for name in args.policies}
    elif args.data is not None and args.policy:
        data, policies = args.data, dict(entry.split("=", 1) for entry in args.policy)
    else:
        parser.error("give --demo (a demo output folder), --data with --policy NAME=FOLDER, or --curves (SFT run folders)")
    import torch

    torch.set_num_threads(2)
    vocabulary = load_vocabulary()
    related = {(a, b) for a, row in zip(vocabulary.type_names, vocabulary.related) for b, is_related in zip(vocabulary.type_names, row)
               if is_related}
    result = {"data": str(data), "split": args.split, "unseen": str(args.unseen) if args.unseen else None,
              "checked_verdicts": args.checked_verdicts, "policies": {}}
    label_set = (PolicyFormat.load(Path(next(iter(policies.values())))) or PolicyFormat()).label_set
    reader = QueryReader(vocabulary)
    train_surfaces = training_surfaces(reader, data, label_set)  # the policies' training queries, also for --unseen
    timed = load_pairs(data, label_set, args.split)[: args.throughput_pairs]
    for name, folder in policies.items():
        policy = Policy.load(Path(folder), args.device)
        run = diagnose(policy, data, args.split, related, args.batch_size, args.max_new_tokens, reader, train_surfaces, args.checked_verdicts)
        run["throughput_pairs_per_s"] = throughput(policy, timed, args.batch_size, args.checked_verdicts)
        run["throughput_load_average"] = round(os.getloadavg()[0], 2)  # timings compare only on a quiet machine
        if args.unseen:
            run["unseen"] = diagnose(policy, args.unseen, "test", related, args.batch_size, args.max_new_tokens, reader, train_surfaces,
                                     args.checked_verdicts)
        result["policies"][name] = run
    result["machine"] = machine(args.device)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "quality_diagnosis.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "quality_diagnosis.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
