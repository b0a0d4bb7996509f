import json
import logging
import sys
import types

import pytest

from schemas import logs
from schemas.logs import PLAIN_LINE, LoggedProgress, progress, setup


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Stderr:
    def __init__(self, capsys) -> None:
        self.capsys, self.text = capsys, ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def stderr(capsys):
    """stderr as pytest captures it (no TTY), read back; the default setup restored after."""
    yield Stderr(capsys)
    setup()


def test_off_a_terminal_progress_is_a_line_per_tenth_with_rate_and_eta_not_redraws(stderr):
    assert setup() == "plain"
    clock = Clock()
    bar = LoggedProgress(range(100), desc="teacher targets", total=None, unit="pair", initial=0, logger=logs.log, clock=clock)
    for _ in bar:
        clock.now += 1.0  # one pair a second: a tenth every 10 s, past the 5 s gap
    lines = stderr.getvalue().splitlines()
    assert "\r" not in stderr.getvalue() and all(PLAIN_LINE.match(line) for line in lines), lines
    assert lines[0].endswith("teacher targets: started, 0/100 pair")
    periodic = lines[1:-1]
    assert [line.split(": ", 2)[2].split(" (")[0] for line in periodic] == [f"{n}/100 pair" for n in range(10, 100, 10)]
    assert periodic[0].endswith("(10%), 1 pair/s, ETA 1m30s")
    assert lines[-1].endswith("teacher targets: done, 100/100 pair in 1m40s (1 pair/s)")


def test_a_slow_loop_logs_every_30_seconds_and_a_fast_one_only_start_and_end(stderr):
    setup()
    clock = Clock()
    slow = LoggedProgress(None, desc="slow", total=1000, unit="step", initial=0, logger=logs.log, clock=clock)
    for _ in range(4):
        clock.now += 31.0  # far under a tenth per update, but 31 s apart
        slow.update()
    slow.close()
    fast = LoggedProgress(range(50), desc="fast", total=None, unit="step", initial=0, logger=logs.log, clock=clock)
    for _ in fast:
        clock.now += 0.01  # each tenth within the 5 s gap: no line between start and end
    lines = stderr.getvalue().splitlines()
    assert sum(": slow: " in line for line in lines) == 1 + 4 + 1
    assert [line.split(": ", 2)[2] for line in lines if ": fast: " in line] == ["started, 0/50 step", "done, 50/50 step in 0.5s (100 step/s)"]


def test_progress_resumed_counts_from_its_start_step_and_shows_the_postfix(stderr):
    setup()
    clock = Clock()
    bar = LoggedProgress(range(50, 100), desc="sft", total=100, unit="step", initial=50, logger=logs.log, clock=clock)
    for step in bar:
        clock.now += 1.0
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    lines = stderr.getvalue().splitlines()
    assert lines[0].endswith("sft: started, 50/100 step")
    assert lines[1].endswith("sft: 60/100 step (60%), 1 step/s, ETA 40.0s, loss=0.0167")
    assert lines[-1].endswith("sft: done, 100/100 step in 50.0s (1 step/s); loss=0.0100")


def test_quiet_shows_no_progress_and_no_info_but_warnings(stderr):
    setup(quiet=True)
    for _ in progress(range(10), desc="hidden"):
        pass
    logging.getLogger("jobs.x").info("an info line")
    logging.getLogger("jobs.x").warning("a warning")
    assert stderr.getvalue().count("\n") == 1 and "WARNING jobs.x: a warning" in stderr.getvalue()


def test_json_lines_carry_time_level_logger_message_and_fields(stderr):
    setup(json_lines=True)
    logging.getLogger("training.x").info("scored %d pairs", 12, extra={"pairs": 12})
    for _ in progress(range(3), desc="loop", unit="pair"):
        pass
    entries = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert entries[0]["message"] == "scored 12 pairs" and entries[0]["pairs"] == 12 and entries[0]["logger"] == "training.x"
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    assert entries[-1]["progress"] == "loop" and entries[-1]["done"] == entries[-1]["total"] == 3


def test_other_libraries_pass_from_warning_only(stderr):
    setup()
    logging.getLogger("urllib3.connectionpool").info("Starting new HTTPS connection")
    chatty = logging.getLogger("great_expectations.data_context.types.base")
    chatty.setLevel(logging.INFO)  # as great-expectations does at import
    chatty.info("Created temporary directory")
    logging.getLogger("vllm.engine").info("Initializing an engine")
    logging.getLogger("vllm.engine").warning("a warning that matters")
    assert stderr.getvalue().splitlines()[-1].endswith("WARNING vllm.engine: a warning that matters")
    assert stderr.getvalue().count("\n") == 1


def test_every_line_of_a_message_of_several_lines_carries_the_time_and_level(stderr):
    setup()
    logging.getLogger("jobs.ingest").info("table   in\nqueries 384")
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2 and all(PLAIN_LINE.match(line) for line in lines)
    assert [line.split(": ", 1)[1] for line in lines] == ["table   in", "queries 384"]


def test_durations_read_as_a_person_writes_them():
    assert [logs.duration(s) for s in (4.21, 59.99, 735, 3725)] == ["4.2s", "1m00s", "12m15s", "1h02m"]
    assert [logs.rate_text(r, "row") for r in (0.0436, 21.34, 56312.0)] == ["0.0436 row/s", "21.3 row/s", "56,312 row/s"]


def test_libraries_imported_before_the_setup_are_quieted_too(stderr, monkeypatch):
    """A library imported first (a test runner, a notebook) read its variables already; the setup tells it directly."""
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    transformers_logging.set_verbosity_info()
    transformers_logging.enable_progress_bar()
    setup()
    assert transformers_logging.get_verbosity() == logging.ERROR
    assert not transformers_logging.is_progress_bar_enabled()


def test_vllm_imported_before_the_setup_logs_through_it(stderr, monkeypatch):
    """vLLM imported with VLLM_CONFIGURE_LOGGING unset prints through a handler of its own, to stdout, and does not
    propagate (an in-process engine test earlier in the same pytest worker did this): the setup takes it back."""
    vllm_root = logging.getLogger("vllm")
    monkeypatch.setitem(sys.modules, "vllm.logger", types.ModuleType("vllm.logger"))
    monkeypatch.setattr(vllm_root, "handlers", [logging.StreamHandler(sys.stdout)])
    monkeypatch.setattr(vllm_root, "propagate", False)
    setup()
    logging.getLogger("vllm.engine").warning("a warning that matters")
    assert stderr.getvalue().splitlines()[-1].endswith("WARNING vllm.engine: a warning that matters")
    assert vllm_root.handlers == [] and vllm_root.propagate
