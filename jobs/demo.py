"""`relevance demo`: the whole pipeline on the embedded default data, stage by stage.

Each stage is one job's `run(config)` with a config built here, timed, and listed at the end with
where its outputs are. Every stage the project adds joins this list.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from schemas.config import help_field

EMBEDDED_WANDS = Path(__file__).parent / "ingest" / "samples" / "wands"


@dataclass(frozen=True)
class DemoConfig:
    out: str = help_field("Folder for every output of the demo.", "demo_output")
    preset: str = help_field("Size preset of the synthetic world: tests, demo or benchmark.", "demo")
    seed: int = help_field("Random seed of the world.", 0)
    engine: str = help_field("Validation engine: spark (the production path) or pandas.", "spark")
    wands: str = help_field("WANDS folder ingested as the public-format example.", str(EMBEDDED_WANDS))


@dataclass(frozen=True)
class StageResult:
    name: str
    seconds: float
    outputs: dict[str, str]


def _generate(config: DemoConfig, out: Path) -> dict[str, str]:
    from jobs.world.run import GenerateConfig, run

    world = out / "world"
    run(GenerateConfig(out=world, preset=config.preset, seed=config.seed))
    return {"world tables": str(world), "world manifest": str(world / "world.json")}


def _validate(config: DemoConfig, out: Path) -> dict[str, str]:
    from jobs.validate import ValidateConfig, run

    target = out / "validation"
    run(ValidateConfig(data=str(out / "world"), out=str(target), engine=config.engine))
    return {"validation summary": str(target / "validation.json"), "quarantine": str(target / "quarantine")}


def _prepare(config: DemoConfig, out: Path) -> dict[str, str]:
    """The nightly data step on the world's last day of logs."""
    from jobs.prepare import PrepareConfig, run
    from schemas.storage import partitions
    from schemas.tables import SEARCH_IMPRESSIONS

    last_day = partitions(SEARCH_IMPRESSIONS, out / "world")[-1]
    target = out / "prepared"
    run(PrepareConfig(date=last_day.isoformat(), data=str(out / "world"), out=str(target)))
    report = target / "_prepare" / f"ds={last_day.isoformat()}"
    return {"query_product_stats, candidate_pairs": str(target), "prepare report": str(report / "prepare.json")}


def _datasets(config: DemoConfig, out: Path) -> dict[str, str]:
    from jobs.datasets import DatasetsConfig, run

    target = out / "datasets"
    run(DatasetsConfig(data=str(out / "world"), out=str(target), weak_from=str(out / "prepared")))
    return {"training_examples": str(target / "training_examples"), "datasets report": str(target / "_datasets" / "datasets.json")}


def _ingest_wands(config: DemoConfig, out: Path) -> dict[str, str]:
    from jobs.ingest.run import IngestConfig, run

    target = out / "wands"
    run(IngestConfig(format="wands", source=Path(config.wands), out=target))
    return {"WANDS tables": str(target)}


def _evaluate(config: DemoConfig, out: Path) -> dict[str, str]:
    """Until trained models join, the one labeller in the world is its human-like rater: score it
    against the noise-free gold (one-hot probabilities, said so in the report)."""
    from evaluation.command import EvaluateConfig, run
    from evaluation.inputs import predictions_from_judgments
    from schemas.graph import LabelSet
    from schemas.storage import read_table, write_table
    from schemas.tables import JUDGMENTS, QUERIES, RELEVANCE

    world = out / "world"
    manifest = json.loads((world / "world.json").read_text())
    label_set = LabelSet.load(manifest["label_set"])
    rater = predictions_from_judgments(
        read_table(JUDGMENTS, world), label_set, model_name="synthetic_rater", queries=read_table(QUERIES, world)
    )
    models = out / "models" / "synthetic_rater"
    write_table(RELEVANCE, rater, models)
    report = out / "evaluation"
    run(
        EvaluateConfig(
            predictions={"synthetic_rater": str(models)},
            gold_source="nodes",
            gold_nodes=str(world),
            queries=str(world),
            catalog=str(world),
            label_set=manifest["label_set"],
            out=str(report),
        )
    )
    return {"evaluation report": str(report / "report.html"), "metrics": str(report / "metrics.json")}


def _abtest(config: DemoConfig, out: Path) -> dict[str, str]:
    from abtest.run import config_from_manifest, run

    report = out / "abtest"
    run(config_from_manifest(out / "world" / "world.json", out=report))
    return {"A/B report": str(report / "report.html"), "A/B result": str(report / "result.json")}


STAGES: list[tuple[str, Callable[[DemoConfig, Path], dict[str, str]]]] = [
    ("generate the synthetic world", _generate),
    ("validate it (great-expectations + quarantine)", _validate),
    ("prepare the last day of search logs (Spark)", _prepare),
    ("build train/validation/test datasets with CoT targets (Spark)", _datasets),
    ("ingest the real WANDS query file", _ingest_wands),
    ("evaluate every labeller against the gold labels", _evaluate),
    ("analyse the A/B experiment", _abtest),
]


def run(config: DemoConfig) -> list[StageResult]:
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, (name, stage) in enumerate(STAGES, start=1):
        print(f"\n== [{index}/{len(STAGES)}] {name}", flush=True)
        started = time.perf_counter()
        outputs = stage(config, out)
        results.append(StageResult(name, time.perf_counter() - started, outputs))
    summary = [{"stage": r.name, "seconds": round(r.seconds, 1), "outputs": r.outputs} for r in results]
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n== demo finished; outputs:")
    for result in results:
        print(f"  {result.name} ({result.seconds:.1f} s)")
        for what, where in result.outputs.items():
            print(f"    {what}: {where}")
    print(f"  summary: {out / 'demo_summary.json'}")
    return results
