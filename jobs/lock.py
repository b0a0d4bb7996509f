"""One job at a time per (output root, date): `score`, `export` and `nightly` hold `<root>/_locks/ds=D.lock`.

The lock is `fcntl.flock` on that file, so the kernel releases it when its holder exits, SIGKILL
included; the file itself stays and says who holds (or last held) it: pid, host, job, since when. A
second job on the same root and date fails at once naming the holder (`DateLockedError`). A job that
finds the file naming a holder that is gone (it released nothing: killed, or the machine rebooted)
takes it over and says so. The lock is not re-entrant; the nightly job holds its root's lock while
its steps lock their own roots below it (`scores/`, `published/`), different files.

`flock` is local to a machine (and NFS emulates it per server): jobs of one root and date run on one
driver, which is how the jobs here write their outputs.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FOLDER = "_locks"


class DateLockedError(RuntimeError):
    """Another job holds the lock of this root and date."""


def lock_path(root: str | Path, day: dt.date) -> Path:
    return Path(root) / LOCK_FOLDER / f"ds={day.isoformat()}.lock"


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('job', '?')} since {holder.get('since', '?')})"


def _read_holder(fd: int) -> dict:
    """The holder recorded in the lock file; {} when it is empty (released cleanly, or being written)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"pid": text[:40]}


def _write_holder(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    os.fsync(fd)


@contextmanager
def date_lock(root: str | Path, day: dt.date, job: str) -> Iterator[Path]:
    """Hold the lock of `root` and `day` while the block runs; `DateLockedError` at once if another job holds it."""
    path = lock_path(root, day)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DateLockedError(f"{path}: ds={day.isoformat()} of {root} is locked by {_describe(_read_holder(fd))}; "
                                  "wait for it to finish") from None
        left = _read_holder(fd)
        if left:
            log.warning("%s: taking over the lock left by %s, which no longer holds it", path, _describe(left))
        _write_holder(fd, {"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                           "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty file: released cleanly (a holder's details left behind mean it died)
    finally:
        os.close(fd)  # closing the descriptor releases the flock
