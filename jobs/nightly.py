"""`relevance nightly --date D`: prepare -> score (incremental) -> validate -> export, for one day.

Under one root `out`: `prepared/` (query_product_stats, candidate_pairs), `scores/` (the relevance
table every night adds a partition to, the scorer's cache) and `published/` (what search teams
import). Each step replaces exactly the day's partitions, so re-running a date gives the same
published partition (scoring reuses every row of the earlier run). Validation runs inside export,
before anything is published: when it fails the job stops with the failed expectations and exit
code 1, and the published folder is left as it was.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import ConfigError, config_date, help_field, load_config


@dataclass(frozen=True)
class NightlyConfig:
    date: str = help_field("The night's day (YYYY-MM-DD): its search logs are prepared and its pairs scored.")
    data: str = help_field("Data root with search_impressions, catalog and queries.", "world")
    out: str = help_field("Root of the night's outputs: prepared/, scores/, published/, nightly/.", "nightly_output")
    backend: str = help_field("Scoring backend: hf, vllm or student.", "hf")
    model: str = help_field("Policy folder (hf, vllm) or distilled student folder (student).", "")
    reasoning: str = help_field("Reasoning text kept: none, sample or all.", "sample")
    engine: str = help_field("Scoring engine: local or spark.", "local")
    score: dict[str, Any] = help_field("More `relevance score` settings (shard_size, batch_size, prompt_tokens, ...).", {})
    prepare: dict[str, Any] = help_field("More `relevance prepare` settings (synonyms, spark_master, ...).", {})

    def __post_init__(self) -> None:
        config_date(self.date)
        clashes = {"date", "pairs", "catalog", "out", "backend", "model", "reasoning", "engine"} & set(self.score)
        if clashes:
            raise ConfigError(f"score: {sorted(clashes)} are set by the nightly job itself; use its own keys")


def run(config: NightlyConfig) -> dict:
    """Run the night; returns (and writes as `nightly/ds=D.json`) each step's report and timing."""
    from jobs.export import ExportConfig
    from jobs.export import run as export
    from jobs.prepare import PrepareConfig
    from jobs.prepare import run as prepare
    from jobs.scoring.run import ScoreConfig
    from jobs.scoring.run import run as score

    out = Path(config.out)
    steps: dict[str, Any] = {}

    def timed(name: str, step, step_config) -> Any:
        print(f"\n== nightly {config.date}: {name}", flush=True)
        started = time.perf_counter()
        result = step(step_config)
        steps[name] = {"seconds": round(time.perf_counter() - started, 1), "report": result}
        return result

    timed("prepare", prepare, load_config(PrepareConfig, values={**config.prepare, "date": config.date, "data": config.data,
                                                                  "out": str(out / "prepared")}))
    timed("score", score, load_config(ScoreConfig, values={
        **config.score, "date": config.date, "pairs": str(out / "prepared"), "catalog": config.data, "out": str(out / "scores"),
        "backend": config.backend, "model": config.model, "reasoning": config.reasoning, "engine": config.engine}))
    timed("validate and export", export, ExportConfig(relevance=str(out / "scores"), date=config.date, out=str(out / "published"),
                                                      queries=config.data))
    report = {"date": config.date, "steps": steps}
    target = out / "nightly" / f"ds={config.date}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, default=str))
    print(f"\n== nightly {config.date} done: " + ", ".join(f"{name} {step['seconds']} s" for name, step in steps.items())
          + f"; report {target}", flush=True)
    return report
