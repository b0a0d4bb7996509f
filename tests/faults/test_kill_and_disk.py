"""Injected faults: `relevance nightly` SIGKILLed in each of its steps, `relevance export` killed between the
two renames of its publish, and a disk that fills under the publish root and under the scores root.

Every fault is recovered from by an ordinary re-run, and the damage is measured against one uninterrupted
night on the same world: rows lost (a candidate pair missing from the published day, published twice, or
published with other values than the uninterrupted night's), outputs half-written (a hidden copy left by a
writer, a published day without its manifest or whose files do not match it, a parquet file that does not
read, `_LATEST` naming an incomplete day, a shard left behind), and whether the per-date lock of the killed
job was taken over. The killed jobs are real `python -m jobs.cli` processes; the re-runs use CliRunner,
in this process, so Spark starts once.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from jobs.cli import app
from jobs.export import ExportConfig
from jobs.export import run as export
from jobs.lock import lock_path
from jobs.publishing.publish import LATEST_FILE, MANIFEST_FILE, latest_published_day, read_published, sha256_of
from schemas.logs import PLAIN_LINE
from schemas.storage import partitions, read_table, write_table
from schemas.tables import CANDIDATE_PAIRS, RELEVANCE, SEARCH_IMPRESSIONS

REPO = Path(__file__).resolve().parents[2]
SETTINGS = ["--set", "reasoning=none", "--set", "score.prompt_tokens=40", "--set", "prepare.run_suite=false",
            "--set", "score.shard_size=300"]  # several shards, so a kill can fall between two of them
SCORE_SETTINGS = ["--set", "reasoning=none", "--set", "prompt_tokens=40", "--set", "shard_size=300"]
# What a writer killed mid-write leaves: our hidden staging / retired copies, Spark's staging and temporary
# folders, the scorer's shard files (removed once the day is written).
LEFT_BY_A_WRITER = re.compile(r"\.(staging|retired)-.*|\.spark-staging-.*|_temporary|shard-\d+\.parquet")
KEY = ["query", "product_id", "model_name"]
FREE_BYTES = 40_000  # left on a full disk: less than the smallest file a publish or a score writes (~117 kB)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from jobs.world.run import GenerateConfig
    from jobs.world.run import run as generate

    out = tmp_path_factory.mktemp("faults_world")
    generate(GenerateConfig(out=out, preset="tests", seed=5))
    return out


@pytest.fixture(scope="module")
def day(world) -> dt.date:
    return partitions(SEARCH_IMPRESSIONS, world)[-1]


def night_args(world: Path, root: Path, model: Path, day: dt.date) -> list[str]:
    return ["nightly", "--date", day.isoformat(), "--data", str(world), "--out", str(root), "--model", str(model), *SETTINGS]


@pytest.fixture(scope="module")
def reference(world, tiny_model, day, tmp_path_factory, spark) -> Path:
    """The root of one uninterrupted night: what every recovered run must publish."""
    root = tmp_path_factory.mktemp("uninterrupted_night")
    result = CliRunner().invoke(app, night_args(world, root, tiny_model, day))
    assert result.exit_code == 0, result.output
    return root


# --- measuring the damage ------------------------------------------------------------------------------


def published_root(root: Path) -> Path:
    return root / "published" / RELEVANCE.name


def comparable(rows: pa.Table) -> pa.Table:
    """Rows without `scored_at` (a re-scored pair is scored later, with the same result), sorted by key."""
    return rows.drop_columns(["scored_at"]).sort_by([(name, "ascending") for name in KEY])


def rows_lost(published: pa.Table, reference: pa.Table) -> int:
    """The uninterrupted night's rows missing from `published`, published more than once, or published with other
    values; plus rows the uninterrupted night does not have."""
    expected = {tuple(row[name] for name in KEY): row for row in comparable(reference).to_pylist()}
    found = Counter(tuple(row[name] for name in KEY) for row in published.select(KEY).to_pylist())
    rows = {tuple(row[name] for name in KEY): row for row in comparable(published).to_pylist()}
    missing = sum(key not in found for key in expected)
    repeated = sum(count - 1 for count in found.values())
    different = sum(key in rows and rows[key] != row for key, row in expected.items())
    unexpected = sum(key not in expected for key in found)
    return missing + repeated + different + unexpected


def half_written(root: Path) -> list[str]:
    """Outputs under `root` a writer left incomplete: each a line naming it."""
    found = [f"{path}: left by a killed writer" for path in root.rglob("*") if LEFT_BY_A_WRITER.fullmatch(path.name)]
    for file in root.rglob("*.parquet"):
        if not any(part.startswith(".") for part in file.relative_to(root).parts):
            try:
                pq.read_metadata(file)
            except (OSError, pa.ArrowException) as error:
                found.append(f"{file}: unreadable ({error})")
    published = published_root(root)
    for folder in published.glob("ds=*"):
        manifest = folder / MANIFEST_FILE
        if not manifest.is_file():
            found.append(f"{folder}: no {MANIFEST_FILE}")
            continue
        for name, entry in json.loads(manifest.read_text())["files"].items():
            if not (folder / name).is_file() or sha256_of(folder / name) != entry["sha256"]:
                found.append(f"{folder / name}: missing or not the file its manifest describes")
    latest = published / LATEST_FILE
    if latest.exists() and not (published / f"ds={latest.read_text().strip()}" / MANIFEST_FILE).is_file():
        found.append(f"{latest}: names {latest.read_text().strip()}, which is not completely published")
    return found


def candidate_keys(root: Path, day: dt.date) -> Counter:
    pairs = read_table(CANDIDATE_PAIRS, root / "prepared", days=[day], columns=["query", "product_id"])
    return Counter(zip(pairs["query"].to_pylist(), pairs["product_id"].to_pylist()))


def assert_recovered(root: Path, reference: Path, day: dt.date) -> tuple[int, int]:
    """The night under `root`, re-run after a fault, published what the uninterrupted night did, each candidate pair
    once, and left nothing half-written; returns (rows lost, outputs half-written), both asserted 0."""
    published = read_published(published_root(root))
    expected = read_published(published_root(reference), day)
    lost = rows_lost(published, expected)
    leftovers = half_written(root)
    assert lost == 0, "published rows differ from the uninterrupted night's"
    assert leftovers == [], leftovers
    assert candidate_keys(root, day) == candidate_keys(reference, day), "the prepared candidate pairs are the uninterrupted night's"
    assert Counter(zip(published["query"].to_pylist(), published["product_id"].to_pylist())) == candidate_keys(root, day)
    assert (published_root(root) / LATEST_FILE).read_text().strip() == day.isoformat()
    return lost, len(leftovers)


def assert_locks_released(root: Path, day: dt.date) -> None:
    for holder_root in (root, root / "scores", root / "published"):
        lock = lock_path(holder_root, day)
        assert not lock.exists() or lock.read_text() == "", f"{lock} is not released: {lock.read_text()}"


# --- SIGKILL ----------------------------------------------------------------------------------------------


def kill_when(command: list[str], reached: Callable[[], bool], log: Path) -> int:
    """Run `command` (a `python -m jobs.cli ...` process), SIGKILL it as soon as `reached()`; returns its pid."""
    with log.open("wb") as output:
        job = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while job.poll() is None and time.monotonic() < deadline:
            if reached():
                job.send_signal(signal.SIGKILL)
                assert job.wait() == -signal.SIGKILL
                return job.pid
            time.sleep(0.005)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    raise AssertionError(f"the job ended (rc {job.returncode}) before the kill point: {log.read_text()[-2000:]}")


def writing_prepared_tables(root: Path, day: dt.date) -> bool:
    """Spark has started writing the day's prepared tables (its staging folder for them exists)."""
    return any((root / "prepared" / "query_product_stats").glob(".spark-staging-*"))


def a_shard_scored(root: Path, day: dt.date) -> bool:
    """The shard manifest of tonight's scoring shows a finished shard."""
    for manifest in (root / "scores" / "_scoring" / f"ds={day.isoformat()}").glob("*/manifest.json"):
        try:
            if any(shard["done"] for shard in json.loads(manifest.read_text())["shards"]):
                return True
        except FileNotFoundError:
            continue
    return False


def export_staging(root: Path, day: dt.date) -> bool:
    """Export is writing tonight's files into its hidden staging folder."""
    return any(published_root(root).glob(f".staging-ds={day.isoformat()}-*"))


def start_from_the_uninterrupted_night(root: Path, reference: Path) -> None:
    """A re-run of the night: the uninterrupted night's outputs are there, published included."""
    shutil.copytree(reference, root, dirs_exist_ok=True)


def start_from_prepared_only(root: Path, reference: Path) -> None:
    """A night whose scores and publish are gone, so it scores every pair again."""
    shutil.copytree(reference / "prepared", root / "prepared")


KILL_POINTS = {
    "prepare, while Spark writes the day's tables": (start_from_the_uninterrupted_night, writing_prepared_tables),
    "score, once the shard manifest shows a shard done": (start_from_prepared_only, a_shard_scored),
    "export, once its staging folder exists": (start_from_the_uninterrupted_night, export_staging),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_night_killed_in_a_step_is_recovered_by_a_rerun(point, world, tiny_model, day, reference, tmp_path, ledger):
    start, reached = KILL_POINTS[point]
    root = tmp_path / "night"
    start(root, reference)
    before = read_published(published_root(root)) if published_root(root).is_dir() else None

    command = [sys.executable, "-m", "jobs.cli", *night_args(world, root, tiny_model, day)]
    pid = kill_when(command, lambda: reached(root, day), tmp_path / "killed.log")

    # killed: the lock names a dead holder, and what readers see is the night before the kill or nothing
    assert f'"pid": {pid},' in lock_path(root, day).read_text()
    if before is None:
        assert latest_published_day(published_root(root)) is None
    else:
        assert latest_published_day(published_root(root)) == day
        assert read_published(published_root(root)).equals(before), "the published day is untouched"

    result = CliRunner().invoke(app, night_args(world, root, tiny_model, day))
    assert result.exit_code == 0, result.output
    assert f"{lock_path(root, day)}: taking over the lock left by pid {pid} " in result.output
    lost, leftovers = assert_recovered(root, reference, day)
    assert_locks_released(root, day)
    ledger.fault(f"SIGKILL nightly during {point}", rows_lost=lost, half_written=leftovers)


STOP_BETWEEN_THE_RENAMES = """
import pathlib, sys, time
from jobs.cli import app

rename = pathlib.Path.rename

def rename_then_stop(self, target):
    moved = rename(self, target)
    if pathlib.Path(target).name.startswith(".retired-"):  # the old day is moved away; the new one not yet in
        print("between the renames", flush=True)
        time.sleep(600)
    return moved

pathlib.Path.rename = rename_then_stop
sys.argv[0] = "relevance"
app()
"""


def test_an_export_killed_between_its_two_renames_is_restored_by_the_next_export(reference, day, tmp_path, ledger):
    root = tmp_path / "night"
    shutil.copytree(reference / "scores", root / "scores")
    shutil.copytree(reference / "published", root / "published")
    # a previous night, so that readers have a complete day to fall back on while tonight's folder is missing
    previous = day - dt.timedelta(days=1)
    tonight = read_table(RELEVANCE, root / "scores", days=[day])
    write_table(RELEVANCE, tonight.set_column(tonight.schema.get_field_index("ds"), "ds", pa.array([previous] * len(tonight), pa.date32())),
                root / "scores")
    export(ExportConfig(relevance=str(root / "scores"), date=previous.isoformat(), out=str(root / "published")))

    args = ["export", "--date", day.isoformat(), "--relevance", str(root / "scores"), "--out", str(root / "published")]
    job = subprocess.Popen([sys.executable, "-c", STOP_BETWEEN_THE_RENAMES, *args], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        lines = [job.stdout.readline()]
        assert lines[-1].strip() == "between the renames", "".join(lines + job.stdout.readlines())[-2000:]
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
        job.stdout.close()

    published = published_root(root)
    assert not (published / f"ds={day.isoformat()}").exists() and (published / LATEST_FILE).read_text().strip() == day.isoformat()
    assert latest_published_day(published) == previous, "a reader falls back to the newest complete day"
    assert read_published(published).num_rows == tonight.num_rows

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"taking over the lock left by pid {job.pid} " in result.output
    assert "restored from .retired-" in result.output
    lost = rows_lost(read_published(published), read_published(published_root(reference), day))
    leftovers = half_written(root)
    assert lost == 0 and leftovers == [], leftovers
    assert latest_published_day(published) == day
    ledger.fault("SIGKILL export between its two renames", rows_lost=lost, half_written=len(leftovers))


# --- a full disk ------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs, unmounted at teardown; skipped where mounting is not permitted (the RLIMIT_FSIZE test still runs)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk-full cases run emulated with RLIMIT_FSIZE only")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the disk-full cases run emulated with RLIMIT_FSIZE only")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all of `disk`'s free space but `leave` bytes."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - leave))
    return filler


def failure_line(result: Result) -> str:
    """The one line a failed job prints on stderr after its log (every line before it a log record)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    *logged, line = result.stderr.strip().splitlines()
    assert not PLAIN_LINE.match(line) and all(PLAIN_LINE.match(record) for record in logged), result.stderr
    return line


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def publish_onto(disk: Path, reference: Path, world: Path, model: Path, day: dt.date) -> tuple[list[str], Path]:
    """`relevance export` of the night into a publish root on `disk` that already holds the published day."""
    shutil.copytree(reference / "published", disk / "published")
    return (["export", "--date", day.isoformat(), "--relevance", str(reference / "scores"), "--out", str(disk / "published")],
            published_root(disk) / f"ds={day.isoformat()}")


def score_onto(disk: Path, reference: Path, world: Path, model: Path, day: dt.date) -> tuple[list[str], Path]:
    """`relevance score` of the night into a scores root on `disk` that already holds the day's scores."""
    shutil.copytree(reference / "scores", disk / "scores")
    return (["score", "--date", day.isoformat(), "--model", str(model), "--pairs", str(reference / "prepared"), "--catalog", str(world),
             "--out", str(disk / "scores"), *SCORE_SETTINGS],
            disk / "scores" / RELEVANCE.name / f"ds={day.isoformat()}")


@pytest.mark.parametrize("job", [publish_onto, score_onto], ids=["export: publish root full", "score: scores root full"])
def test_a_full_disk_fails_the_job_in_one_line_and_leaves_the_stored_day_as_it_was(job, small_disk, reference, world, tiny_model, day,
                                                                                   ledger):
    args, stored_day = job(small_disk, reference, world, tiny_model, day)
    latest = published_root(small_disk) / LATEST_FILE
    before, latest_before = files_of(stored_day), (latest.read_text() if latest.exists() else None)
    filler = fill(small_disk, FREE_BYTES)

    line = failure_line(CliRunner().invoke(app, args))
    assert "No space left on device" in line and str(small_disk) in line, line
    assert files_of(stored_day) == before, "the day stored before is untouched"
    assert (latest.read_text() if latest.exists() else None) == latest_before
    leftovers = half_written(small_disk)
    assert leftovers == [], leftovers

    filler.unlink()  # space freed: the same command now completes
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stored = pq.read_table(stored_day / "relevance.parquet") if job is publish_onto else read_table(RELEVANCE, small_disk / "scores", days=[day])
    lost = rows_lost(stored, read_published(published_root(reference), day))
    assert lost == 0 and half_written(small_disk) == []
    ledger.fault(f"disk full (tmpfs): {job.__name__.replace('_', ' ')} it", rows_lost=lost, half_written=len(leftovers))


def limit_file_size(limit: int) -> Callable[[], None]:
    def in_child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return in_child


def test_a_full_disk_emulated_with_rlimit_fsize_fails_export_in_one_line(reference, day, tmp_path, ledger):
    """Where no tmpfs can be mounted (an unprivileged CI runner), a file-size limit stands in for a full disk:
    the first data file written past it fails as a write to a full disk does."""
    root = tmp_path / "night"
    out = shutil.copytree(reference / "published", root / "published")
    stored_day = published_root(root) / f"ds={day.isoformat()}"
    before, latest_before = files_of(stored_day), (published_root(root) / LATEST_FILE).read_text()
    args = [sys.executable, "-m", "jobs.cli", "export", "--date", day.isoformat(), "--relevance", str(reference / "scores"), "--out", str(out)]

    failed = subprocess.run(args, cwd=REPO, capture_output=True, text=True, preexec_fn=limit_file_size(FREE_BYTES), timeout=300)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    *logged, line = failed.stderr.strip().splitlines()
    assert "Traceback" not in failed.stderr and all(PLAIN_LINE.match(record) for record in logged), failed.stderr
    assert "File too large" in line and str(stored_day) in line, failed.stderr
    assert files_of(stored_day) == before and (published_root(root) / LATEST_FILE).read_text() == latest_before
    leftovers = half_written(root)
    assert leftovers == [], leftovers

    rerun = CliRunner().invoke(app, args[3:])
    assert rerun.exit_code == 0, rerun.output
    lost = rows_lost(read_published(published_root(root), day), read_published(published_root(reference), day))
    assert lost == 0 and half_written(root) == []
    ledger.fault("disk full (emulated: RLIMIT_FSIZE): export onto a full publish root", rows_lost=lost, half_written=len(leftovers))
