"""The per-date lock of score, export and nightly: one holder at a time across processes, a second job
fails at once naming the holder, and the lock a dead holder left is taken over with a message."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.lock import DateLockedError, date_lock, lock_path

DAY = dt.date(2024, 3, 2)
REPO = Path(__file__).resolve().parents[2]
HOLD = "import sys, datetime as dt; from jobs.lock import date_lock\nwith date_lock(sys.argv[1], dt.date(2024, 3, 2), 'holder'):\n" \
       "    print('held', flush=True); sys.stdin.read()"


def test_a_second_holder_in_this_process_is_refused_and_the_lock_is_released_empty(tmp_path):
    with date_lock(tmp_path, DAY, "score") as path:
        holder = json.loads(path.read_text())
        assert (holder["pid"], holder["host"], holder["job"]) == (os.getpid(), socket.gethostname(), "score")
        with pytest.raises(DateLockedError, match=f"locked by pid {os.getpid()} on {socket.gethostname()} \\(score since"):
            with date_lock(tmp_path, DAY, "export"):
                pass
    assert path.read_text() == ""
    with date_lock(tmp_path, DAY + dt.timedelta(days=1), "score"), date_lock(tmp_path, DAY, "score"):
        pass  # other days are other locks


def test_an_export_while_another_process_holds_the_day_fails_at_once_naming_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "published")], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        export = subprocess.run([sys.executable, "-m", "jobs.cli", "export", "--date", DAY.isoformat(), "--relevance",
                                 str(tmp_path / "scores"), "--out", str(tmp_path / "published")], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
    finally:
        holder.communicate("", timeout=30)
    assert export.returncode == 1
    assert export.stderr.strip().splitlines() == [export.stderr.strip()], "one line"
    assert f"locked by pid {holder.pid} on {socket.gethostname()} (holder since" in export.stderr
    assert "Traceback" not in export.stderr
    assert holder.returncode == 0


def test_the_lock_of_a_dead_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    path = lock_path(tmp_path, DAY)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "job": "nightly", "since": "2024-03-02T01:00:00+00:00"}))
    with date_lock(tmp_path, DAY, "nightly"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by pid {dead_pid} on {socket.gethostname()} (nightly since" in caplog.text
