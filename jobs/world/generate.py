"""The synthetic e-commerce world: the embedded default data of the project.

`generate_world(config)` is pure (no I/O): vocabulary -> catalog -> queries -> candidate pools ->
gold nodes and judgments -> search logs with an A/B experiment, returned as a `World` of Arrow tables
conformed to their schemas plus a manifest. `write_world(world, out)` writes them with
`schemas.storage.write_table` (logs partitioned by ds) and `world.json` last.

`generate_experiment_series(config, treatment_noises)` simulates further A/B experiments on the same
catalog, queries and judgments (one per treatment ranker noise, each from its own generator), and
`write_experiment_series` writes each experiment's logs and `experiment.json` in a folder of its own.

Each stage draws from its own generator seeded with (seed, stage number), so changing the log size
does not change the catalog, and the same config gives byte-identical tables. How each table is
made (and the gold-label rule) is documented in the stage modules: catalog, queries, judgments, logs.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.world.catalog import Catalog, make_catalog
from jobs.world.config import VARIANTS, WorldConfig
from jobs.world.judgments import candidate_pools, check_graph, gold_and_judgments, judged_pairs, pair_nodes
from jobs.world.logs import simulate_logs
from jobs.world.queries import Queries, make_queries
from jobs.world.vocabulary import load_vocabulary
from schemas.config import config_to_dict
from schemas.graph import LabelSet, ReasoningGraph
from schemas.storage import write_table
from schemas.table import Table
from schemas.tables import (
    CATALOG,
    EXPERIMENT_ASSIGNMENT,
    EXPERIMENT_EVENTS,
    GOLD_NODES,
    JUDGMENTS,
    QUERIES,
    SEARCH_IMPRESSIONS,
)

MANIFEST = "world.json"
EXPERIMENT_MANIFEST = "experiment.json"  # one experiment of a series: its logs and this manifest
STAGES = ("vocabulary", "catalog", "queries", "judgments", "logs")
# World field -> its table declaration (the field names are the table names).
TABLES: dict[str, Table] = {
    table.name: table
    for table in (CATALOG, QUERIES, JUDGMENTS, GOLD_NODES, SEARCH_IMPRESSIONS, EXPERIMENT_ASSIGNMENT, EXPERIMENT_EVENTS)
}


@dataclass(frozen=True)
class World:
    catalog: pa.Table
    queries: pa.Table
    judgments: pa.Table
    gold_nodes: pa.Table
    search_impressions: pa.Table
    experiment_assignment: pa.Table
    experiment_events: pa.Table
    manifest: dict
    timings: dict[str, float] = field(default_factory=dict, compare=False)  # stage -> seconds

    def tables(self) -> dict[str, pa.Table]:
        return {name: getattr(self, name) for name in TABLES}


def _stage_rng(seed: int, stage: str) -> np.random.Generator:
    return np.random.default_rng([seed, STAGES.index(stage)])


@dataclass(frozen=True)
class _Population:
    """What the logs are simulated on: the catalog, the queries and each query's candidate pool with true gains."""

    catalog: Catalog
    queries: Queries
    pools: np.ndarray
    pool_gain: np.ndarray


def _timed(progress: Callable[[str], None] | None, timings: dict[str, float]):
    @contextmanager
    def stage(name: str) -> Iterator[None]:
        if progress is not None:
            progress(name)
        started = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - started

    return stage


def _build(config: WorldConfig, stage) -> tuple[_Population, dict[str, pa.Table], tuple[str, str, str, str]]:
    """Every stage before the logs: the population, the catalog/queries/judgments/gold tables and the names
    (vocabulary, its sha256, label set, graph) the manifest records."""
    with stage("vocabulary"):
        vocabulary = load_vocabulary(config.vocabulary)
        label_set = LabelSet.load(config.label_set)
        graph = ReasoningGraph.load(config.graph)
        check_graph(graph)
    with stage("catalog"):
        catalog = make_catalog(
            vocabulary, config.n_products, _stage_rng(config.seed, "catalog"),
            synonym_rate=config.synonym_rate, value_skew=config.attribute_value_skew,
            attribute_missing_rate=config.attribute_missing_rate,
            unbranded_rate=config.unbranded_rate, description_missing_rate=config.description_missing_rate,
        )
    with stage("queries"):
        queries = make_queries(
            vocabulary, catalog, config.n_queries, _stage_rng(config.seed, "queries"),
            constraint_probs=config.constraint_probs, brand_query_rate=config.brand_query_rate,
            synonym_rate=config.synonym_rate, misspelling_rate=config.misspelling_rate, typo_rate=config.typo_rate,
            query_noise_rate=config.query_noise_rate, zipf_exponent=config.zipf_exponent,
            segment_thresholds=config.segment_thresholds,
        )
    with stage("judgments"):
        rng = _stage_rng(config.seed, "judgments")
        pools = candidate_pools(
            vocabulary, catalog, queries, config.candidates_per_query, rng,
            exact_share=config.pool_exact_share, same_type_share=config.pool_same_type_share,
            related_share=config.pool_related_share,
        )
        q, p = judged_pairs(pools, config.judgments_per_query)
        gold_nodes, judgments = gold_and_judgments(
            vocabulary, catalog, queries, graph, label_set, q, p, config.annotator_noise, rng,
            extra_raters=config.extra_raters, extra_rater_share=config.extra_rater_share,
        )
        pool_queries = np.repeat(np.arange(len(queries))[:, None], pools.shape[1], axis=1)
        pool_gain = pair_nodes(queries, catalog, vocabulary.related, pool_queries, pools).gain
    tables = {"catalog": catalog.table, "queries": queries.table, "judgments": judgments, "gold_nodes": gold_nodes}
    names = (vocabulary.name, vocabulary.sha256, label_set.name, graph.name)
    return _Population(catalog, queries, pools, pool_gain), tables, names


def _logs(config: WorldConfig, population: _Population, rng: np.random.Generator) -> dict[str, pa.Table]:
    logs = simulate_logs(config, population.catalog, population.queries, population.pools, population.pool_gain, rng)
    return {"search_impressions": logs.search_impressions, "experiment_assignment": logs.experiment_assignment,
            "experiment_events": logs.experiment_events}


def generate_world(config: WorldConfig, progress: Callable[[str], None] | None = None) -> World:
    """Build every table of the world. `progress(stage)` is called as each stage starts."""
    timings: dict[str, float] = {}
    stage = _timed(progress, timings)
    population, tables, names = _build(config, stage)
    with stage("logs"):
        tables.update(_logs(config, population, _stage_rng(config.seed, "logs")))
    tables = {name: tables[name] for name in TABLES}
    manifest = _manifest(config, *names, tables)
    return World(**tables, manifest=manifest, timings=timings)


def series_config(config: WorldConfig, treatment_noise: float) -> WorldConfig:
    """`config` with its experiment's treatment ranker at `treatment_noise`, under its own experiment id."""
    experiment = replace(config.experiment, experiment_id=f"{config.experiment.experiment_id}_t{treatment_noise:g}",
                         treatment_noise=treatment_noise)
    return replace(config, experiment=experiment)


def generate_experiment_series(config: WorldConfig, treatment_noises: tuple[float, ...],
                               progress: Callable[[str], None] | None = None) -> list[tuple[dict, dict[str, pa.Table]]]:
    """More A/B experiments on the world of `config` (the same catalog, queries and judgments), one per treatment
    ranker noise (the control keeps `experiment.control_noise`): several treatment strengths, some possibly worse
    than the control. Each is (its manifest, its three log tables); experiment i draws its users and requests from
    its own generator (seed, logs stage, i + 1), so the experiments are independent samples."""
    if not treatment_noises or min(treatment_noises) < 0:
        raise ValueError(f"treatment noises must be a non-empty list of values >= 0, got {list(treatment_noises)}")
    stage = _timed(progress, {})
    population, world_tables, names = _build(config, stage)
    series = []
    for index, noise in enumerate(treatment_noises, start=1):
        experiment_config = series_config(config, noise)
        with stage(f"logs of {experiment_config.experiment.experiment_id}"):
            logs = _logs(experiment_config, population, np.random.default_rng([config.seed, STAGES.index("logs"), index]))
        series.append((_manifest(experiment_config, *names, {**world_tables, **logs}), logs))
    return series


def _manifest(config: WorldConfig, vocabulary_name: str, vocabulary_sha256: str, label_set: str, graph: str,
              tables: dict[str, pa.Table]) -> dict:
    first, pre_days = config.first_day, config.experiment.pre_period_days
    return {
        "world": "synthetic",
        "seed": config.seed,
        "vocabulary": {"name": vocabulary_name, "sha256": vocabulary_sha256},
        "label_set": label_set,
        "graph": graph,
        "rows": {name: table.num_rows for name, table in tables.items()},
        "log_dates": {"start": first.isoformat(), "end": (first + timedelta(days=config.n_days - 1)).isoformat()},
        "experiment": {
            "experiment_id": config.experiment.experiment_id,
            "variants": list(VARIANTS),
            "control": VARIANTS[0],
            "start_date": (first + timedelta(days=pre_days)).isoformat(),
            "end_date": (first + timedelta(days=config.n_days - 1)).isoformat(),
            "pre_period": {"start": first.isoformat(), "end": (first + timedelta(days=pre_days - 1)).isoformat()},
            "treatment_share": config.experiment.treatment_share,
            "aa": config.experiment.aa,
            "srm": config.experiment.srm,
        },
        "config": config_to_dict(config),
    }


def write_world(world: World, out: str | Path) -> Path:
    """Write the world's tables under `out` and `world.json` last; returns the manifest's path.

    The tables are written into a fresh staging folder beside `out` and each table folder is then
    swapped in whole, so no partition of an earlier world survives. Other folders in `out` are kept.
    """
    return _write_swapped({name: (table, getattr(world, name)) for name, table in TABLES.items()}, world.manifest, MANIFEST, out)


def write_experiment_series(series: list[tuple[dict, dict[str, pa.Table]]], out: str | Path) -> list[Path]:
    """Each experiment of `generate_experiment_series` into `out`/<experiment_id>/: its log tables and
    `EXPERIMENT_MANIFEST` (the world manifest's form: `abtest.run.config_from_manifest` reads it). Returns the manifests."""
    return [_write_swapped({name: (TABLES[name], data) for name, data in logs.items()}, manifest, EXPERIMENT_MANIFEST,
                           Path(out) / manifest["experiment"]["experiment_id"]) for manifest, logs in series]


def _write_swapped(tables: dict[str, tuple[Table, pa.Table]], manifest: dict, manifest_name: str, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        for table, data in tables.values():
            write_table(table, data, staging)
        (staging / manifest_name).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for name in (*tables, manifest_name):
            final, retired = out / name, out / f".retired-{name}-{uuid.uuid4().hex[:8]}"
            if final.exists():
                final.rename(retired)
            (staging / name).rename(final)
            if retired.is_dir():
                shutil.rmtree(retired)
            elif retired.exists():
                retired.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / manifest_name
