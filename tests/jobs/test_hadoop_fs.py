"""The Hadoop filesystem helpers, and the Spark jobs on a `file://` URI root, as on hdfs:// or s3a://."""

from __future__ import annotations

import json

from jobs import hadoop_fs
from jobs.datasets import DatasetsConfig
from jobs.datasets import run as build_datasets
from jobs.prepare import PrepareConfig
from jobs.prepare import run as prepare
from jobs.world.config import WorldConfig
from jobs.world.generate import generate_world, write_world
from schemas.storage import partitions, read_table
from schemas.tables import QUARANTINE, QUERY_PRODUCT_STATS, SEARCH_IMPRESSIONS, TRAINING_EXAMPLES


def test_join_keeps_the_scheme_of_a_uri():
    assert hadoop_fs.join("hdfs://namenode/data/", "_prepare", "ds=2024-05-01") == "hdfs://namenode/data/_prepare/ds=2024-05-01"
    assert hadoop_fs.table_uri("s3a://bucket/root", QUARANTINE) == "s3a://bucket/root/quarantine"


def test_write_report_exists_and_delete_on_a_file_uri(spark, tmp_path):
    report = f"file://{tmp_path}/reports/run.json"
    assert not hadoop_fs.exists(spark, report)
    hadoop_fs.write_report(spark, report, json.dumps({"run": 1}))
    hadoop_fs.write_report(spark, report, json.dumps({"run": 2, "note": "caf\u00e9"}))
    assert hadoop_fs.exists(spark, report)
    assert json.loads((tmp_path / "reports" / "run.json").read_text(encoding="utf-8")) == {"run": 2, "note": "caf\u00e9"}
    hadoop_fs.delete(spark, f"file://{tmp_path}/reports")
    assert not (tmp_path / "reports").exists()
    hadoop_fs.delete(spark, report)  # nothing there any more: not an error


def test_prepare_and_datasets_read_and_write_a_file_uri_root(spark, tmp_path):
    world = tmp_path / "world"
    write_world(generate_world(WorldConfig.tests()), world)
    day = partitions(SEARCH_IMPRESSIONS, world)[0]
    root = f"file://{world}"

    prepared = prepare(PrepareConfig(date=day.isoformat(), data=root, run_suite=False, spark_master="local[2]"))
    report_dir = world / "_prepare" / f"ds={day.isoformat()}"
    assert json.loads((report_dir / "prepare.json").read_text())["pairs"] == prepared["pairs"] > 0
    assert read_table(QUERY_PRODUCT_STATS, world, days=[day]).num_rows == prepared["pairs"]
    assert read_table(QUARANTINE, report_dir).num_rows == prepared["search_impressions"]["quarantined"]
    assert prepared["outputs"]["quarantine"] == f"{root}/_prepare/ds={day.isoformat()}/quarantine"

    built = build_datasets(DatasetsConfig(data=root, weak_from=root, spark_master="local[2]"))
    assert json.loads((world / "_datasets" / "datasets.json").read_text())["written"] == built["written"] > 0
    assert read_table(TRAINING_EXAMPLES, world).num_rows == built["written"]
    quarantined = sum(n for reasons in built["quarantined"].values() for n in reasons.values())
    assert read_table(QUARANTINE, world / "_datasets").num_rows == quarantined
    assert built["outputs"][TRAINING_EXAMPLES.name] == f"{root}/{TRAINING_EXAMPLES.name}"
