"""`relevance score`: every candidate scored exactly once, reuse by model version and content hash,
quarantine of pairs without a product, and a SIGKILL mid-shard that a re-run recovers from, in-process and on
Spark (driver, JVM and Python workers killed together)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.scoring.config import ScoreConfig
from jobs.scoring.run import run
from schemas.config import ConfigError
from schemas.storage import read_table, write_table
from schemas.tables import CANDIDATE_PAIRS, CATALOG, QUARANTINE, QUERIES, RELEVANCE
from training.policy_format import PolicyFormat

DAY = dt.date(2024, 3, 2)
REPO = Path(__file__).resolve().parents[3]


def write_candidates(root: Path, world: Path, day: dt.date, changed_hash: str = "", extra_pairs: tuple = ()) -> int:
    """Every (query, product) of the tiny world as `day`'s candidates; `changed_hash` marks one product's text as changed."""
    queries = read_table(QUERIES, world).to_pylist()
    products = read_table(CATALOG, world)["product_id"].to_pylist()
    rows = [{"query": q["query"], "query_id": q["query_id"], "product_id": pid,
             "product_content_hash": f"{pid}-{'v2' if pid == changed_hash else 'v1'}", "impressions": 3, "ds": day}
            for q in queries for pid in products]
    rows += [{"query": query, "query_id": "qx", "product_id": pid, "product_content_hash": "h", "impressions": 1, "ds": day}
             for query, pid in extra_pairs]
    write_table(CANDIDATE_PAIRS, pa.Table.from_pylist(rows, schema=CANDIDATE_PAIRS.arrow_schema()), root)
    return len(rows)


def config(tmp_path: Path, world: Path, model: Path, day: dt.date = DAY, **overrides) -> ScoreConfig:
    values = {"date": day.isoformat(), "pairs": str(tmp_path / "prepared"), "catalog": str(world), "out": str(tmp_path / "scores"),
              "backend": "hf", "model": str(model), "batch_size": 16, **overrides}
    return ScoreConfig(**values)


def day_rows(out: Path, day: dt.date) -> pa.Table:
    return read_table(RELEVANCE, out, days=[day]).sort_by([("query", "ascending"), ("product_id", "ascending")])


def test_every_candidate_once_then_reuse_by_version_and_content(tmp_path, tiny_world, tiny_model):
    n = write_candidates(tmp_path / "prepared", tiny_world, DAY, extra_pairs=(("gray sofa", "p-gone"),))
    first = run(config(tmp_path, tiny_world, tiny_model))
    assert (first["candidates"], first["scored"], first["reused"], first["quarantined"]) == (n, n - 1, 0, 1)
    rows = day_rows(tmp_path / "scores", DAY)
    assert rows.num_rows == n - 1 and rows.schema == RELEVANCE.arrow_schema()
    assert len(set(zip(rows["query"].to_pylist(), rows["product_id"].to_pylist()))) == n - 1
    quarantined = read_table(QUARANTINE, tmp_path / "scores" / "_scoring" / f"ds={DAY}").to_pylist()
    assert [(json.loads(q["record"])["product_id"], q["field"]) for q in quarantined] == [("p-gone", "product_id")]
    assert not list((tmp_path / "scores" / "_scoring" / f"ds={DAY}").glob(f"{first['model_version']}*")), "shards removed once published"

    again = run(config(tmp_path, tiny_world, tiny_model))  # idempotent: nothing scored, the same rows
    assert (again["scored"], again["reused"]) == (0, n - 1)
    assert day_rows(tmp_path / "scores", DAY).equals(rows)

    next_day = DAY + dt.timedelta(days=1)
    write_candidates(tmp_path / "prepared", tiny_world, next_day, changed_hash="p3")
    nightly = run(config(tmp_path, tiny_world, tiny_model, day=next_day))
    assert (nightly["scored"], nightly["reused"]) == (6, n - 1 - 6)  # p3's text changed: its 6 pairs only
    tomorrow = day_rows(tmp_path / "scores", next_day)
    rescored = tomorrow.filter(pc.equal(tomorrow["product_id"], "p3"))
    kept = tomorrow.filter(pc.not_equal(tomorrow["product_id"], "p3"))
    assert set(rescored["product_content_hash"].to_pylist()) == {"p3-v2"}
    assert kept.drop_columns(["ds"]).equals(rows.filter(pc.not_equal(rows["product_id"], "p3")).drop_columns(["ds"]))
    assert min(rescored["scored_at"].to_pylist()) > max(kept["scored_at"].to_pylist())

    other_settings = run(config(tmp_path, tiny_world, tiny_model, day=next_day, prompt_tokens=40))
    assert other_settings["model_version"] != nightly["model_version"] and other_settings["reused"] == 0


def test_a_job_killed_mid_shard_completes_on_rerun_with_each_pair_once(tmp_path, tiny_world, tiny_model):
    n = write_candidates(tmp_path / "prepared", tiny_world, DAY)
    settings = {"shard_size": 4, "reasoning": "all", "max_new_tokens": 64, "batch_size": 4}
    reference = run(config(tmp_path / "reference", tiny_world, tiny_model, pairs=str(tmp_path / "prepared"), **settings))
    command = [sys.executable, "-m", "jobs.cli", "score", "--date", DAY.isoformat(), "--model", str(tiny_model), "--pairs",
               str(tmp_path / "prepared"), "--catalog", str(tiny_world), "--out", str(tmp_path / "scores")]
    command += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    manifest_path = tmp_path / "scores" / "_scoring" / f"ds={DAY}" / reference["model_version"] / "manifest.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    at_kill = None
    deadline = time.monotonic() + 300
    while job.poll() is None and time.monotonic() < deadline:
        if manifest_path.is_file():
            shards = json.loads(manifest_path.read_text())["shards"]
            done = [s["shard"] for s in shards if s["done"]]
            running = [s["shard"] for s in shards if s["attempts"] and not s["done"]]
            if len(done) >= 3 and running:
                job.send_signal(signal.SIGKILL)
                at_kill = (done, running)
                break
        time.sleep(0.01)
    job.wait()
    assert at_kill is not None, f"the job ended before it could be killed mid-shard: {job.stderr.read().decode()[-2000:]}"
    assert job.returncode == -signal.SIGKILL
    assert not (tmp_path / "scores" / "relevance").exists(), "nothing published by the killed job"

    rerun = run(config(tmp_path, tiny_world, tiny_model, **settings))
    done, running = at_kill
    assert all(rerun["shard_attempts"][k] == 1 for k in done), "shards finished before the kill are not scored again"
    assert all(rerun["shard_attempts"][k] == 2 for k in running)
    rows = day_rows(tmp_path / "scores", DAY)
    expected = day_rows(tmp_path / "reference" / "scores", DAY)
    assert rows.num_rows == n and len(set(zip(rows["query"].to_pylist(), rows["product_id"].to_pylist()))) == n
    assert rows.select(["query", "product_id", "label", "label_probs", "reasoning"]).equals(
        expected.select(["query", "product_id", "label", "label_probs", "reasoning"]))


def test_config_errors_name_the_field(tmp_path, tiny_model):
    from schemas.config import ConfigError

    with pytest.raises(ConfigError, match="date"):
        ScoreConfig(date="03/02/2024", model=str(tiny_model))
    with pytest.raises(ConfigError, match="backend"):
        ScoreConfig(date="2024-03-02", model=str(tiny_model), backend="onnx")
    with pytest.raises(ConfigError, match=r"reasoning must be one of \('none', 'sample', 'all'\), got 'everything'"):
        ScoreConfig(date="2024-03-02", model=str(tiny_model), reasoning="everything")
    with pytest.raises(ConfigError, match="model"):
        ScoreConfig(date="2024-03-02", model=str(tmp_path))
    from training_world import unruled_graph

    with pytest.raises(ConfigError, match="checked_verdicts: graph 'relevance7' declares no checks_node .* and no node with equal_parents"):
        ScoreConfig(date="2024-03-02", model=str(tiny_model), graph=str(unruled_graph(tmp_path)), checked_verdicts=True)
    ScoreConfig(date="2024-03-02", model=str(tiny_model), graph="relevance7", checked_verdicts=True)  # its subject rule is checked


def test_the_spark_engine_writes_the_rows_the_local_engine_writes_and_its_driver_collects_no_row(tmp_path, tiny_world, tiny_model, spark,
                                                                                                 monkeypatch):
    from pyspark.sql.classic.dataframe import DataFrame

    write_candidates(tmp_path / "prepared", tiny_world, DAY)
    local = run(config(tmp_path / "local", tiny_world, tiny_model, pairs=str(tmp_path / "prepared")))
    collected, collect = [], DataFrame.collect  # every action that brings rows to the driver goes through collect

    def recording_collect(self):
        collected.append(self.columns)
        return collect(self)

    monkeypatch.setattr(DataFrame, "collect", recording_collect)
    for name in ("toArrow", "toPandas", "toLocalIterator"):
        monkeypatch.setattr(DataFrame, name, lambda self, *args, name=name, **kwargs: pytest.fail(f"the driver fetched rows with {name}"))
    spark_config = config(tmp_path / "spark", tiny_world, tiny_model, pairs=str(tmp_path / "prepared"), engine="spark", spark_partitions=2,
                          shard_size=30)
    on_spark = run(spark_config)
    assert (on_spark["scored"], on_spark["shards"], on_spark["model_version"]) == (local["scored"], 2, local["model_version"])
    assert collected and not any(set(columns) & {"query", "product_id", "title", "label", "label_probs"} for columns in collected), collected
    partition = tmp_path / "spark" / "scores" / "relevance" / f"ds={DAY}"
    written = {path.name: path.stat().st_mtime_ns for path in partition.iterdir()}
    again = run(spark_config)  # a finished night: every pair reused from its own partition, nothing scored, nothing rewritten
    assert (again["reused"], again["scored"], again["spark_tasks"], again["partition_rewritten"]) == (local["scored"], 0, 0, False)
    assert {path.name: path.stat().st_mtime_ns for path in partition.iterdir()} == written
    next_day = DAY + dt.timedelta(days=1)
    write_candidates(tmp_path / "prepared", tiny_world, next_day)
    tomorrow = run(config(tmp_path / "spark", tiny_world, tiny_model, day=next_day, pairs=str(tmp_path / "prepared"), engine="spark",
                          spark_partitions=2, shard_size=30))  # all reused from yesterday: tonight's partition is new
    assert (tomorrow["reused"], tomorrow["scored"], tomorrow["partition_rewritten"]) == (local["scored"], 0, True)
    assert day_rows(tmp_path / "spark" / "scores", next_day).num_rows == local["scored"]
    expected, got = day_rows(tmp_path / "local" / "scores", DAY), day_rows(tmp_path / "spark" / "scores", DAY)
    assert got.select(["query", "product_id", "label", "node_decisions"]).equals(expected.select(["query", "product_id", "label", "node_decisions"]))
    for mine, theirs in zip(got["label_probs"].to_pylist(), expected["label_probs"].to_pylist()):
        assert [label for label, _ in mine] == [label for label, _ in theirs]
        assert [p for _, p in mine] == pytest.approx([p for _, p in theirs], abs=1e-5)


def session_processes(session: int) -> list[int]:
    """The live processes of `session`: a job started in a session of its own and every process under it (Spark's Python
    daemon and workers included, though the daemon moves into a process group of its own)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, process_session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:  # ended meanwhile
            continue
        if int(process_session) == session and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(job: subprocess.Popen) -> None:
    """SIGKILL `job` (started with start_new_session=True), its JVM and Spark's Python workers, and wait until none is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)  # the driver and its JVM at once
    deadline = time.monotonic() + 30
    while left := session_processes(job.pid):
        assert time.monotonic() < deadline, f"processes of the killed job still running: {left}"
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    job.wait()


@pytest.mark.spark
@pytest.mark.slow
def test_a_spark_job_killed_mid_night_resumes_scoring_only_the_shards_no_attempt_completed(tmp_path, tiny_world, tiny_model, spark):
    n = write_candidates(tmp_path / "prepared", tiny_world, DAY)
    # one task scores the 8 shards one after the other, so the kill falls between the first complete attempt file and the end
    settings = {"engine": "spark", "spark_master": "local[2]", "spark_partitions": 1, "shard_size": 6, "reasoning": "all",
                "max_new_tokens": 32, "batch_size": 3}
    args = ["score", "--date", DAY.isoformat(), "--model", str(tiny_model), "--pairs", str(tmp_path / "prepared"), "--catalog", str(tiny_world),
            "--out", str(tmp_path / "scores"), *(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}"))]
    work = tmp_path / "scores" / "_scoring" / f"ds={DAY}"
    with (tmp_path / "killed.log").open("wb") as log:
        job = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while job.poll() is None and time.monotonic() < deadline and not any(work.glob("*/attempts/shard-*/*.parquet")):
            time.sleep(0.01)
    finally:
        kill_session(job)
    assert job.returncode == -signal.SIGKILL, f"the job ended before the kill: {(tmp_path / 'killed.log').read_text()[-2000:]}"
    assert not (tmp_path / "scores" / "relevance").exists(), "nothing published by the killed job"
    # complete attempt files the driver did not get to commit: the re-run adopts them as they are
    written = {path.parent.name: pq.read_table(path) for path in work.glob("*/attempts/shard-*/*.parquet")}
    assert written, "killed before an attempt completed a shard"

    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    report = json.loads((work / "score.json").read_text())
    adopted = sum(table.num_rows for table in written.values())
    assert (report["shards_committed_earlier"], report["shards_scored"]) == (len(written), report["shards"] - len(written))
    assert report["scored_this_run"] == n - adopted > 0
    rows = day_rows(tmp_path / "scores", DAY)
    assert rows.num_rows == n == len(set(keys_of(rows)))
    scored_at = dict(zip(keys_of(rows), rows["scored_at"].to_pylist()))
    for table in written.values():  # the killed job's rows, not scored again
        assert [scored_at[key] for key in keys_of(table)] == table["scored_at"].to_pylist()
    assert not (work / report["model_version"]).exists(), "no attempt file left"


def test_a_contradicting_format_is_refused_naming_both_values(tmp_path, tiny_model):
    policy = shutil.copytree(tiny_model, tmp_path / "policy")
    PolicyFormat(order="reasoning_first", prompt_tokens=40).save(policy)
    with pytest.raises(ConfigError, match="order='label_first'.*order='reasoning_first'"):
        ScoreConfig(date="2024-03-02", model=str(policy), order="label_first")
    agreeing = ScoreConfig(date="2024-03-02", model=str(policy), order="reasoning_first", prompt_tokens=40)
    assert (agreeing.spec().order, agreeing.spec().prompt_tokens) == ("reasoning_first", 40)


def test_the_cli_reports_a_contradicting_format_as_a_usage_error(tmp_path, tiny_model):
    policy = shutil.copytree(tiny_model, tmp_path / "policy")
    PolicyFormat(prompt_tokens=40).save(policy)
    result = CliRunner().invoke(app, ["score", "--date", "2024-03-02", "--model", str(policy), "--set", "prompt_tokens=48"])
    assert result.exit_code == 2
    assert "prompt_tokens=48" in result.output and "prompt_tokens=40" in result.output


def test_a_policy_is_scored_with_the_format_of_its_folder(tmp_path, tiny_world, tiny_model):
    write_candidates(tmp_path / "prepared", tiny_world, DAY)
    policy = shutil.copytree(tiny_model, tmp_path / "policy")
    PolicyFormat(order="reasoning_first", prompt_tokens=40).save(policy)
    from_folder = run(config(tmp_path / "from_folder", tiny_world, policy, pairs=str(tmp_path / "prepared"), max_new_tokens=16))
    restated = run(config(tmp_path / "restated", tiny_world, tiny_model, pairs=str(tmp_path / "prepared"), max_new_tokens=16,
                          order="reasoning_first", prompt_tokens=40))
    assert from_folder["model_version"] == restated["model_version"]
    assert day_rows(tmp_path / "from_folder" / "scores", DAY).select(["query", "product_id", "label", "label_probs"]).equals(
        day_rows(tmp_path / "restated" / "scores", DAY).select(["query", "product_id", "label", "label_probs"]))


def test_a_student_is_scored_with_the_graph_and_label_set_of_its_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "student.json").write_text(json.dumps({"graph": "relevance7", "label_set": "esci", "max_length": 64}))
    spec = ScoreConfig(date="2024-03-02", model=str(tmp_path), backend="student").spec()
    assert (spec.graph, spec.label_set) == ("relevance7", "esci")
    with pytest.raises(ConfigError, match="label_set='wands'.*label_set='esci'"):
        ScoreConfig(date="2024-03-02", model=str(tmp_path), backend="student", label_set="wands")
    with pytest.raises(ConfigError, match="order='label_first' does not apply to the student backend"):
        ScoreConfig(date="2024-03-02", model=str(tmp_path), backend="student", order="label_first")
    with pytest.raises(ConfigError, match="checked_verdicts: the student backend writes no reasoning"):
        ScoreConfig(date="2024-03-02", model=str(tmp_path), backend="student", checked_verdicts=True)


def test_a_second_model_keeps_the_first_models_rows_and_export_publishes_both(tmp_path, tiny_world, tiny_model):
    from jobs.export import ExportConfig
    from jobs.export import run as export

    n = write_candidates(tmp_path / "prepared", tiny_world, DAY)
    first = run(config(tmp_path, tiny_world, tiny_model, model_name="policy-a"))
    first_rows = day_rows(tmp_path / "scores", DAY)
    second = run(config(tmp_path, tiny_world, tiny_model, model_name="policy-b", prompt_tokens=40))
    assert first["model_version"] != second["model_version"]
    rows = read_table(RELEVANCE, tmp_path / "scores", days=[DAY])
    by_model = {name: rows.filter(pc.equal(rows["model_name"], name)) for name in ("policy-a", "policy-b")}
    assert {name: part.num_rows for name, part in by_model.items()} == {"policy-a": n, "policy-b": n}
    kept = by_model["policy-a"].sort_by([("query", "ascending"), ("product_id", "ascending")])
    assert kept.equals(first_rows), "the first model's rows are kept as they were"

    again = run(config(tmp_path, tiny_world, tiny_model, model_name="policy-a"))  # re-scoring one model replaces only its rows
    assert (again["scored"], again["reused"]) == (0, n)
    assert read_table(RELEVANCE, tmp_path / "scores", days=[DAY]).num_rows == 2 * n

    export(ExportConfig(relevance=str(tmp_path / "scores"), date=DAY.isoformat(), out=str(tmp_path / "published")))
    published = pq.read_table(tmp_path / "published" / "relevance" / f"ds={DAY}" / "relevance.parquet")
    assert sorted(pc.unique(published["model_name"]).to_pylist()) == ["policy-a", "policy-b"]
    assert published.num_rows == 2 * n


def wait_for_lock_holder(lock: Path, pid: int, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline:
        if lock.is_file() and f'"pid": {pid},' in lock.read_text():
            return
        time.sleep(0.01)
    raise AssertionError(f"the job never held {lock}: {job.stderr.read().decode()[-2000:] if job.poll() is not None else 'timeout'}")


def score_command(tmp_path: Path, world: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "score", "--date", DAY.isoformat(), "--model", str(model), "--pairs",
            str(tmp_path / "prepared"), "--catalog", str(world), "--out", str(tmp_path / "scores"), "--set", "shard_size=4"]


def test_two_score_processes_on_one_day_and_root_the_second_fails_naming_the_first(tmp_path, tiny_world, tiny_model):
    from jobs.lock import lock_path

    n = write_candidates(tmp_path / "prepared", tiny_world, DAY)
    lock = lock_path(tmp_path / "scores", DAY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(score_command(tmp_path, tiny_world, tiny_model), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        wait_for_lock_holder(lock, first.pid, first)
        first.send_signal(signal.SIGSTOP)  # the first job holds the lock, frozen mid-run
        second = subprocess.run(score_command(tmp_path, tiny_world, tiny_model), cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert f"locked by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    rows = day_rows(tmp_path / "scores", DAY)
    assert rows.num_rows == n == len(set(keys_of(rows)))


def keys_of(rows: pa.Table) -> list[tuple[str, str]]:
    return list(zip(rows["query"].to_pylist(), rows["product_id"].to_pylist()))


def test_the_lock_of_a_killed_score_is_taken_over_with_a_message(tmp_path, tiny_world, tiny_model):
    from jobs.lock import lock_path

    n = write_candidates(tmp_path / "prepared", tiny_world, DAY)
    lock = lock_path(tmp_path / "scores", DAY)
    killed = subprocess.Popen(score_command(tmp_path, tiny_world, tiny_model), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_lock_holder(lock, killed.pid, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    rerun = subprocess.run(score_command(tmp_path, tiny_world, tiny_model), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"taking over the lock left by pid {killed.pid}" in rerun.stderr
    assert day_rows(tmp_path / "scores", DAY).num_rows == n
    assert lock.read_text() == "", "released cleanly"
