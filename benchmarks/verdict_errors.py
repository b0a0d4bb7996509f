"""Where a relevance8 policy's `ma` is lost: its attribute checks against gold, and the labels it would give with the
checks' verdicts computed from the values it wrote.

    .venv/bin/python benchmarks/verdict_errors.py --world WORLD --predictions ROOT [--labellers sft grpo-seed0 ...]
        [--out benchmarks/results/verdict_errors.json]

ROOT holds one folder per labeller, each a `relevance` table of greedy CoTs (`benchmarks/credit_assignment.py` writes
them under WORK/predictions). For each labeller, against the world's gold nodes:
- how often its `ma` is the one its own `ac` implies (the graph's rule: match when every check is yes, partial when
  some, mismatch when none), and its `ma` accuracy where its `ac` is right;
- its wrong `ac` texts by the first part that differs from gold: the wanted side (keys or query values), else the
  product's values, else only the yes/no verdicts. A verdict-only error copied both values right and compared them
  wrong; those are counted as `yes` to different values and `no` to equal ones;
- how often it writes `ms: match` under two different subjects it wrote itself (the graph's `equal_parents` rule,
  which checked decoding applies);
- the counterfactual: each verdict recomputed as (wanted == offered) from the values the labeller wrote, `ma` and `y`
  then derived by the graph's rules from its own `ac` and `ms`. Every extraction stays the labeller's own; only the
  comparison is computed. Its macro-F1 is what exact verdicts would give this policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.metrics import f1_score  # noqa: E402

from schemas.graph import NO_VALUE, LabelSet, attribute_match, parse_facets  # noqa: E402
from schemas.storage import read_table  # noqa: E402
from schemas.tables import GOLD_NODES, RELEVANCE  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def parse_checks(text: str | None) -> dict[str, tuple[str, str, str]] | None:
    """key -> (wanted, offered, verdict) of an `ac` text; None when it does not parse."""
    entries = parse_facets(text) if text is not None else None
    if entries is None:
        return None
    checks = {}
    for key, entry in entries.items():
        values, colon, verdict = entry.rpartition(":")
        wanted, slash, offered = values.partition("/")
        if not (colon and slash):
            return None
        checks[key] = (wanted, offered, verdict)
    return checks


def implied_ma(checks: dict[str, tuple[str, str, str]], computed: bool) -> str:
    """`ma` by the graph's rule (`attribute_match`) from the checks' written verdicts (a yes counts as the product
    holding the wanted value), or from verdicts computed as wanted == offered."""
    wanted = {key: value for key, (value, _, _) in checks.items()}
    if computed:
        return attribute_match(wanted, {key: offered for key, (_, offered, _) in checks.items() if offered != NO_VALUE})
    return attribute_match(wanted, {key: value for key, (value, _, verdict) in checks.items() if verdict == "yes"})


def error_part(mine: dict[str, tuple[str, str, str]] | None, gold: dict[str, tuple[str, str, str]]) -> str:
    """The first part of a wrong `ac` that differs from gold: wanted, offered or verdict."""
    for index, part in enumerate(("wanted", "offered")):
        if mine is None or {k: v[index] for k, v in mine.items()} != {k: v[index] for k, v in gold.items()}:
            return part
    return "verdict"


def labeller_report(predictions, gold: dict[tuple[str, str], dict[str, str]], labels: LabelSet) -> dict:
    y_gold, y_written, y_computed = [], [], []
    counts = Counter()
    for row in predictions.to_pylist():
        nodes, truth = dict(row["node_decisions"]), gold[(row["query_id"], row["product_id"])]
        checks, gold_checks = parse_checks(nodes.get("ac")), parse_checks(truth["ac"])
        y_gold.append(truth["y"])
        y_written.append(row["label"])
        counts["pairs"] += 1
        counts["ma right"] += nodes.get("ma") == truth["ma"]
        if nodes.get("qs") is not None and nodes.get("ps") is not None and nodes["qs"] != nodes["ps"]:
            counts["subjects written differ"] += 1  # where `ms` must not be match (the graph's equal_parents rule)
            counts["ms match under different subjects"] += nodes.get("ms") == "match"
        if checks is None or nodes.get("ms") is None:
            counts["ac unparsed"] += 1  # the counterfactual keeps what it wrote
            counts["ma right, computed verdicts"] += nodes.get("ma") == truth["ma"]
            y_computed.append(row["label"])
            continue
        counts["ma follows own ac"] += nodes.get("ma") == implied_ma(checks, computed=False)
        if nodes["ac"] == truth["ac"]:
            counts["ac right"] += 1
            counts["ma right where ac right"] += nodes.get("ma") == truth["ma"]
        else:
            part = error_part(checks, gold_checks)
            counts[f"ac wrong: {part}"] += 1
            if part == "verdict":
                for wanted, offered, verdict in checks.values():
                    counts["verdict yes to different values"] += verdict == "yes" and wanted != offered
                    counts["verdict no to equal values"] += verdict == "no" and wanted == offered
        ma = implied_ma(checks, computed=True)
        counts["ma right, computed verdicts"] += ma == truth["ma"]
        y_computed.append(labels.label_from_nodes({"ms": nodes["ms"], "ma": ma}))
    n = counts["pairs"]
    return {
        "pairs": n, **{key: counts[key] for key in sorted(counts) if key != "pairs"},
        "macro_f1": round(f1_score(y_gold, y_written, average="macro"), 4),
        "macro_f1_computed_verdicts": round(f1_score(y_gold, y_computed, average="macro"), 4),
        "ma_accuracy": round(counts["ma right"] / n, 4),
        "ma_accuracy_computed_verdicts": round(counts["ma right, computed verdicts"] / n, 4),
        "ac_accuracy": round(counts["ac right"] / n, 4),
    }


def markdown(result: dict) -> str:
    lines = ["| labeller | macro-F1 | with computed verdicts | `ma` | with computed verdicts | `ac` | `ma` follows own `ac` "
             "| wrong `ac`: wanted / offered / verdict only | verdict-only errors, checks: yes to different / no to equal "
             "| `ms: match` under two different subjects it wrote |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["labellers"].items():
        lines.append(
            f"| {name} | {r['macro_f1']:.3f} | {r['macro_f1_computed_verdicts']:.3f} | {r['ma_accuracy']:.3f} "
            f"| {r['ma_accuracy_computed_verdicts']:.3f} | {r['ac_accuracy']:.3f} | {r['ma follows own ac']} of {r['pairs']} "
            f"| {r['ac wrong: wanted']} / {r['ac wrong: offered']} / {r['ac wrong: verdict']} "
            f"| {r['verdict yes to different values']} / {r['verdict no to equal values']} "
            f"| {r.get('ms match under different subjects', 0)} of {r.get('subjects written differ', 0)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, required=True, help="world folder holding gold_nodes")
    parser.add_argument("--predictions", type=Path, required=True, help="folder of one relevance table per labeller")
    parser.add_argument("--labellers", nargs="+", default=None, help="labeller folders to read (default: all, sorted)")
    parser.add_argument("--label-set", default="wands")
    parser.add_argument("--out", type=Path, default=RESULTS / "verdict_errors.json")
    args = parser.parse_args()
    names = args.labellers or sorted(path.name for path in args.predictions.iterdir() if path.is_dir())
    gold = {(row["query_id"], row["product_id"]): dict(row["nodes"]) for row in read_table(GOLD_NODES, args.world).to_pylist()}
    labels = LabelSet.load(args.label_set)
    result = {"world": str(args.world), "predictions": str(args.predictions),
              "labellers": {name: labeller_report(read_table(RELEVANCE, args.predictions / name), gold, labels) for name in names}}
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
