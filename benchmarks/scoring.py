"""Bulk scoring throughput of the three backends on this CPU: vllm, hf and the distilled student on the same pairs.

    .venv/bin/python benchmarks/scoring.py [--root demo_output] [--fast-pairs 1000] [--cot-pairs 300] [--threads 2]

From a demo root (`make demo` writes datasets/, the SFT policy sft/model and the student distill/model):
the first pairs of the test split (key order) scored through each backend's `Scorer`
(`jobs.scoring.backends`), text in, RELEVANCE rows out (prompt building and parsing included), in
two modes: full CoT generation (`reasoning=all`, `--cot-pairs`) and the label-only fast path
(`reasoning=none`, label_first, `--fast-pairs`); the student has no CoT and is timed on the fast
path's pairs. Throughput is pairs/s of the fastest of `--repeats` calls after one warm-up call
(other jobs may share the machine; its load average is recorded around each backend).

Fairness: torch runs `--threads` threads in this process (hf, student); each backend is tuned on
its own knob and its best setting counts: hf and the student over `--batch-sizes`, vllm over a few
engine settings (vLLM's defaults; `max_num_seqs` 64; async scheduling; the model worker bound to
`--threads` cores instead of vLLM's default on a small machine: one core, the other kept for its
front end and scheduler). The engine start is timed apart from throughput. An investigation part
times CoT generation alone (vLLM with and without the structured-output regex, transformers at hf's
best batch size) to say where vLLM's time goes. Agreement between hf and each vllm setting: largest
|dp| of the label probabilities, label agreement, equal reasoning texts and node decisions, strict
parse rates. Writes benchmarks/results/scoring.json and scoring.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results" / "scoring.json"
DAY = dt.date(2024, 1, 1)
MODES = {"full_cot": "all", "fast_path": "none"}
VLLM_DEFAULTS = "defaults (max_num_seqs=256)"


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def best_rate(score, pairs: list[dict], repeats: int) -> tuple[float, object]:
    """(pairs/s of the fastest of `repeats` calls of `score(pairs)` after a warm-up call on a few pairs, the last result)."""
    score(pairs[:16])
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = score(pairs)
        seconds.append(time.perf_counter() - started)
    return len(pairs) / min(seconds), result


def with_reasoning(scorer, reasoning: str) -> None:
    """Make `scorer` score with the reasoning mode `reasoning` (every backend reads its spec at each call)."""
    scorer.spec = dataclasses.replace(scorer.spec, reasoning=reasoning)


def split_pairs(root: Path) -> list[dict]:
    """The test split's pairs with gold nodes as scorers take them (`load_pairs` names the facets `attributes`)."""
    from training.examples import load_pairs

    return [{**{key: value for key, value in pair.items() if key != "gold"}, "product_content_hash": None}
            for pair in load_pairs(root / "datasets", "wands", "test")]


def agreement(hf_rows: list[dict], vllm_rows: list[dict], graph, labels) -> dict:
    from training.cot import parse_cot

    def well_formed(rows):
        return sum(parse_cot(row["reasoning"], graph, "label_first", labels.names, "strict").well_formed for row in rows) / len(rows)

    gaps = [abs(p - q) for h, v in zip(hf_rows, vllm_rows) for (_, p), (_, q) in zip(h["label_probs"], v["label_probs"])]
    result = {"max_abs_label_prob_diff": max(gaps), "label_agreement": sum(h["label"] == v["label"] for h, v in zip(hf_rows, vllm_rows)) / len(hf_rows)}
    if hf_rows[0]["reasoning"] is not None:
        result.update(
            reasoning_text_equal=sum(h["reasoning"] == v["reasoning"] for h, v in zip(hf_rows, vllm_rows)) / len(hf_rows),
            node_decisions_equal=sum(h["node_decisions"] == v["node_decisions"] for h, v in zip(hf_rows, vllm_rows)) / len(hf_rows),
            strict_well_formed={"hf": well_formed(hf_rows), "vllm": well_formed(vllm_rows)},
        )
    return result


def generation_only(scorer, pairs: list[dict], repeats: int) -> dict:
    """Pairs/s of vLLM's greedy CoT generation alone (one `engine.generate`), with and without the CoT regex."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from training.cot import cot_regex
    from training.predict import pair_prompts

    spec = scorer.spec
    requests = [TokensPrompt(prompt_token_ids=prompt) for prompt in pair_prompts(scorer.tokenizer, pairs, spec.prompt_tokens)]
    result = {}
    for name, constraint in (("with_regex", StructuredOutputsParams(regex=cot_regex(scorer.graph, scorer.labels.names, spec.order))),
                             ("without_regex", None)):
        params = SamplingParams(temperature=0.0, max_tokens=spec.max_new_tokens, stop_token_ids=[scorer.tokenizer.eos_token_id],
                                detokenize=False, structured_outputs=constraint)
        rate, outputs = best_rate(lambda chosen, params=params: scorer.engine.generate(requests[: len(chosen)], params, use_tqdm=False), pairs, repeats)
        tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
        result[name] = {"pairs_per_s": rate, "tokens_per_s": rate * tokens / len(pairs), "tokens_per_pair": tokens / len(pairs)}
    return result


def hf_generation_only(policy: Path, pairs: list[dict], batch_size: int, max_new_tokens: int, prompt_tokens: int, repeats: int) -> dict:
    """Pairs/s of transformers' greedy CoT generation alone (`training.decoding.generate`), the counterpart of `generation_only`."""
    from training.decoding import generate
    from training.model import load_model
    from training.predict import pair_prompts

    model, tokenizer = load_model(policy)
    prompts = pair_prompts(tokenizer, pairs, prompt_tokens)
    rate, _ = best_rate(lambda chosen: generate(model, tokenizer, prompts[: len(chosen)], max_new_tokens=max_new_tokens, batch_size=batch_size), pairs, repeats)
    return {"pairs_per_s": rate, "batch_size": batch_size, "policy_parameters": sum(param.numel() for param in model.parameters())}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = result["throughput_pairs_per_s"]
    figure, axis = plt.subplots(figsize=(7, 4))
    backends, width = ["hf", "vllm", "student"], 0.27
    colors = {"hf": "tab:blue", "vllm": "tab:orange", "student": "tab:green"}
    for offset, backend in enumerate(backends):
        modes = [mode for mode in MODES if backend in rates[mode]]
        xs = [list(MODES).index(mode) + (offset - 1) * width for mode in modes]
        bars = axis.bar(xs, [rates[mode][backend] for mode in modes], width, label=backend, color=colors[backend])
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
    axis.set_xticks(range(len(MODES)), [f"full CoT\n({result['pairs']['full_cot']} pairs)", f"label only\n({result['pairs']['fast_path']} pairs)"])
    axis.set_ylabel("pairs / s (best setting of each backend)")
    axis.set_title(f"bulk scoring on {result['machine']['cpus']} CPUs, {result['threads']} torch threads")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("demo_output"), help="demo root with datasets/, sft/model and distill/model")
    parser.add_argument("--policy", type=Path, help="policy folder (default: ROOT/sft/model)")
    parser.add_argument("--student", type=Path, help="student folder (default: ROOT/distill/model)")
    parser.add_argument("--fast-pairs", type=int, default=1000, help="test pairs of the label-only fast path and the student")
    parser.add_argument("--cot-pairs", type=int, default=300, help="test pairs of full CoT generation")
    parser.add_argument("--batch-sizes", default="32,64,128,256", help="batch sizes tried for hf and the student (the best counts)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (the fastest counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-mib", type=int, default=256)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    policy, student = args.policy or args.root / "sft" / "model", args.student or args.root / "distill" / "model"
    from training.model_files import ModelFolderError, weight_files

    for what, folder in (("policy", policy), ("student", student)):
        try:
            weight_files(folder)
        except ModelFolderError as error:
            sys.exit(f"no {what} in {folder} ({error}): run `make demo` first (it writes the SFT policy and the distilled student), or pass --{what}")

    import torch

    from jobs.scoring.spec import ScorerSpec

    torch.set_num_threads(args.threads)  # here, not at import: vLLM's engine processes re-import this module
    pairs = split_pairs(args.root)
    chosen = {"full_cot": pairs[: args.cot_pairs], "fast_path": pairs[: args.fast_pairs]}
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    spec = ScorerSpec(backend="hf", model=str(policy), kv_cache_bytes=args.kv_cache_mib << 20)
    result = {"root": str(args.root), "policy": str(policy), "student": str(student), "threads": args.threads,
              "pairs": {mode: len(chosen[mode]) for mode in MODES}, "repeats": args.repeats, "settings": {}, "load": {}}
    rows = {}

    backends = {"hf": (hf_scorers(spec, batch_sizes), MODES), "vllm": (vllm_scorers(spec, args.threads, result), MODES),
                "student": (student_scorers(spec, student, batch_sizes), {"fast_path": "none"})}  # no CoT: timed on the fast path
    for name, (scorers, modes) in backends.items():
        result["settings"][name], load_before = {mode: {} for mode in modes}, _load()
        for setting, scorer in scorers:
            for mode, reasoning in modes.items():
                with_reasoning(scorer, reasoning)
                rate, table = best_rate(lambda chosen_pairs, scorer=scorer: scorer.score(chosen_pairs, DAY), chosen[mode], args.repeats)
                result["settings"][name][mode][setting] = rate
                rows[(name, setting, mode)] = table.to_pylist()
            if setting == VLLM_DEFAULTS:
                result["investigation"] = {"vllm_generation_only": generation_only(scorer, chosen["full_cot"], args.repeats)}
            scorer.close()
        result["load"][name] = {"before": load_before, "after": _load()}

    best_hf_batch = max(batch_sizes, key=lambda size: result["settings"]["hf"]["full_cot"][f"batch_size={size}"])
    result["investigation"]["hf_generation_only"] = hf_generation_only(policy, chosen["full_cot"], best_hf_batch, spec.max_new_tokens,
                                                                       spec.prompt_tokens, args.repeats)
    rates = {mode: {name: max(settings[mode].values()) for name, settings in result["settings"].items() if mode in settings} for mode in MODES}
    result["throughput_pairs_per_s"] = rates
    result["best_setting"] = {name: {mode: max(settings[mode], key=settings[mode].get) for mode in settings}
                              for name, settings in result["settings"].items()}
    result["ratios"] = {
        "vllm_over_hf_full_cot": rates["full_cot"]["vllm"] / rates["full_cot"]["hf"],
        "vllm_over_hf_fast_path": rates["fast_path"]["vllm"] / rates["fast_path"]["hf"],
        "student_over_hf_fast_path": rates["fast_path"]["student"] / rates["fast_path"]["hf"],
        "student_over_hf_full_cot": rates["fast_path"]["student"] / rates["full_cot"]["hf"],
    }
    result["targets"] = {"vllm_at_least_3x_hf_full_cot": result["ratios"]["vllm_over_hf_full_cot"] >= 3.0}
    from schemas.graph import LabelSet, ReasoningGraph

    graph, labels = ReasoningGraph.load(spec.graph), LabelSet.load(spec.label_set)
    result["agreement_hf_vllm"] = {  # hf at its best batch size against every vllm setting
        setting: {mode: agreement(rows[("hf", result["best_setting"]["hf"][mode], mode)], rows[("vllm", setting, mode)], graph, labels)
                  for mode in MODES}
        for setting in result["settings"]["vllm"]["full_cot"]}
    import vllm

    result["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "vllm": vllm.__version__, "platform": platform.platform(),
                         "load": _load()}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    plot(result, args.results.with_suffix(".png"))
    print(json.dumps({key: result[key] for key in ("throughput_pairs_per_s", "ratios", "agreement_hf_vllm", "investigation")}, indent=2))
    print(f"results: {args.results} and {args.results.with_suffix('.png')}")



def hf_scorers(spec, batch_sizes):
    from jobs.scoring.backends import HFScorer

    for size in batch_sizes:
        yield f"batch_size={size}", HFScorer(dataclasses.replace(spec, batch_size=size))


def student_scorers(spec, student: Path, batch_sizes):
    from jobs.scoring.backends import StudentScorer

    for size in batch_sizes:
        yield f"batch_size={size}", StudentScorer(dataclasses.replace(spec, backend="student", model=str(student), batch_size=size))


def vllm_scorers(spec, threads: int, result: dict):
    """The vllm settings tried, each a fresh engine (its start time goes to `result["vllm_engine_start_s"]`)."""
    from jobs.scoring.vllm_scorer import VLLMScorer

    settings = {VLLM_DEFAULTS: ({}, {}), "max_num_seqs=64": ({"max_num_seqs": 64}, {}), "async_scheduling": ({"async_scheduling": True}, {}),
                f"worker on {threads} cores": ({}, {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"})}
    result["vllm_engine_start_s"] = {}
    for name, (options, environment) in settings.items():
        saved = {key: os.environ.get(key) for key in environment}
        os.environ.update(environment)  # read by the engine's processes at start
        started = time.perf_counter()
        scorer = VLLMScorer(dataclasses.replace(spec, backend="vllm"), **options)
        result["vllm_engine_start_s"][name] = time.perf_counter() - started
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
        yield name, scorer


if __name__ == "__main__":
    main()
