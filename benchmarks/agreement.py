"""Agreement of a finished demo's labellers with human judgments, beside the judges' own agreement.

    .venv/bin/python benchmarks/agreement.py --demo demo_output [--extra-raters 2] [--extra-rater-share 0.5] [--n-bootstrap 1000]

The demo's world has one judgment per pair. This regenerates the same world (the demo's world config
and seed) with `extra_raters` further synthetic raters on a share of the judged pairs, which leaves
every other table and the first rater's judgments as they were (checked here), so the demo's scored
test pairs now have several human judgments where the extra raters judged them. Then, on those pairs:
1. `relevance evaluate` of the demo's policies (SFT, Graph-GRPO, the distilled student) against the
   human judgments (majority vote per pair): kappa and alpha with the judges' ceiling;
2. the method's own check: the first rater, as a labeller, against the other raters only. A labeller
   exactly as noisy as the judges should sit at the ceiling (a gap whose interval holds 0);
3. `relevance judges combine` of the three policies (majority vote) against the noise-free gold
   labels (the world's gold nodes): does the combination beat each policy?
Writes the three reports under `--work` and the headline numbers to benchmarks/results/agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import judges  # noqa: E402
from evaluation.command import EvaluateConfig  # noqa: E402
from evaluation.command import run as evaluate  # noqa: E402
from jobs.world.config import WorldConfig  # noqa: E402
from jobs.world.generate import generate_world, write_world  # noqa: E402
from jobs.world.judgments import RATER  # noqa: E402
from schemas.storage import read_table, write_table  # noqa: E402
from schemas.tables import GOLD_NODES, JUDGMENTS, RELEVANCE  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "agreement.json"
POLICIES = ("sft_policy", "graph_grpo_policy", "distilled_student")
HEADLINE = ("kappa", "kappa_quadratic", "alpha_ordinal")


def on_pairs(table: pa.Table, pairs: set[tuple[str, str]]) -> pa.Table:
    keys = zip(table["query_id"].to_pylist(), table["product_id"].to_pylist())
    return table.filter(pa.array([key in pairs for key in keys]))


def interval(value) -> list[float]:
    return [round(float(value.estimate), 4), round(float(value.low), 4), round(float(value.high), 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("demo_output"))
    parser.add_argument("--extra-raters", type=int, default=2)
    parser.add_argument("--extra-rater-share", type=float, default=0.5)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/agreement"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    demo_world = args.demo / "world"
    manifest = json.loads((demo_world / "world.json").read_text())
    config = WorldConfig(**{**manifest["config"], "extra_raters": args.extra_raters, "extra_rater_share": args.extra_rater_share})
    world = generate_world(config)
    original = read_table(JUDGMENTS, demo_world)
    if not world.judgments.slice(0, original.num_rows).equals(original.select(world.judgments.column_names)):
        raise SystemExit(f"{demo_world}: regenerating its world did not give its judgments back; is it a synthetic world of this version?")
    root = args.work / "world"
    write_world(world, root)

    scored = read_table(RELEVANCE, args.demo / "models" / POLICIES[0])
    pairs = set(zip(scored["query_id"].to_pylist(), scored["product_id"].to_pylist()))
    gold = args.work / "gold"
    write_table(JUDGMENTS, on_pairs(world.judgments, pairs), gold)
    write_table(GOLD_NODES, on_pairs(world.gold_nodes, pairs), gold)
    models = {name: str(args.demo / "models" / name) for name in POLICIES}
    settings = dict(gold=str(gold), queries=str(root), catalog=str(root), label_set=manifest["label_set"], n_bootstrap=args.n_bootstrap)

    policies = evaluate(EvaluateConfig(predictions=models, out=str(args.work / "policies"), **settings))
    check = evaluate(EvaluateConfig(
        predictions={"first_rater": str(args.demo / "models" / "synthetic_rater")},
        annotators=tuple(f"{RATER}_{i}" for i in range(2, args.extra_raters + 2)), out=str(args.work / "check"), **settings,
    ))
    combined = judges.run(judges.CombineConfig(
        tables=models, method="majority", gold_nodes=str(gold), label_set=manifest["label_set"], n_bootstrap=args.n_bootstrap,
        out=str(args.work / "combined"),
    ))

    def against_judges(model) -> dict:
        metrics = model.metrics
        return {"pairs": model.n_several_judged, "queries": model.n_several_judged_queries, **{
            name: {"vs_a_judge": interval(metrics[f"vs_humans_{name}"]), "judges": interval(metrics[f"humans_{name}"]),
                   "gap": interval(metrics[f"vs_humans_{name}_gap"])} for name in HEADLINE}}

    result = {
        "demo": str(args.demo),
        "world": {"preset_config_seed": manifest["seed"], "extra_raters": args.extra_raters, "extra_rater_share": args.extra_rater_share},
        "pairs": policies.gold.n_pairs,
        "pairs_with_several_judgments": policies.gold.n_pairs_with_several_judgments,
        "n_bootstrap": args.n_bootstrap,
        "policies_vs_human_gold": {m.name: {name: interval(m.metrics[name]) for name in HEADLINE} for m in policies.models},
        "judges_ceiling": {name: interval(policies.humans[f"humans_{name}"]) for name in HEADLINE},
        "policies_vs_one_judge": {m.name: against_judges(m) for m in policies.models},
        "check_first_rater_vs_other_raters": against_judges(check.models[0]),
        "combined_majority_vs_gold_nodes": {
            name: {"kappa": interval_at(combined.agreement["gold_kappa"], j)} for j, name in enumerate((*POLICIES, "combination"))
        },
        "combined_pairwise_kappa": {
            POLICIES[j]: {POLICIES[k]: interval_at(combined.agreement["pairwise_kappa"], (j, k)) for k in range(len(POLICIES)) if k != j}
            for j in range(len(POLICIES))
        },
        "load_average": os.getloadavg(),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def interval_at(value, index: int | tuple[int, int]) -> list[float]:
    return [round(float(value.estimate[index]), 4), round(float(value.low[index]), 4), round(float(value.high[index]), 4)]


if __name__ == "__main__":
    main()
