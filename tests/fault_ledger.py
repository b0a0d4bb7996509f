"""The fault and abuse suite: every test in tests/faults tries a hostile input or injects a fault, and records what
happened in the session's ledger; the terminal summary prints the totals (inputs tried, faults injected,
rows lost, outputs half-written, injected commands run), which must stay 0 where they count damage.

A test records after its own asserts, so a recorded entry is a checked one: `ledger.input(...)` for a
hostile input, `ledger.fault(...)` for an injected fault (SIGKILL point, full disk), each with the
damage it measured.

A plugin of the root conftest, not the faults folder's own conftest: under pytest-xdist the controller, which
prints the summary, never collects that folder; workers hand their entries over when they finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

DAMAGE = ("rows_lost", "half_written", "commands_run")


@dataclass
class Ledger:
    inputs: list[dict] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)

    def input(self, name: str, *, rows_lost: int = 0, half_written: int = 0, commands_run: int = 0) -> None:
        """A hostile input tried (a file name, a field, a checkpoint, a config value) and the damage measured."""
        self.inputs.append({"name": name, "rows_lost": rows_lost, "half_written": half_written, "commands_run": commands_run})

    def fault(self, name: str, *, rows_lost: int = 0, half_written: int = 0, commands_run: int = 0) -> None:
        """A fault injected (a SIGKILL point, a full disk) and the damage measured after recovery."""
        self.faults.append({"name": name, "rows_lost": rows_lost, "half_written": half_written, "commands_run": commands_run})

    def totals(self) -> dict[str, int]:
        entries = self.inputs + self.faults
        return {"inputs_tried": len(self.inputs), "faults_injected": len(self.faults),
                **{key: sum(entry[key] for entry in entries) for key in DAMAGE}}


LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


LEDGER_KEY = "fault_ledger"


def pytest_sessionfinish(session) -> None:
    """On a pytest-xdist worker: hand this worker's entries to the controller, which prints the totals."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput[LEDGER_KEY] = {"inputs": LEDGER.inputs, "faults": LEDGER.faults}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """On the pytest-xdist controller: add a finished worker's entries to the ledger."""
    entries = node.workeroutput.get(LEDGER_KEY, {})
    LEDGER.inputs.extend(entries.get("inputs", []))
    LEDGER.faults.extend(entries.get("faults", []))


def pytest_terminal_summary(terminalreporter) -> None:
    if LEDGER.inputs or LEDGER.faults:
        totals = LEDGER.totals()
        terminalreporter.write_line("fault and abuse suite: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in totals.items()))
