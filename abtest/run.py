"""`relevance abtest`: the typed config and `run(config)` that the CLI wraps."""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from abtest.analysis import Experiment, ExperimentResult
from abtest.metrics import DEFAULT_METRICS, load_metrics
from abtest.report import write_reports
from abtest.stats import correction_names
from schemas.config import ConfigError, help_field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AbtestConfig:
    """Settings of one A/B analysis (YAML, `--set key=value` or command-line options)."""

    events: Path = help_field("experiment_events: a data root, the table folder, a parquet file or a DuckDB database.")
    assignment: Path = help_field("experiment_assignment: a data root, the table folder, a parquet file or a DuckDB database.")
    experiment_start: str = help_field("First day of the experiment (YYYY-MM-DD); earlier events are the CUPED pre-period.")
    control: str = help_field("Name of the control variant.", "control")
    experiment_id: str | None = help_field("Experiment to analyse when the assignment holds several.", None)
    metrics: Path | None = help_field("YAML file of metrics (`metrics: [...]`, `include_defaults: true`); default: the built-in six.", None)
    alpha: float = help_field("Significance level (two-sided tests; one-sided for guardrails).", 0.05)
    correction: str = help_field(f"Multiple-comparison correction across metrics x variants: {correction_names()}.", "holm")
    power: float = help_field("Power for the minimum detectable effect.", 0.8)
    winsorize: float | None = help_field("Upper quantile at which per-user values are capped; null for none.", 0.999)
    expected_split: dict[str, float] | None = help_field("Planned share per variant for the SRM test; null for an equal split.", None)
    sequential_tau: float = help_field("mSPRT mixing scale, relative to the control mean (always-valid p-values).", 0.05)
    out: Path = help_field("Folder for report.md, report.html, result.json (and quarantine.parquet).", Path("abtest_report"))
    threads: int | None = help_field("DuckDB threads; null for all cores.", None)

    def __post_init__(self) -> None:
        try:
            dt.date.fromisoformat(str(self.experiment_start))
        except ValueError:
            raise ConfigError(f"experiment_start {self.experiment_start!r} must be a date like 2024-03-01") from None
        if self.correction not in correction_names():
            raise ConfigError(f"correction {self.correction!r} unknown; use one of {correction_names()}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads {self.threads} must be >= 1 (or null for all cores)")

    def experiment(self) -> Experiment:
        return Experiment(
            experiment_start=dt.date.fromisoformat(str(self.experiment_start)),
            metrics=load_metrics(self.metrics) if self.metrics else DEFAULT_METRICS,
            control=self.control, alpha=self.alpha, correction=self.correction, power=self.power,
            winsorize=self.winsorize, expected_split=self.expected_split, sequential_tau=self.sequential_tau,
            experiment_id=self.experiment_id,
        )


def config_from_manifest(manifest: str | Path, out: str | Path, **overrides) -> AbtestConfig:
    """The config for the experiment a synthetic world describes in its `world.json`
    (`experiment`: experiment_id, control, variants, start_date, treatment_share); the tables are
    read from the manifest's folder."""
    manifest = Path(manifest)
    experiment = json.loads(manifest.read_text())["experiment"]
    treatments = [v for v in experiment["variants"] if v != experiment["control"]]
    share = float(experiment["treatment_share"])
    split = {experiment["control"]: 1 - share, **{v: share / len(treatments) for v in treatments}}
    values = dict(events=manifest.parent, assignment=manifest.parent, experiment_start=experiment["start_date"],
                  experiment_id=experiment["experiment_id"], control=experiment["control"], expected_split=split,
                  out=Path(out))
    return AbtestConfig(**{**values, **overrides})


def run(config: AbtestConfig) -> ExperimentResult:
    """Analyse, then write report.md, report.html, result.json (and quarantined rows) into `out`."""
    experiment = config.experiment()
    result = experiment.analyze(config.events, config.assignment, threads=config.threads)
    paths = write_reports(result, config.out)
    if result.quarantine.num_rows:
        pq.write_table(result.quarantine, Path(config.out) / "quarantine.parquet")
    srm = "SRM ALARM" if result.srm.alarm else "sample ratio ok"
    log.log(logging.WARNING if result.srm.alarm else logging.INFO, "%s: %s (p=%.3g)", result.experiment_id, srm, result.srm.pvalue)
    for decision in result.decisions():
        log.info("verdict for %s: %s (%s)", decision.variant, decision.verdict.upper(), "; ".join(decision.reasons))
    for line in result.sentences():
        log.info(line)
    log.info("reports: %s", ", ".join(str(p) for p in paths.values()))
    return result
