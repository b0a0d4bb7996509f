"""Time `relevance prepare` (Spark, local[2]) and the DuckDB reference on the same 10M-impression day.

    .venv/bin/python benchmarks/prepare.py [--impressions 10000000] [--repeats 3] [--work /tmp/prepare_bench]

Generates the benchmark world with `--impressions` over two log days, moves the first day's file
into the second day's partition (so one day holds every impression; the moved rows count as late data
and are kept), runs the full prepare (great-expectations suites included, each run in a fresh JVM) and the
DuckDB reference (tests/jobs/prepare_reference.py, 2 threads) `--repeats` times each, interleaved, and
compares their medians (the reference alone varied from 11 to 18 s between runs here); checks that both give the same aggregates (every
query_product_stats row and the examination rates; exits 1 when they differ), and writes seconds,
CPU seconds and rows/s for both, with the machine's load average, to benchmarks/results/prepare.json.
CPU seconds (Spark: the driver JVM, which runs the local executors, plus this process; DuckDB: this
process's threads) are the figure to compare on a machine other work shares: wall time there also
counts the time other processes hold the cores. CPU seconds of the JVM are read from Linux's /proc.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "jobs"))

from machine import load_average  # noqa: E402
from prepare_reference import duckdb_prepare  # noqa: E402

from jobs.prepare import PrepareConfig, run  # noqa: E402
from jobs.spark import get_spark, stop_spark  # noqa: E402
from jobs.world.config import WorldConfig  # noqa: E402
from jobs.world.generate import generate_world, write_world  # noqa: E402
from schemas.storage import partitions, read_table, table_path  # noqa: E402
from schemas.tables import QUERY_PRODUCT_STATS, SEARCH_IMPRESSIONS  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "prepare.json"
SYNONYMS = {"couch": "sofa", "rug": "carpet"}


def one_day_world(work: Path, impressions: int) -> tuple[Path, dt.date]:
    world = work / "world"
    if world.exists():
        shutil.rmtree(world)
    config = WorldConfig.preset("benchmark", n_impressions=impressions, n_days=2, experiment={"pre_period_days": 1})
    write_world(generate_world(config), world)
    first, second = partitions(SEARCH_IMPRESSIONS, world)
    folder = table_path(world, SEARCH_IMPRESSIONS)
    for index, part in enumerate(sorted((folder / f"ds={first}").glob("*.parquet")), start=1):
        part.rename(folder / f"ds={second}" / f"part-{index:05d}.parquet")
    shutil.rmtree(folder / f"ds={first}")
    return world, second


def jvm_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's Java children: the local Spark driver and executors."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for process in Path("/proc").glob("[0-9]*"):
        try:
            name, stat = (process / "comm").read_text().strip(), (process / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if name == "java" and int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def aggregate_differences(out: Path, day: dt.date, reference: pa.Table, rates: dict, reference_rates: pa.Table) -> list[str]:
    """What differs between Spark's query_product_stats and rates of `day` and the DuckDB reference's (empty: equal)."""
    columns = [name for name in QUERY_PRODUCT_STATS.names if name != "ds"]
    ours = read_table(QUERY_PRODUCT_STATS, out, days=[day]).select(columns).sort_by([("query", "ascending"), ("product_id", "ascending")])
    theirs = reference.select(columns).cast(ours.schema).sort_by([("query", "ascending"), ("product_id", "ascending")])
    if ours.num_rows != theirs.num_rows:
        return [f"query_product_stats: {ours.num_rows} rows, the reference {theirs.num_rows}"]
    differences = []
    for name in columns:
        left, right = ours.column(name).to_pylist(), theirs.column(name).to_pylist()
        floating = pa.types.is_floating(ours.schema.field(name).type)
        same = [a == b or (floating and a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12))
                for a, b in zip(left, right)]
        if not all(same):
            differences.append(f"query_product_stats.{name}: {same.count(False)} rows differ")
    expected_rates = {str(row["position"]): row["examination_rate"] for row in reference_rates.to_pylist()}
    if rates.keys() != expected_rates.keys() or not all(math.isclose(rates[p], expected_rates[p], rel_tol=1e-9) for p in rates):
        differences.append("examination rates differ")
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=10_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prepare_bench"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each engine, interleaved; the figures compared are the medians")
    args = parser.parse_args()

    world, day = one_day_world(args.work, args.impressions)
    load_before = load_average()
    runs = {"spark_prepare_full": [], "duckdb_reference": []}
    for _ in range(args.repeats):  # interleaved, so a change in the machine's state reaches both alike
        started, cpu_started = time.perf_counter(), jvm_cpu_seconds() + own_cpu_seconds()  # ended JVMs are counted until reaped
        summary = run(PrepareConfig(date=day.isoformat(), data=str(world), out=str(args.work / "out"), synonyms=SYNONYMS,
                                    spark_master="local[2]", spark_conf={"spark.driver.memory": "6g"}))
        seconds = time.perf_counter() - started
        runs["spark_prepare_full"].append({"seconds": round(seconds, 1), "cpu_seconds": round(jvm_cpu_seconds() + own_cpu_seconds() - cpu_started, 1),
                                           "seconds_by_phase": summary["seconds_by_phase"], "load_average_after": load_average()})
        stop_spark(get_spark())  # each repeat starts its own JVM: a warm one would not be a night's first run
        started, cpu_started = time.perf_counter(), own_cpu_seconds()
        reference = duckdb_prepare(world, day, SYNONYMS, threads=2)
        runs["duckdb_reference"].append({"seconds": round(time.perf_counter() - started, 1), "cpu_seconds": round(own_cpu_seconds() - cpu_started, 1),
                                         "load_average_after": load_average()})
    differences = aggregate_differences(args.work / "out", day, reference["query_product_stats"],
                                        summary["examination_rates"], reference["rates"])
    median = {engine: {key: statistics.median(one[key] for one in measured) for key in ("seconds", "cpu_seconds")}
              for engine, measured in runs.items()}
    spark_seconds, duckdb_seconds = median["spark_prepare_full"]["seconds"], median["duckdb_reference"]["seconds"]
    rows = summary["search_impressions"]["rows_in"]
    result = {
        "impressions": rows,
        "day": day.isoformat(),
        "accepted": summary["search_impressions"]["accepted"],
        "late_rows_kept": summary["search_impressions"]["late_rows_kept"],
        "pairs": {"spark": summary["pairs"], "duckdb": reference["query_product_stats"].num_rows},
        "aggregates_equal": not differences,
        "aggregate_differences": differences,
        "examination_rates": summary["examination_rates"],
        "repeats": args.repeats,
        "median_seconds": {engine: figures["seconds"] for engine, figures in median.items()},
        "median_cpu_seconds": {engine: figures["cpu_seconds"] for engine, figures in median.items()},
        "runs": runs,
        "spark_over_duckdb_time": round(spark_seconds / duckdb_seconds, 2),
        "spark_over_duckdb_cpu": round(median["spark_prepare_full"]["cpu_seconds"] / median["duckdb_reference"]["cpu_seconds"], 2),
        "rows_per_second": {"spark": round(rows / spark_seconds), "duckdb": round(rows / duckdb_seconds)},
        "target": "full Spark prepare of 10M impressions in at most 4x the DuckDB reference's time, same aggregates",
        "target_met": spark_seconds <= 4 * duckdb_seconds and not differences,
        "notes": (
            "Spark: local[2], driver memory 6g, JVM start + GE suites on catalog and impressions + quarantine "
            "checks + normalisation + rates + aggregates + parquet writes. DuckDB: the aggregates only "
            "(no GE suites, no quarantine table written), 2 threads, same parquet files."
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1_5_15_before": load_before,
        },
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if differences:
        sys.exit(1)


if __name__ == "__main__":
    main()
