"""`relevance nightly --date D`: prepare -> score (incremental) -> validate -> export, for one day.

Under one root `out`: `prepared/` (query_product_stats, candidate_pairs), `scores/` (the relevance
table every night adds a partition to, the scorer's cache) and `published/` (what search teams
import). Each step replaces exactly the day's partitions, so re-running a date gives the same
published partition (scoring reuses every row of the earlier run). Validation runs inside export,
before anything is published: when it fails the job stops with the failed expectations and exit
code 1, and the published folder is left as it was.

Under `reports/ds=D/`: `nightly.json` (each step's report and timing) and `index.html`, the night's
reports with a one-line verdict each (prepare, scoring, validation, churn, the published partition).

The `prepare`, `score` and `export` sections are the steps' own config fields less the ones the night
sets (`--set score.shard_size=500`, `--set prepare.run_suite=false`); every step's config is built,
and so checked, when the nightly config is: a wrong key or value in any section fails the night
before its first step. Before any Spark work the model folder is checked (files present,
weights complete) and the inputs looked for, so a bad folder or a missing table fails the night in a
second. The night holds the lock of `out` and the date (`jobs.lock`) across its steps; a second
night of that root and date fails at once naming the holder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.export import ExportConfig
from jobs.export import run as export
from jobs.lock import date_lock
from jobs.prepare import PrepareConfig
from jobs.prepare import run as prepare
from jobs.publishing.churn import CHURN_JSON, CHURN_MARKDOWN, CHURN_PAGE, CHURN_PLOT, churn_title
from jobs.publishing.publish import CSV_FILE, DUCKDB_FILE, MANIFEST_FILE, PARQUET_FILE
from jobs.publishing.validation import VALIDATION_PAGE
from jobs.report_index import (
    Report,
    churn_verdict,
    expectations_verdict,
    prepare_verdict,
    published_verdict,
    score_verdict,
    write_index,
)
from jobs.scoring.config import ENGINES, ScoreConfig
from jobs.scoring.run import WORK_FOLDER as SCORING_FOLDER
from jobs.scoring.run import run as score
from jobs.scoring.spec import BACKENDS, check_model_folder
from schemas.config import config_date, help_field
from schemas.storage import partitions, table_path
from schemas.tables import CATALOG, QUERIES, RELEVANCE, SEARCH_IMPRESSIONS
from training.predict import REASONING_MODES

log = logging.getLogger(__name__)

REPORTS_FOLDER = "reports"
NIGHT_REPORT = "nightly.json"


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
ExportSettings = settings_section("ExportSettings", ExportConfig, {"relevance", "date", "out", "queries", "engine"})


def section_values(settings: Any) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


@dataclass(frozen=True)
class NightlyConfig:
    date: str = help_field("The night's day (YYYY-MM-DD): its search logs are prepared and its pairs scored.")
    model: str = help_field("Policy folder (hf, vllm) or distilled student folder (student).")
    data: str = help_field("Data root with search_impressions, catalog and queries.", "world")
    out: str = help_field("Root of the night's outputs: prepared/, scores/, published/, reports/.", "nightly_output")
    backend: str = help_field("Scoring backend: hf, vllm or student.", "hf", choices=BACKENDS)
    reasoning: str = help_field("Reasoning text kept: none, sample or all.", "sample", choices=REASONING_MODES)
    engine: str = help_field("Engine of scoring and export: local, or spark (the driver holds counts, never rows).", "local", choices=ENGINES)
    score: ScoreSettings = help_field("More `relevance score` settings (shard_size, batch_size, prompt_tokens, ...).",
                                      default_factory=ScoreSettings)
    prepare: PrepareSettings = help_field("More `relevance prepare` settings (synonyms, spark_master, ...).",
                                          default_factory=PrepareSettings)
    export: ExportSettings = help_field("More `relevance export` settings (label_set, max_prob_sum_error).", default_factory=ExportSettings)

    def __post_init__(self) -> None:
        config_date(self.date)
        # every step's own checks before the night starts; score's last, as it reads the model folder
        self.prepare_config()
        self.export_config()
        self.score_config()

    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(date=self.date, data=self.data, out=str(Path(self.out) / "prepared"), **section_values(self.prepare))

    def score_config(self) -> ScoreConfig:
        out = Path(self.out)
        return ScoreConfig(date=self.date, pairs=str(out / "prepared"), catalog=self.data, out=str(out / "scores"), backend=self.backend,
                           model=self.model, reasoning=self.reasoning, engine=self.engine, **section_values(self.score))

    def export_config(self) -> ExportConfig:
        out = Path(self.out)
        return ExportConfig(relevance=str(out / "scores"), date=self.date, out=str(out / "published"), queries=self.data,
                            engine=self.engine, **section_values(self.export))


def check_inputs(data: str, day) -> None:
    """The tables the night reads, present under `data` (the day's search impressions included)."""
    missing = [str(table_path(data, table)) for table in (CATALOG, QUERIES) if not table_path(data, table).is_dir()]
    if day not in partitions(SEARCH_IMPRESSIONS, data):
        missing.append(str(table_path(data, SEARCH_IMPRESSIONS) / f"ds={day.isoformat()}"))
    if missing:
        raise FileNotFoundError(f"nightly {day}: input not found: {', '.join(missing)}")


def run(config: NightlyConfig) -> dict:
    """Run the night under the lock of `out` and the date; returns (and writes as `reports/ds=D/nightly.json`,
    next to the night's index.html) each step's report and timing."""
    score_config = config.score_config()
    check_model_folder(score_config.spec())
    check_inputs(config.data, score_config.day)
    with date_lock(config.out, score_config.day, "nightly"):
        return run_steps(config, score_config)


def run_steps(config: NightlyConfig, score_config: ScoreConfig) -> dict:
    out = Path(config.out)
    steps: dict[str, Any] = {}

    def timed(name: str, step, step_config) -> Any:
        log.info("== nightly %s: %s", config.date, name)
        started = time.perf_counter()
        result = step(step_config)
        steps[name] = {"seconds": round(time.perf_counter() - started, 1), "report": result}
        return result

    timed("prepare", prepare, config.prepare_config())
    timed("score", score, score_config)
    timed("validate and export", export, config.export_config())
    report = {"date": config.date, "steps": steps}
    target = night_folder(out, config.date) / NIGHT_REPORT
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, default=str))
    index = write_index(target.parent, f"Nightly ds={config.date}", night_reports(out, config.date))
    log.info("== nightly %s done: %s; report %s, reports linked from %s", config.date,
             ", ".join(f"{name} {step['seconds']} s" for name, step in steps.items()), target, index)
    return report


def night_folder(out: str | Path, date: str) -> Path:
    return Path(out) / REPORTS_FOLDER / f"ds={date}"


def night_reports(out: str | Path, date: str) -> list[Report]:
    """The reports of the night of `date` under `out` (none when that night has not finished)."""
    out = Path(out)
    night_file = night_folder(out, date) / NIGHT_REPORT
    if not night_file.is_file():
        return []
    steps = json.loads(night_file.read_text())["steps"]
    manifest = steps["validate and export"]["report"]
    published = out / "published" / RELEVANCE.name / f"ds={date}"
    churn = json.loads((published / CHURN_JSON).read_text())
    return [
        Report("The night's steps", ", ".join(f"{name} {step['seconds']} s" for name, step in steps.items()), (night_file,)),
        Report("Prepare: search impressions to candidate pairs", prepare_verdict(steps["prepare"]["report"]),
               (out / "prepared" / "_prepare" / f"ds={date}" / "prepare.json",)),
        Report("Scoring", score_verdict(steps["score"]["report"]), (out / "scores" / SCORING_FOLDER / f"ds={date}" / "score.json",)),
        Report("Validation before publishing", expectations_verdict(manifest["validation"]["met"], manifest["validation"]["expectations"]),
               (published / VALIDATION_PAGE,)),
        Report(churn_title(churn), churn_verdict(churn), tuple(published / name for name in (CHURN_PAGE, CHURN_MARKDOWN, CHURN_PLOT, CHURN_JSON))),
        Report("Published partition", published_verdict(manifest),  # CSV is opt-in for a night on Spark
               tuple(published / name for name in (MANIFEST_FILE, PARQUET_FILE, CSV_FILE, DUCKDB_FILE) if (published / name).exists())),
    ]
