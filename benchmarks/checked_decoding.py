"""What checked decoding costs in scoring throughput, side by side with plain greedy decoding, per backend.

    .venv/bin/python benchmarks/checked_decoding.py [--root demo_output] [--policy DIR] [--pairs 600] [--repeats 3]
        [--backends hf vllm] [--threads 2]

`--pairs` test pairs of a demo root (whole queries, a fixed sample: `training.examples.whole_queries`) are scored with full CoT (`reasoning=all`)
through each backend's `Scorer`, with `checked_verdicts` off and on, the two alternating within each repeat after one
warm-up call of each, so both see the same machine. Throughput is pairs/s of the fastest repeat; the ratio
checked / plain is the figure to read. One vLLM engine serves both settings (it is built with the checked-decoding
logits processor; requests without the setting pass it untouched). Beside the times: how many pairs' reasoning and
labels the setting changed, and whether the two backends wrote the same checked texts. Writes
benchmarks/results/checked_decoding.json; the load average is recorded around each backend.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results" / "checked_decoding.json"
DAY = dt.date(2024, 1, 1)


def test_pairs(datasets: Path, label_set: str, count: int) -> list[dict]:
    from training.examples import load_pairs, whole_queries

    return [{**{key: value for key, value in pair.items() if key != "gold"}, "product_content_hash": "benchmark"}
            for pair in whole_queries(load_pairs(datasets, label_set, "test"), count)]


def timed(scorer, pairs: list[dict]) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    rows = scorer.score(pairs, DAY).to_pylist()
    return time.perf_counter() - started, rows


def compare(scorer, spec, pairs: list[dict], repeats: int) -> dict:
    """Throughput of `scorer` under `spec` with checked_verdicts off and on, alternating; what the setting changed."""
    specs = {flag: replace(spec, checked_verdicts=flag) for flag in (False, True)}
    seconds: dict[bool, list[float]] = {False: [], True: []}
    rows = {}
    load_before = os.getloadavg()[0]
    for repeat in range(repeats + 1):  # the first round warms up
        for flag, flagged in specs.items():
            scorer.spec = flagged
            elapsed, rows[flag] = timed(scorer, pairs)
            if repeat:
                seconds[flag].append(round(elapsed, 2))
    rate = {flag: len(pairs) / min(times) for flag, times in seconds.items()}
    return {
        "seconds": {"plain": seconds[False], "checked": seconds[True]},
        "pairs_per_second": {"plain": round(rate[False], 1), "checked": round(rate[True], 1)},
        "checked_over_plain": round(rate[True] / rate[False], 3),
        "reasoning_changed": sum(a["reasoning"] != b["reasoning"] for a, b in zip(rows[False], rows[True])),
        "label_changed": sum(a["label"] != b["label"] for a, b in zip(rows[False], rows[True])),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "checked_reasoning": [row["reasoning"] for row in rows[True]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("demo_output"), help="demo root with datasets/ and sft/model")
    parser.add_argument("--policy", type=Path, help="policy folder (default: ROOT/sft/model)")
    parser.add_argument("--pairs", type=int, default=600, help="test pairs scored per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (the fastest counts)")
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--batch-size", type=int, default=256, help="prompts decoded at once by hf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    from jobs.scoring.spec import ScorerSpec, open_scorer
    from training.policy_format import resolve_format

    torch.set_num_threads(args.threads)
    policy_dir = args.policy or args.root / "sft" / "model"
    policy = resolve_format(policy_dir)
    pairs = test_pairs(args.root / "datasets", policy.label_set, args.pairs)
    result = {"policy": str(policy_dir), "pairs": len(pairs), "repeats": args.repeats, "threads": args.threads,
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()}, "backends": {}}
    for backend in args.backends:
        spec = ScorerSpec(backend=backend, model=str(policy_dir), graph=policy.graph, label_set=policy.label_set, order=policy.order,
                          prompt_tokens=policy.prompt_tokens, reasoning="all", batch_size=args.batch_size, checked_verdicts=True,
                          kv_cache_bytes=256 << 20)
        scorer = open_scorer(spec)  # built checked: the vLLM engine loads the logits processor at its start
        try:
            result["backends"][backend] = compare(scorer, spec, pairs, args.repeats)
        finally:
            scorer.close()
        measured = result["backends"][backend]
        print(f"[checked_decoding] {backend}: {measured['pairs_per_second']} pairs/s, checked/plain {measured['checked_over_plain']}, "
              f"reasoning changed on {measured['reasoning_changed']} of {len(pairs)}, labels on {measured['label_changed']}", flush=True)
    if {"hf", "vllm"} <= set(result["backends"]):
        texts = [result["backends"][backend]["checked_reasoning"] for backend in ("hf", "vllm")]
        result["checked_texts_equal_across_backends"] = sum(a == b for a, b in zip(*texts))
    for measured in result["backends"].values():
        del measured["checked_reasoning"]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1))
    print(json.dumps({key: value for key, value in result.items() if key != "machine"}, indent=1))


if __name__ == "__main__":
    main()
