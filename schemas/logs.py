"""What a run shows: one log setup for every command, one progress helper for every long loop.

`relevance` calls `setup(...)` once, in its callback, before a command runs. Log records go to stderr
in one of four forms:

- on a terminal (stderr is a TTY): `15:17:03 message` (from WARNING up, `15:17:03 WARNING logger:
  message`), and long loops draw tqdm bars in place;
- off a terminal (a pipe, a file, CI, a scheduler): `2026-12-02T15:17:03.512Z INFO logger: message`,
  every line with an ISO timestamp and a level; no bars: a long loop logs lines instead (`LoggedProgress`:
  at its start, per tenth of its work or per 30 s, at its end), with rate and ETA;
- `quiet`: warnings and errors only, no progress;
- `json`: one JSON object per line: time, level, logger, message, plus the record's structured fields
  (a progress line's done, total, unit, rate, eta_s; the total-time line's command and seconds).

Our packages log from INFO, every other library from WARNING. Third-party noise is turned off before the
libraries load (`quiet_libraries`): transformers at error level (its coloured load report and its
bars), the huggingface_hub and datasets bars, vLLM's own log handler (its records then come here, from
WARNING). stdout is left to what a command produces for a reader or a pipe (`config show`,
`--version`, the demo's list of outputs).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

# The loggers of our packages (`relevance` is the CLI's own): INFO passes, or WARNING with quiet.
OUR_LOGGERS = ("relevance", "schemas", "jobs", "training", "evaluation", "abtest")
# Set (unless the user set them) before the libraries read them at import.
LIBRARY_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",  # also silences the coloured LOAD REPORT transformers logs as a warning
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' own bars follow this one
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "VLLM_CONFIGURE_LOGGING": "0",  # vLLM's loggers then propagate here instead of printing through their own handler
}
PROGRESS_EVERY = 0.10  # off a terminal: a line per this share of the work (at most one per PROGRESS_GAP seconds)...
PROGRESS_GAP = 5.0
PROGRESS_SECONDS = 30.0  # ...and at least one per this many seconds

# Every record attribute the logging module sets itself; the others are a record's structured fields.
_STANDARD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# A line off a terminal (the form scripts and tests read): ISO time, level, logger, message.
PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
_state = {"mode": "", "quiet": False}
log = logging.getLogger("relevance.progress")


def quiet_libraries() -> None:
    for name, value in LIBRARY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # A library imported before the CLI ran (a test runner, a notebook, another tool calling `main`) has read its
    # variables already: tell it directly, by the same variables.
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        transformers_logging.set_verbosity(getattr(logging, os.environ["TRANSFORMERS_VERBOSITY"].upper(), logging.ERROR))
        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            transformers_logging.disable_progress_bar()
    hub_utils = sys.modules.get("huggingface_hub.utils")
    if hub_utils is not None and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        hub_utils.disable_progress_bars()
    # vLLM imported before (VLLM_CONFIGURE_LOGGING unset then) gave its logger a handler of its own and stopped it propagating
    if "vllm.logger" in sys.modules and os.environ["VLLM_CONFIGURE_LOGGING"] == "0":
        vllm_root = logging.getLogger("vllm")
        for handler in list(vllm_root.handlers):
            vllm_root.removeHandler(handler)
        vllm_root.propagate = True


def from_warning_unless_ours(record: logging.LogRecord) -> bool:
    """The handler's filter: another library's record passes from WARNING, even from a logger the library set to
    INFO itself (great-expectations does; py4j, urllib3 and vLLM log at INFO)."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in OUR_LOGGERS


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (a test runner swaps it); on a terminal through
    `tqdm.write`, so a line does not break a bar being drawn."""

    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; the stream is always the current stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not self.terminal:
            return super().emit(record)
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class TerminalFormatter(logging.Formatter):
    """`15:17:03 message`; from WARNING up the level and logger too."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        text = record.getMessage() if record.levelno < logging.WARNING else f"{record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"{stamp} {text}"


def iso_time(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PlainFormatter(logging.Formatter):
    """`2026-12-02T15:17:03.512Z INFO logger: message`; a message of several lines (a table of counts) gets the prefix
    on each, so every line a reader greps carries its time and level."""

    def format(self, record: logging.LogRecord) -> str:
        head = f"{iso_time(record)} {record.levelname} {record.name}:"
        text = "\n".join(f"{head} {line}" for line in record.getMessage().splitlines() or [""])
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object: time, level, logger, message, the record's own fields (`extra=`), and an exception's trace."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": iso_time(record), "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


FORMATTERS = {"terminal": TerminalFormatter, "plain": PlainFormatter, "json": JsonFormatter}


def default_mode() -> str:
    return "terminal" if sys.stderr.isatty() else "plain"


def setup(*, quiet: bool = False, json_lines: bool = False) -> str:
    """Route every log record through one handler on the root logger, in the mode stderr and the flags call for
    (returned); called again (a test invoking the CLI twice), it replaces its own handler and nothing else."""
    mode = "json" if json_lines else default_mode()
    quiet_libraries()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)
    handler = StderrHandler(terminal=mode == "terminal")
    handler.setFormatter(FORMATTERS[mode]())
    handler.addFilter(from_warning_unless_ours)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    logging.captureWarnings(True)  # warnings.warn comes out in the same form, at WARNING
    _state.update(mode=mode, quiet=quiet)
    return mode


def settings() -> dict[str, bool]:
    """The arguments of the last `setup` (its defaults without one), to repeat it in a process this one starts."""
    return {"quiet": _state["quiet"], "json_lines": _state["mode"] == "json"}


def mode() -> str:
    """The mode `setup` chose; without it (a job called from Python), the one stderr calls for."""
    return _state["mode"] or default_mode()


def rate_text(rate: float, unit: str) -> str:
    """3.2 step/s, 56,300 row/s."""
    return f"{rate:.3g} {unit}/s" if rate < 1000 else f"{rate:,.0f} {unit}/s"


def duration(seconds: float) -> str:
    """12m15s, 1h02m, 4.2s."""
    if round(seconds, 1) < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class LoggedProgress:
    """Progress as log lines: a line when the work starts, then one per `every` share of `total` (but not within `gap`
    seconds of the last) or after `seconds` without one (done/total, rate, ETA, the postfix), and a last line on close.
    A stand-in for the part of tqdm the loops use: iterate, `update`, `set_postfix`, `close`, a context manager."""

    def __init__(self, iterable: Iterable | None, *, desc: str, total: int | None, unit: str, initial: int, logger: logging.Logger,
                 every: float = PROGRESS_EVERY, gap: float = PROGRESS_GAP, seconds: float = PROGRESS_SECONDS, clock=time.monotonic) -> None:
        self.iterable, self.desc, self.unit, self.logger, self.clock = iterable, desc, unit, logger, clock
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable) + initial
        self.total, self.done, self.initial = total, initial, initial
        self.step = max(1, round(total * every)) if total else None
        self.gap, self.seconds, self.postfix, self.closed = gap, seconds, "", False
        self.started = self.last_time = clock()
        self.last_done = initial
        self.logger.info("%s: started, %s", desc, self._count(), extra={"progress": desc, "done": initial, "total": total, "unit": unit})

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LoggedProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        since = now - self.last_time
        if (self.step and self.done - self.last_done >= self.step and since >= self.gap) or since >= self.seconds:
            if self.total is None or self.done < self.total:
                self._line(now)

    def _count(self) -> str:
        return f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"

    def _line(self, now: float) -> None:
        self.last_done, self.last_time = self.done, now
        rate = (self.done - self.initial) / (now - self.started) if now > self.started else None
        eta = (self.total - self.done) / rate if rate and self.total else None
        parts = [self._count() + (f" ({100 * self.done / self.total:.0f}%)" if self.total else "")]
        if rate:
            parts.append(rate_text(rate, self.unit))
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        if self.postfix:
            parts.append(self.postfix)
        self.logger.info("%s: %s", self.desc, ", ".join(parts), extra={
            "progress": self.desc, "done": self.done, "total": self.total, "unit": self.unit,
            "rate": round(rate, 3) if rate else None, "eta_s": round(eta, 1) if eta is not None else None})

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else None
        tail = f" ({rate_text(rate, self.unit)})" if rate else ""
        self.logger.info("%s: done, %s in %s%s%s", self.desc, self._count(), duration(elapsed), tail,
                         f"; {self.postfix}" if self.postfix else "",
                         extra={"progress": self.desc, "done": self.done, "total": self.total, "unit": self.unit,
                                "seconds": round(elapsed, 2), "rate": round(rate, 3) if rate else None})


class NoProgress:
    """What `progress` gives where nothing is shown (quiet, a process other than the first, a silenced loop)."""

    def __init__(self, iterable: Iterable | None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, desc: str | None, total: int | None = None, unit: str = "it", initial: int = 0,
             enabled: bool = True, logger: logging.Logger | None = None):
    """Progress of a long loop: iterate over it, or `update(n)` by hand, `set_postfix(loss=...)`, `close()` (or use it as a
    context manager). A tqdm bar on a terminal; log lines elsewhere (`LoggedProgress`); nothing under quiet, when not
    `enabled` (e.g. every process but the first), for no work (`total` 0) or with no `desc` (a library function whose
    caller did not name its work: it runs inside a loop that shows its own progress)."""
    shown = mode()
    if desc is None or not enabled or total == 0 or _state["quiet"]:
        return NoProgress(iterable)
    if shown == "terminal":
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, dynamic_ncols=True)
    return LoggedProgress(iterable, desc=desc, total=total, unit=unit, initial=initial, logger=logger or log)
