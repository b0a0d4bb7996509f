"""Runs the test files longest first, so that under `make test` (pytest-xdist, a file per worker at a time) the
longest files start early instead of finishing the run on one worker while the other idles.

The order comes from `tests/file_seconds.json`: each file's seconds (setup, call and teardown of its tests) in a
whole run on a 2-core machine. A file the table does not know runs first, as if it were the longest, so a new slow
file cannot end the run. `make test` passes `--no-loadscope-reorder`, else xdist would queue the files by their
number of tests. Refresh the table after adding or reshaping slow tests:

    .venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --record-file-seconds

A plugin of the root conftest: under pytest-xdist the controller, which sees every test's report, writes the table.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import pytest

FILE_SECONDS = Path(__file__).with_name("file_seconds.json")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-file-seconds", action="store_true",
                     help=f"Write the seconds of each test file this run ran into {FILE_SECONDS.name} (the order of later runs).")


def read_file_seconds() -> dict[str, float]:
    return json.loads(FILE_SECONDS.read_text()) if FILE_SECONDS.exists() else {}


def file_of(nodeid: str) -> str:
    return nodeid.partition("::")[0]


def longest_files_first(nodeids: list[str], seconds: Mapping[str, float]) -> list[str]:
    """`nodeids` ordered by their file's seconds, longest first, a file the table lacks before every known one; a file's
    tests keep their order and stay together (the sort is stable)."""
    unknown = max(seconds.values(), default=0.0) + 1.0
    return sorted(nodeids, key=lambda nodeid: -seconds.get(file_of(nodeid), unknown))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seconds = read_file_seconds()
    by_id = {item.nodeid: item for item in items}
    items[:] = [by_id[nodeid] for nodeid in longest_files_first(list(by_id), seconds)]


class FileSecondsRecorder:
    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[file_of(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config, "workerinput"):  # an xdist worker: the controller records every file
            return
        # a run of some files updates theirs and keeps the others'
        merged = {**read_file_seconds(), **{name: round(total, 1) for name, total in self.seconds.items()}}
        table = dict(sorted(merged.items(), key=lambda entry: -entry[1]))
        FILE_SECONDS.write_text(json.dumps(table, indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--record-file-seconds"):
        config.pluginmanager.register(FileSecondsRecorder(), "file_seconds_recorder")
