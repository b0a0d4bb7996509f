"""`spark-submit jobs/submit.py nightly` on a Spark standalone cluster: a master and a worker started here as JVMs of their
own, the worker offering two GPUs (a discovery script names addresses 0 and 1: Spark schedules them without CUDA), the night's
executors in JVMs of their own with Python workers of their own. It is the README's cluster command with the standalone
master in place of YARN or Kubernetes: one executor per GPU, one task per GPU, the driver's master kept from spark-submit.
The published table must equal what the in-process scorer gives on the same candidate pairs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.nightly import NightlyConfig
from jobs.scoring.run import run as score
from schemas.storage import partitions, read_table
from schemas.tables import CANDIDATE_PAIRS, RELEVANCE, SEARCH_IMPRESSIONS

REPO = Path(__file__).resolve().parents[2]
GPUS = ["0", "1"]

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spark_bin(name: str) -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "bin" / name


def cluster_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            **extra}


def alive_workers(master_ui: str) -> list[dict]:
    try:
        with urllib.request.urlopen(f"{master_ui}/json/", timeout=5) as response:
            state = json.load(response)
    except OSError:
        return []
    return [worker for worker in state.get("workers", []) if worker.get("state") == "ALIVE"]


@pytest.fixture(scope="module")
def standalone_master(tmp_path_factory):
    """spark://127.0.0.1:PORT of a master with one worker of 2 cores, 3 GiB and GPUs 0 and 1; both stopped afterwards."""
    folder = tmp_path_factory.mktemp("standalone")
    discovery = folder / "gpus.sh"
    discovery.write_text(f"#!/bin/sh\necho '{json.dumps({'name': 'gpu', 'addresses': GPUS})}'\n")
    discovery.chmod(0o755)
    worker_conf = folder / "worker.conf"
    worker_conf.write_text(f"spark.worker.resource.gpu.amount {len(GPUS)}\nspark.worker.resource.gpu.discoveryScript {discovery}\n")
    port, master_ui_port = free_port(), free_port()
    master_url, master_ui = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{master_ui_port}"
    commands = {
        "master": [str(spark_bin("spark-class")), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                   "--webui-port", str(master_ui_port)],
        "worker": [str(spark_bin("spark-class")), "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "2",
                   "--memory", "3g", "--webui-port", str(free_port()), "--work-dir", str(folder / "work"),
                   "--properties-file", str(worker_conf), master_url],
    }
    daemons = {}
    try:
        for name, command in commands.items():
            with open(folder / f"{name}.log", "w") as log:
                daemons[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=cluster_env(), start_new_session=True)
        deadline = time.monotonic() + 120
        while not alive_workers(master_ui):
            if time.monotonic() > deadline or any(daemon.poll() is not None for daemon in daemons.values()):
                logs = "\n".join((folder / f"{name}.log").read_text()[-2000:] for name in commands)
                pytest.fail(f"the standalone worker did not register with the master:\n{logs}")
            time.sleep(1)
        [worker] = alive_workers(master_ui)
        assert worker["resources"]["gpu"]["addresses"] == GPUS, worker["resources"]
        yield master_url
    finally:
        for daemon in daemons.values():
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(timeout=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from jobs.world.run import GenerateConfig
    from jobs.world.run import run as generate

    out = tmp_path_factory.mktemp("standalone_world")
    generate(GenerateConfig(out=out, preset="tests", seed=5))
    return out


def test_a_night_submitted_to_a_standalone_cluster_scores_one_task_per_gpu_and_equals_in_process(standalone_master, world, tiny_model,
                                                                                                  tmp_path):
    day = partitions(SEARCH_IMPRESSIONS, world)[-1].isoformat()
    settings = {"date": day, "data": str(world), "out": str(tmp_path / "night"), "model": str(tiny_model), "reasoning": "none",
                "engine": "spark", "score.prompt_tokens": 40, "score.shard_size": 100, "prepare.run_suite": "false"}
    submit = [str(spark_bin("spark-submit")), "--master", standalone_master,
              "--conf", "spark.ui.enabled=false", "--conf", "spark.sql.shuffle.partitions=4",
              "--conf", "spark.executor.cores=1", "--conf", "spark.executor.memory=1g", "--conf", "spark.task.cpus=1",
              "--conf", "spark.executor.resource.gpu.amount=1", "--conf", "spark.task.resource.gpu.amount=1",
              str(REPO / "jobs" / "submit.py"), "nightly", *(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}"))]
    done = subprocess.run(submit, cwd=tmp_path, env=cluster_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    night = json.loads((tmp_path / "night" / "reports" / f"ds={day}" / "nightly.json").read_text())
    scored = night["steps"]["score"]["report"]
    assert scored["engine"] == "spark" and scored["scored"] == scored["candidates"] > 0
    by_gpu = scored["shards_by_gpu"]
    assert set(by_gpu) <= set(GPUS), f"each task held exactly one of the worker's GPUs: {by_gpu}"
    assert sum(by_gpu.values()) == scored["shards_scored"] == scored["shards"] > 1

    published = pq.read_table(tmp_path / "night" / "published" / "relevance" / f"ds={day}" / "relevance.parquet")
    local_config = dataclasses.replace(NightlyConfig(**{key: value for key, value in settings.items() if "." not in key}).score_config(),
                                       prompt_tokens=40, shard_size=100, engine="local", out=str(tmp_path / "local"))
    score(local_config)
    in_process = read_table(RELEVANCE, tmp_path / "local", days=[local_config.day])
    candidates = read_table(CANDIDATE_PAIRS, tmp_path / "night" / "prepared", days=[local_config.day])
    assert published.num_rows == in_process.num_rows == candidates.num_rows
    cluster_rows = {(row["query"], row["product_id"]): row for row in published.to_pylist()}
    for want in in_process.to_pylist():
        got = cluster_rows[(want["query"], want["product_id"])]
        assert dict(got["label_probs"]) == pytest.approx(dict(want["label_probs"]), abs=1e-5)
        assert (got["label"], got["model_version"], got["product_content_hash"]) == (want["label"], want["model_version"],
                                                                                    want["product_content_hash"])
