"""Seconds per SFT optimizer step of a policy under the training loop's speed options, side by side on the same batches.

    .venv/bin/python benchmarks/sft_step.py --data DATASETS --model POLICY [--steps 40] [--rounds 2] [--compiled]

- `one_pass` (the reference): each micro-batch in one forward and backward pass (`length_splits=1`) with
  transformers' `sdpa` attention, eager: `train sft` before length splits and shared key/value heads.
- `length_split`: the default `length_splits` (passes over parts of the micro-batch sorted by length), `sdpa`.
- `length_split_shared_kv`: that with the attention policies load with (`training.attention`): the
  default of `train sft`.
- `compiled` (with `--compiled`): the default with `compile=true` (torch.compile, dynamic shapes); its
  compilation (the first steps) is timed apart.

Every variant starts from the same weights and takes the same masked batches of the default `SFTConfig`
(the policy's own format); the rounds interleave the variants. Writes seconds per step, the ratios to the
reference within each round, the real share of the tokens computed, the warm-up time and the load averages
to benchmarks/results/sft_step.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import load_average  # noqa: E402

from schemas.graph import LabelSet, ReasoningGraph  # noqa: E402
from training.attention import SDPA_SHARED_KV  # noqa: E402
from training.distributed import parallel_run  # noqa: E402
from training.examples import load_pairs  # noqa: E402
from training.loop import learning_rate  # noqa: E402
from training.model import load_model_to_train  # noqa: E402
from training.policy_format import resolve_format  # noqa: E402
from training.sft import Optimisation, SFTConfig, length_sorted_parts, masked_micro_batches, training_examples  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sft_step.json"
WARMUP_STEPS = 5


VARIANTS = {  # name: (SFTConfig overrides, attention implementation)
    "one_pass": ({"length_splits": 1}, "sdpa"),
    "length_split": ({}, "sdpa"),
    "length_split_shared_kv": ({}, SDPA_SHARED_KV),
    "compiled": ({"compile": True}, SDPA_SHARED_KV),
}


def time_variant(name: str, args, parallel, batches_at, pad_id: int) -> dict:
    """(compile or warm-up seconds, seconds per timed step, real share of the tokens computed) of one variant from fresh weights."""
    overrides, attention = VARIANTS[name]
    config = SFTConfig(data=args.data, model=args.model, graph=args.graph, label_set=args.label_set, order=args.order,
                       prompt_tokens=args.prompt_tokens, threads=args.threads, **overrides)
    model, tokenizer = load_model_to_train(args.model)
    model.set_attn_implementation(attention)
    training = Optimisation.create(model, config, parallel, None)
    training.trained.train()

    def step(index: int) -> None:
        batches = batches_at(index)
        total = sum(sum(weights[1:]) for batch in batches for _, _, weights in batch)
        lr = learning_rate(index, config.lr, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        training.step(batches, total, lr, tokenizer.pad_token_id, config.max_grad_norm)

    started = time.perf_counter()
    for index in range(WARMUP_STEPS):
        step(index)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for index in range(WARMUP_STEPS, WARMUP_STEPS + args.steps):
        step(index)
    parts = [part for index in range(WARMUP_STEPS, WARMUP_STEPS + args.steps) for batch in batches_at(index)
             for part in length_sorted_parts(batch, config.length_splits)]
    real_share = sum(len(ids) for part in parts for ids, _, _ in part) / sum(len(part) * max(len(ids) for ids, _, _ in part) for part in parts)
    return {"first_steps_seconds": round(warm, 2), "seconds_per_step": round((time.perf_counter() - started) / args.steps, 4),
            "real_share_of_tokens_computed": round(real_share, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="data root with training_examples (`relevance datasets`)")
    parser.add_argument("--model", type=Path, required=True, help="policy folder (`relevance model init` or a trained policy)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant and round (after 5 untimed ones)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compiled", action="store_true", help="also time compile=true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    policy = resolve_format(args.model)
    args.graph, args.label_set, args.order, args.prompt_tokens = policy.graph, policy.label_set, policy.order, policy.prompt_tokens
    torch.set_num_threads(args.threads)

    config = SFTConfig(data=args.data, model=args.model, graph=args.graph, label_set=args.label_set, order=args.order,
                       prompt_tokens=args.prompt_tokens)
    graph = ReasoningGraph.load(args.graph)
    _, tokenizer = load_model_to_train(args.model)
    train = load_pairs(args.data, args.label_set, "train")
    examples_of = training_examples(config, train, tokenizer, graph, LabelSet.load(args.label_set))
    reasoning_nodes = [node for node in graph.node_names if node != graph.label_node]
    batches_at = functools.cache(lambda step: masked_micro_batches(step, config, examples_of, len(train), reasoning_nodes, None, {}))

    variants = [name for name in VARIANTS if name != "compiled" or args.compiled]
    rounds = []
    load_before = load_average()
    with parallel_run(torch.device("cpu"), "ddp") as parallel:
        for _ in range(args.rounds):
            timings = {name: {**time_variant(name, args, parallel, batches_at, tokenizer.pad_token_id), "load_after": load_average()}
                       for name in variants}
            reference = timings["one_pass"]["seconds_per_step"]
            rounds.append({"timings": timings, "step_time_over_one_pass": {
                name: round(timing["seconds_per_step"] / reference, 3) for name, timing in timings.items()}})
            print(json.dumps(rounds[-1]), flush=True)
    result = {
        "command": " ".join(sys.argv), "data": str(args.data), "model": str(args.model), "order": args.order,
        "batch_size": config.batch_size, "threads": args.threads, "timed_steps": args.steps, "rounds": rounds,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(), "load_before": load_before,
                    "load_after": load_average()},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
