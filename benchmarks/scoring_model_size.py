"""Does vLLM overtake transformers on this CPU as the policy grows? Generation throughput by model size.

    .venv/bin/python benchmarks/scoring_model_size.py [--root demo_output] [--prompts 256] [--new-tokens 64]

`benchmarks/scoring.py` measures the scoring backends on the demo's 0.4M-parameter policy, where vLLM
is slower than transformers. This isolates the engines from the model size: policies of the default
shape and larger ones (`relevance model init` with more width and layers, random weights, the same
tokenizer recipe) generate exactly `--new-tokens` greedy tokens (EOS ignored, so both do the same
work whatever the weights) for the same test-split prompts. transformers: `generate` in left-padded
batches of `--hf-batch` with 2 torch threads; vLLM: the project's engine (`training.vllm_engine`)
with its default CPU worker binding. Tokens/s of the fastest of `--repeats` runs after a warm-up;
the engine start is reported apart. Writes benchmarks/results/scoring_model_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results" / "scoring_model_size.json"
# (hidden, layers, heads, kv heads, MLP width): the default policy, then wider and deeper ones (head size 32 or 64: vLLM CPU kernels)
SIZES = [(128, 2, 4, 2, 256), (256, 4, 4, 2, 704), (512, 8, 8, 4, 1408)]


def fastest(run, repeats: int) -> float:
    run(warm_up=True)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(warm_up=False)
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def hf_seconds(model_dir: Path, prompts: list[list[int]], new_tokens: int, batch_size: int, repeats: int) -> float:
    import torch

    from training.decoding import left_padded
    from training.model import load_model

    model, tokenizer = load_model(model_dir)
    model.eval()

    def run(warm_up: bool) -> None:
        chosen = prompts[:batch_size] if warm_up else prompts
        for start in range(0, len(chosen), batch_size):
            ids, attention = left_padded(chosen[start : start + batch_size], tokenizer.pad_token_id)
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)

    return fastest(run, repeats)


def vllm_seconds(model_dir: Path, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from training.vllm_engine import build_engine, shutdown_engine

    started = time.perf_counter()
    engine = build_engine(model_dir, seed=0, max_model_len=512, dtype="float32", kv_cache_bytes=512 << 20)
    start_seconds = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    requests = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompts]

    def run(warm_up: bool) -> None:
        outputs = engine.generate(requests[:16] if warm_up else requests, params, use_tqdm=False)
        assert all(len(output.outputs[0].token_ids) == new_tokens for output in outputs)

    seconds = fastest(run, repeats)
    shutdown_engine(engine)
    return seconds, start_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("demo_output"), help="demo root with world/ and datasets/")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not (args.root / "datasets").is_dir():
        sys.exit(f"no datasets in {args.root}: run `make demo` first")

    import torch

    from training.examples import load_pairs
    from training.model import ModelInitConfig, init_tiny_model, load_model
    from training.predict import pair_prompts

    torch.set_num_threads(args.threads)  # here, not at import: vLLM's engine processes re-import this module
    pairs = load_pairs(args.root / "datasets", "wands", "test")[: args.prompts]
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor()}, "threads": args.threads, "prompts": len(pairs),
              "new_tokens": args.new_tokens, "hf_batch": args.hf_batch, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="model_size_") as work:
        for hidden, layers, heads, kv_heads, mlp in SIZES:
            folder = Path(work) / f"h{hidden}_l{layers}"
            init_tiny_model(ModelInitConfig(world=args.root / "world", out=folder, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                            num_kv_heads=kv_heads, intermediate_size=mlp))
            model, tokenizer = load_model(folder)
            parameters = sum(p.numel() for p in model.parameters())
            prompts = pair_prompts(tokenizer, pairs, 48)
            del model
            tokens = len(prompts) * args.new_tokens
            hf = hf_seconds(folder, prompts, args.new_tokens, args.hf_batch, args.repeats)
            vllm, start = vllm_seconds(folder, prompts, args.new_tokens, args.repeats)
            row = {"hidden": hidden, "layers": layers, "parameters": parameters, "hf_tokens_per_s": tokens / hf,
                   "vllm_tokens_per_s": tokens / vllm, "vllm_over_hf": hf / vllm, "vllm_engine_start_s": start}
            print(json.dumps(row), flush=True)
            result["sizes"].append(row)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
