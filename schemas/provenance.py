"""What made a report or an output: the tool's version, the command line and the time (UTC, ISO 8601)."""

from __future__ import annotations

import datetime as dt
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "relevance-labeling"  # pyproject.toml's project name: where the tool's version comes from


def tool_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


@dataclass(frozen=True)
class Provenance:
    version: str
    command: str
    created: str

    @classmethod
    def now(cls) -> Provenance:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        return cls(tool_version(), command, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    def line(self) -> str:
        return f"Made by {DISTRIBUTION} {self.version} at {self.created} with: {self.command}"
