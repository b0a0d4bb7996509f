"""Time the synthetic world generator on the benchmark preset (>= 1M impressions).

    .venv/bin/python benchmarks/generate_world.py [--preset benchmark] [--repeats 1]

Writes per-stage seconds, the write time (parquet, partitioned by ds) and impressions per second to
benchmarks/results/generate_world.json. Stage times come from `World.timings` (perf_counter around
each stage of `generate_world`); the best of `--repeats` runs is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.world.config import WorldConfig  # noqa: E402
from jobs.world.generate import generate_world, write_world  # noqa: E402
from schemas.config import config_to_dict  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "generate_world.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="benchmark")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    config = WorldConfig.preset(args.preset)
    generate_world(WorldConfig.tests())  # warm imports (pandas is pulled in lazily by pyarrow) before timing
    runs = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        world = generate_world(config)
        generate_seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            write_world(world, Path(folder) / "world")
            write_seconds = time.perf_counter() - started
        runs.append((generate_seconds, write_seconds, dict(world.timings)))
    generate_seconds, write_seconds, timings = min(runs, key=lambda run: run[0])
    impressions = world.manifest["rows"]["search_impressions"]
    result = {
        "preset": args.preset,
        "rows": world.manifest["rows"],
        "seconds": {
            "generate": round(generate_seconds, 3),
            "write": round(write_seconds, 3),
            "total": round(generate_seconds + write_seconds, 3),
            "stages": {stage: round(seconds, 3) for stage, seconds in timings.items()},
        },
        "impressions_per_second": {
            "generate": round(impressions / generate_seconds),
            "logs_stage": round(impressions / timings["logs"]),
            "generate_and_write": round(impressions / (generate_seconds + write_seconds)),
        },
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
            "platform": platform.platform(),
        },
        "config": config_to_dict(config),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    summary = {key: result[key] for key in ("rows", "seconds", "impressions_per_second", "peak_rss_gib")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
