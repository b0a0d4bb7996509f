"""What the benchmarks record about the machine beside each timing: timings compare only on a quiet machine."""

from __future__ import annotations

import os


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded to two decimals."""
    return [round(value, 2) for value in os.getloadavg()]
