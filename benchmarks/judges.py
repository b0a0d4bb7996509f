"""Would these labels pick the same ranker as the human raters, and does the offline gain predict the online one?

    .venv/bin/python benchmarks/judges.py --demo-output demo_output [--source multi_judge=judges/relevance]
    .venv/bin/python benchmarks/judges.py --preset tests            # no trained models: human and gold only

Runs `relevance judge-report` (jobs/judge_report.py) on a world and its labellers: human labels, gold, and with
`--demo-output` a finished demo's trained policies, student, their majority vote and nightly scores, plus any
`--source NAME=PATH` relevance table (e.g. the multi-judge table of `relevance judges combine`). The experiments are the
world's own plus a series generated here with `--series` treatment noises (the world folder is only read). Writes the
side-by-side summary (kappa vs human and gold, ladder Kendall tau overall and among gold's better half, neighbours told
apart, offline-online correlation and sign agreement) with the run's seconds and load average to
benchmarks/results/judges.json; the full report (HTML, JSON) stays in the work folder.
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

from jobs.demo import NIGHTLY_SOURCE  # noqa: E402
from jobs.judge_report import JudgeReportConfig, run, sources_frame  # noqa: E402
from jobs.world.config import WorldConfig  # noqa: E402
from jobs.world.generate import generate_experiment_series, generate_world, write_experiment_series, write_world  # noqa: E402
from jobs.world.ladder import LadderConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "judges.json"
DEMO_SOURCES = {"sft_policy": "models/sft_policy", "graph_grpo_policy": "models/graph_grpo_policy",
                "distilled_student": "models/distilled_student", "multi_judge_majority": "multi_judge/relevance",
                NIGHTLY_SOURCE: "nightly/scores"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-output", type=Path, help="A finished `relevance demo` folder (world, models, nightly).")
    parser.add_argument("--preset", default="tests", help="Without --demo-output: the world preset generated here.")
    parser.add_argument("--source", action="append", default=[], help="NAME=PATH of a further relevance table; repeatable.")
    parser.add_argument("--series", default="0.8,0.6,0.45,0.3,0.1", help="Treatment ranker noises of the generated experiments.")
    parser.add_argument("--ladder-queries", type=int, default=0, help="Queries of the ladder's sample (0: every common one).")
    parser.add_argument("--n-bootstrap", type=int, default=500)
    parser.add_argument("--work", type=Path, help="Work folder (default: a temporary one, kept).")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="judges_"))
    started = time.perf_counter()
    if args.demo_output:
        world = args.demo_output / "world"
        world_config = WorldConfig.preset("demo", **json.loads((world / "world.json").read_text())["config"])
        sources = {name: str(args.demo_output / path) for name, path in DEMO_SOURCES.items() if (args.demo_output / path).is_dir()}
    else:
        world, world_config = work / "world", WorldConfig.preset(args.preset)
        write_world(generate_world(world_config), world)
        sources = {}
    sources.update(item.split("=", 1) for item in args.source)
    noises = tuple(float(value) for value in args.series.split(","))
    manifests = write_experiment_series(generate_experiment_series(world_config, noises), work / "experiments")
    report = run(JudgeReportConfig(world=str(world), sources=sources, experiments=tuple(str(path.parent) for path in manifests),
                                   ladder=LadderConfig(n_queries=args.ladder_queries), n_bootstrap=args.n_bootstrap,
                                   out=str(work / "judge_report")))
    seconds = time.perf_counter() - started
    summary = sources_frame(report)
    print(summary.to_string(index=False))
    result = {
        "world": str(world), "sources": sources, "series_treatment_noises": list(noises),
        "summary": summary.to_dict(orient="records"),
        "ladder": {key: report["ladder"][key] for key in ("queries", "rankers", "gold_order", "gold_recovers_construction_order")}
        | {"sources": {name: {key: value for key, value in entry.items() if key != "order"} for name, entry in report["ladder"]["sources"].items()}},
        "agreement": report["agreement"],
        "offline_online": {"across": report["offline_online"]["across"],
                           "experiments": [{"experiment_id": e["experiment_id"], "treatment_noise": e["treatment_noise"],
                                            "online": {m: {k: e["online"][m][k] for k in ("effect", "effect_ci_low", "effect_ci_high",
                                                                                            "rel_effect", "significant")}
                                                       for m in e["online"]},
                                            "offline_ndcg_difference": e["offline_ndcg_difference"]}
                                           for e in report["offline_online"]["experiments"]]},
        "report": str(work / "judge_report" / "judge_report.html"),
        "seconds": round(seconds, 1),
        "load_average": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"{seconds:.0f} s; results: {args.results}; report: {result['report']}")


if __name__ == "__main__":
    main()
