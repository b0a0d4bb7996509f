"""A night at catalog scale: `relevance score` on Spark (`local[2]`) next to the in-process scorer, on the same pairs.

    .venv/bin/python benchmarks/night.py [--sizes 250000 1000000] [--engines spark local] [--shard-size 25000] [--work benchmarks/work/night]

The world is the `tests` preset of `relevance world` (2,000 products, 200 queries) and the policy a tiny one
(`relevance model init` at width 32, one layer, as the test suite's), scored label-only (`reasoning=none`,
label_first: one forward pass per pair). For each size N the day's `candidate_pairs` are the first N
(query, product) pairs of catalog copies (product ids suffixed per copy, text unchanged), so the catalog
grows with N as a real one does. Each size is scored three times, each run in its own process so that its
peak memory is its own:

- `spark`: `engine=spark`, `spark_master=local[2]` (two executor cores, one scorer per Python worker);
- `local`: the in-process path (`engine=local`) on the same pairs, torch on the same two cores;
- `spark_rerun`: the Spark run again over its own output: every pair is reused, nothing is scored.

Per run: wall seconds, scoring pairs/s (scored pairs / seconds of the scoring job or shards), the driver's
peak RSS (the Python process that runs the job: in `spark` it holds counts only) and, for Spark, the peak
RSS of the JVM (in local mode it is driver and executors at once) and of the Python workers, sampled every
0.2 s; the load average before and after. Writes benchmarks/results/night.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import load_average  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "night.json"
DAY = dt.date(2024, 3, 2)


def build_world_and_policy(work: Path) -> tuple[Path, Path]:
    """The `tests` world and a tiny policy trained on nothing (its label distribution is what it is: speed is measured)."""
    from jobs.world.run import GenerateConfig
    from jobs.world.run import run as generate
    from training.model import ModelInitConfig, init_tiny_model

    world, model = work / "world", work / "tiny_policy"
    if not (world / "catalog").is_dir():
        generate(GenerateConfig(out=world, preset="tests", seed=5))
    if not model.is_dir():
        init_tiny_model(ModelInitConfig(world=world, out=model, vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                        intermediate_size=64, max_positions=256))
    return world, model


def write_night(world: Path, root: Path, pairs: int) -> None:
    """`root`'s catalog (copies of the world's, enough for `pairs`) and the day's candidate pairs: `pairs` (query, product)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from schemas.storage import read_table, write_table
    from schemas.tables import CANDIDATE_PAIRS, CATALOG, QUERIES

    if (root / "prepared" / CANDIDATE_PAIRS.name).is_dir():
        return
    catalog = read_table(CATALOG, world)
    queries = read_table(QUERIES, world).select(["query", "query_id"])
    copies = -(-pairs // (catalog.num_rows * queries.num_rows))
    big = pa.concat_tables([catalog.set_column(0, "product_id", pc.binary_join_element_wise(catalog["product_id"], pa.scalar(f"-{k}"), ""))
                            for k in range(copies)])
    write_table(CATALOG, big, root / "catalog")
    per_query = -(-pairs // queries.num_rows)
    ids = big["product_id"].slice(0, per_query).combine_chunks()
    rows = {"query": [], "query_id": [], "product_id": []}
    for query, query_id in zip(queries["query"].to_pylist(), queries["query_id"].to_pylist()):
        rows["query"].append(pa.repeat(query, len(ids)))
        rows["query_id"].append(pa.repeat(query_id, len(ids)))
        rows["product_id"].append(ids)
    table = pa.table({name: pa.concat_arrays(parts) for name, parts in rows.items()}).slice(0, pairs)
    table = table.append_column("product_content_hash", pc.binary_join_element_wise(pa.scalar("h-"), table["product_id"], ""))
    table = table.append_column("impressions", pa.repeat(pa.scalar(1, pa.int64()), pairs))
    table = table.append_column("ds", pa.repeat(pa.scalar(DAY, pa.date32()), pairs))
    write_table(CANDIDATE_PAIRS, table.select(CANDIDATE_PAIRS.names), root / "prepared")


class PeakMemory:
    """Peak RSS of this process, and of its descendants by kind (the JVM, the Python workers), sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peaks, self.running = psutil.Process(), {"driver": 0, "jvm": 0, "python_workers": 0}, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        import psutil

        while self.running:
            usage = {"driver": self.process.memory_info().rss, "jvm": 0, "python_workers": 0}
            for child in self.process.children(recursive=True):
                try:
                    kind = "jvm" if "java" in child.name() else "python_workers"
                    usage[kind] += child.memory_info().rss
                except psutil.Error:
                    continue
            self.peaks = {kind: max(self.peaks[kind], usage[kind]) for kind in usage}
            time.sleep(0.2)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.thread.join()
        return {f"{kind}_peak_rss_mib": round(value / (1 << 20), 1) for kind, value in self.peaks.items()}


def child(args: argparse.Namespace) -> None:
    """One scoring run in this process; prints its figures as JSON on the last line."""
    from jobs.scoring.config import ScoreConfig
    from jobs.scoring.run import run

    root = Path(args.root)
    memory = PeakMemory()
    load_before = load_average()
    started = time.perf_counter()
    report = run(ScoreConfig(date=DAY.isoformat(), pairs=str(root / "prepared"), catalog=str(root / "catalog"), out=str(root / f"scores_{args.child}"),
                             backend="hf", model=args.model, reasoning="none", order="label_first", batch_size=64, shard_size=args.shard_size,
                             engine=args.child, spark_master="local[2]"))
    seconds = time.perf_counter() - started
    figures = {"seconds": round(seconds, 1), **memory.stop(), "load_before": load_before, "load_after": load_average(),
               **{key: report.get(key) for key in ("candidates", "scored", "reused", "shards", "scoring_seconds", "pairs_per_second",
                                                   "scored_this_run", "spark_tasks")}}
    print(json.dumps(figures))


def run_child(root: Path, model: Path, engine: str, shard_size: int) -> dict:
    command = [sys.executable, __file__, "--child", engine, "--root", str(root), "--model", str(model), "--shard-size", str(shard_size)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {engine}: {figures}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000])
    parser.add_argument("--shard-size", type=int, default=25_000)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "night")
    parser.add_argument("--engines", nargs="+", choices=["spark", "local"], default=["spark", "local"],
                        help="engines run per size (the ratio needs both); results of other sizes in the JSON are kept")
    parser.add_argument("--child", choices=["spark", "local"])
    parser.add_argument("--root")
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    world, model = build_world_and_policy(args.work)
    results = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(), "master": "local[2]",
               "policy": "tiny (width 32, 1 layer), hf backend, reasoning=none, label_first, batch_size 64",
               "command": "python benchmarks/night.py " + " ".join(sys.argv[1:]), "nights": {}}
    if RESULTS.is_file():  # a later run of other sizes adds to the nights measured before
        earlier = json.loads(RESULTS.read_text())
        results["nights"] = earlier["nights"]
        results["command"] = f"{earlier['command']}; {results['command']}"
    for size in args.sizes:
        root = args.work / f"pairs_{size}"
        write_night(world, root, size)
        print(f"night of {size} pairs ({root})", flush=True)
        night: dict = {"shard_size": args.shard_size}
        night.update({engine: run_child(root, model, engine, args.shard_size) for engine in args.engines})
        if "spark" in night:
            night["spark_rerun"] = run_child(root, model, "spark", args.shard_size)
            night["rerun_share_of_first_run_seconds"] = round(night["spark_rerun"]["seconds"] / night["spark"]["seconds"], 3)
        if "local" in night and "spark" in night:
            night["spark_vs_local_pairs_per_second"] = round(night["spark"]["pairs_per_second"] / night["local"]["pairs_per_second"], 3)
        results["nights"][str(size)] = night
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
