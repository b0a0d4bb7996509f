"""`relevance nightly --date D`: prepare -> score (incremental) -> validate -> export, for one day.

Under one root `out`: `prepared/` (query_product_stats, candidate_pairs), `scores/` (the relevance
table every night adds a partition to, the scorer's cache) and `published/` (what search teams
import). Each step replaces exactly the day's partitions, so re-running a date gives the same
published partition (scoring reuses every row of the earlier run). Validation runs inside export,
before anything is published: when it fails the job stops with the failed expectations and exit
code 1, and the published folder is left as it was.

The `prepare` and `score` sections are the steps' own config fields less the ones the night sets
(`--set score.shard_size=500`, `--set prepare.run_suite=false`); both step configs are built, and so
checked, when the nightly config is.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.export import ExportConfig
from jobs.export import run as export
from jobs.prepare import PrepareConfig
from jobs.prepare import run as prepare
from jobs.scoring.config import ScoreConfig
from jobs.scoring.run import run as score
from schemas.config import config_date, help_field


def settings_section(name: str, config_class: type, set_by_nightly: set[str]) -> type:
    """A frozen dataclass of `config_class`'s fields (types, defaults and help as declared there) less the
    ones the nightly job sets itself: the settings of that step a night may change."""
    hints = typing.get_type_hints(config_class)
    own = [(f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
           for f in dataclasses.fields(config_class) if f.init and f.name not in set_by_nightly]
    doc = f"`{config_class.__name__}` less {sorted(set_by_nightly)}, which the nightly job sets."
    return dataclasses.make_dataclass(name, own, frozen=True, kw_only=True, namespace={"__module__": __name__, "__doc__": doc})


PrepareSettings = settings_section("PrepareSettings", PrepareConfig, {"date", "data", "out"})
ScoreSettings = settings_section("ScoreSettings", ScoreConfig, {"date", "pairs", "catalog", "out", "backend", "model", "reasoning", "engine"})


def section_values(settings: Any) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


@dataclass(frozen=True)
class NightlyConfig:
    date: str = help_field("The night's day (YYYY-MM-DD): its search logs are prepared and its pairs scored.")
    data: str = help_field("Data root with search_impressions, catalog and queries.", "world")
    out: str = help_field("Root of the night's outputs: prepared/, scores/, published/, nightly/.", "nightly_output")
    backend: str = help_field("Scoring backend: hf, vllm or student.", "hf")
    model: str = help_field("Policy folder (hf, vllm) or distilled student folder (student).", "")
    reasoning: str = help_field("Reasoning text kept: none, sample or all.", "sample")
    engine: str = help_field("Scoring engine: local or spark.", "local")
    score: ScoreSettings = help_field("More `relevance score` settings (shard_size, batch_size, prompt_tokens, ...).",
                                      default_factory=ScoreSettings)
    prepare: PrepareSettings = help_field("More `relevance prepare` settings (synonyms, spark_master, ...).",
                                          default_factory=PrepareSettings)

    def __post_init__(self) -> None:
        config_date(self.date)
        # the steps' own checks (the model folder and its policy format too) before the night starts
        self.prepare_config()
        self.score_config()

    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(date=self.date, data=self.data, out=str(Path(self.out) / "prepared"), **section_values(self.prepare))

    def score_config(self) -> ScoreConfig:
        out = Path(self.out)
        return ScoreConfig(date=self.date, pairs=str(out / "prepared"), catalog=self.data, out=str(out / "scores"), backend=self.backend,
                           model=self.model, reasoning=self.reasoning, engine=self.engine, **section_values(self.score))


def run(config: NightlyConfig) -> dict:
    """Run the night; returns (and writes as `nightly/ds=D.json`) each step's report and timing."""
    out = Path(config.out)
    steps: dict[str, Any] = {}

    def timed(name: str, step, step_config) -> Any:
        print(f"\n== nightly {config.date}: {name}", flush=True)
        started = time.perf_counter()
        result = step(step_config)
        steps[name] = {"seconds": round(time.perf_counter() - started, 1), "report": result}
        return result

    timed("prepare", prepare, config.prepare_config())
    timed("score", score, config.score_config())
    timed("validate and export", export, ExportConfig(relevance=str(out / "scores"), date=config.date, out=str(out / "published"),
                                                      queries=config.data))
    report = {"date": config.date, "steps": steps}
    target = out / "nightly" / f"ds={config.date}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, default=str))
    print(f"\n== nightly {config.date} done: " + ", ".join(f"{name} {step['seconds']} s" for name, step in steps.items())
          + f"; report {target}", flush=True)
    return report
