"""What `relevance` writes when stderr is no terminal (a pipe, a file, CI), through the installed entry point."""

import json
import re
import subprocess
import sys
from pathlib import Path

from schemas.logs import PLAIN_LINE

RELEVANCE = str(Path(sys.executable).with_name("relevance"))
ANSI = re.compile(r"\x1b\[")


def generate(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    """The cheapest command with a progress loop and a result: the tests world (about a second)."""
    return subprocess.run([RELEVANCE, *options, "generate", "--preset", "tests", "--out", str(tmp_path / "world")], capture_output=True,
                          text=True, timeout=120)


def test_off_a_terminal_every_line_is_timestamped_and_levelled_with_no_redraws_and_the_total_time_last(tmp_path):
    run = generate(tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert "\r" not in run.stderr and not ANSI.search(run.stderr)
    assert lines and all(PLAIN_LINE.match(line) for line in lines), run.stderr
    assert any("generate world: started, 0/6 stage" in line for line in lines)  # progress as lines, not a bar
    assert re.search(r" INFO relevance: relevance generate: done in \d+\.\ds$", lines[-1]), lines[-1]
    assert run.stdout == ""  # the log is on stderr: stdout stays what a command produces for a pipe


def test_log_json_writes_one_object_per_line_with_its_fields(tmp_path):
    run = generate(tmp_path, "--log-json")
    assert run.returncode == 0, run.stderr
    entries = [json.loads(line) for line in run.stderr.splitlines()]
    assert entries and all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    assert {entry["level"] for entry in entries} == {"INFO"}
    assert entries[-1]["command"] == "relevance generate" and entries[-1]["seconds"] > 0
    assert any(entry.get("progress") == "generate world" and entry.get("total") == 6 for entry in entries)

    failed = subprocess.run([RELEVANCE, "--log-json", "validate", "--data", str(tmp_path / "nothing")], capture_output=True, text=True,
                            timeout=120)
    [error] = [json.loads(line) for line in failed.stderr.splitlines()]  # the failure's line too, and no total time after it
    assert failed.returncode == 1 and error["level"] == "ERROR" and error["message"].startswith("relevance validate: FileNotFoundError: ")


def test_quiet_prints_no_info_lines(tmp_path):
    run = generate(tmp_path, "--quiet")
    assert run.returncode == 0 and run.stderr == "" and run.stdout == ""
    assert (tmp_path / "world" / "world.json").is_file()
