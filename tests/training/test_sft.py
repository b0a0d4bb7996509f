"""Masked SFT: masks, schedule, metrics (worked by hand), and short runs of the whole loop."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from schemas.config import ConfigError
from schemas.graph import LabelSet, ReasoningGraph
from training.distributed import parallel_run
from training.examples import IGNORE, Example
from training.loop import learning_rate, micro_batch_indices
from training.model import load_model_to_train
from training.run_folder import CheckpointError
from training.sft import Optimisation, SFTConfig, draw_masked_nodes, example_tensors, length_sorted_parts, run, weighted_token_loss
from training.validation import cot_metrics

GRAPH = ReasoningGraph.load("relevance7")
EXAMPLE = Example(
    query_id="q", product_id="p", prompt_ids=(1, 2, 3), target_ids=(10, 11, 12, 13, 14, 15, 2),
    target_nodes=("y", "y", None, "ms", None, "qs", None), gold={},
)


def test_prompt_is_ignored_and_masked_nodes_drop_out():
    ids, labels, weights = example_tensors(EXAMPLE, [], None)
    assert ids == [1, 2, 3, 10, 11, 12, 13, 14, 15, 2]
    assert labels == [IGNORE] * 3 + [10, 11, 12, 13, 14, 15, 2]
    assert weights == [0.0] * 3 + [1.0] * 7
    ids, labels, weights = example_tensors(EXAMPLE, ["ms", "qs"], None)
    assert ids == [1, 2, 3, 10, 11, 12, 13, 14, 15, 2]
    assert labels == [IGNORE] * 3 + [10, 11, 12, IGNORE, 14, IGNORE, 2]
    assert weights == [0.0] * 3 + [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    ids, labels, _ = example_tensors(EXAMPLE, ["qs"], 99)
    assert ids == [1, 2, 3, 10, 11, 12, 13, 14, 99, 2]
    assert labels == [IGNORE] * 3 + [10, 11, 12, 13, 14, IGNORE, 2]


def test_decision_tokens_weigh_more_and_the_loss_is_their_weighted_mean():
    _, labels, weights = example_tensors(EXAMPLE, [], None, {"y": 4.0, "ms": 4.0})
    assert weights == [0.0] * 3 + [4.0, 4.0, 1.0, 4.0, 1.0, 1.0, 1.0]
    logits = torch.randn(1, len(labels), 20)
    labels_tensor, weights_tensor = torch.tensor([labels]), torch.tensor([weights])
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], labels_tensor[0, 1:], ignore_index=IGNORE, reduction="none")
    expected = (per_token * weights_tensor[0, 1:]).sum() / weights_tensor[0, 1:].sum()
    assert weighted_token_loss(logits, labels_tensor, weights_tensor, float(weights_tensor[0, 1:].sum())) == pytest.approx(float(expected))
    unweighted = torch.ones_like(weights_tensor) * (labels_tensor != IGNORE)
    mean = torch.nn.functional.cross_entropy(logits[0, :-1], labels_tensor[0, 1:], ignore_index=IGNORE)
    assert weighted_token_loss(logits, labels_tensor, unweighted, float(unweighted[0, 1:].sum())) == pytest.approx(float(mean))
    with pytest.raises(ConfigError, match="decision_weight"):
        SFTConfig(decision_weight=0)


def test_mask_draws_never_include_y_and_follow_p_mask():
    reasoning = [n for n in GRAPH.node_names if n != GRAPH.label_node]
    generator = torch.Generator().manual_seed(0)
    assert draw_masked_nodes(reasoning, 1.0, generator) == reasoning
    assert draw_masked_nodes(reasoning, 0.0, generator) == []
    draws = [len(draw_masked_nodes(reasoning, 0.3, generator)) for _ in range(2000)]
    assert sum(draws) / (2000 * len(reasoning)) == pytest.approx(0.3, abs=0.02)


def test_each_epoch_visits_every_example_once():
    seen = [i for micro in range(5) for i in micro_batch_indices(micro, 10, 4, seed=3)]  # 20 = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]


def test_learning_rate_by_hand():
    assert learning_rate(0, 1.0, 4, 14, 0.1) == pytest.approx(0.25)
    assert learning_rate(3, 1.0, 4, 14, 0.1) == pytest.approx(1.0)
    assert learning_rate(9, 1.0, 4, 14, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert learning_rate(14, 1.0, 4, 14, 0.1) == pytest.approx(0.1)


def test_metrics_by_hand():
    labels = LabelSet.load("wands")
    gold = {"qs": "sofa", "qa": "none", "ps": "sofa", "pa": "color=gray; material=wool", "ms": "match", "ma": "none", "y": "Exact"}
    perfect = "y: Exact\nms: match\nma: none\nqs: sofa\nqa: none\nps: sofa\npa: material=wool; color=gray"
    wrong_label = perfect.replace("y: Exact", "y: Partial")
    no_eos = perfect
    broken = "y: Exact\nms: match\njunk"
    golds = [gold, gold, gold, {**gold, "y": "Irrelevant"}]
    metrics = cot_metrics([(perfect, True), (wrong_label, True), (no_eos, False), (broken, True)], golds, GRAPH, "label_first", labels)
    assert metrics["parse_rate"] == 0.5  # perfect and wrong_label; no_eos lacks EOS, broken lacks lines
    assert metrics["label_accuracy"] == 0.5  # predictions Exact, Partial, Exact, Exact vs E, E, E, I
    # Exact: tp 2, fp 1, fn 1 -> F1 2/3; Partial: tp 0 -> 0; Irrelevant: tp 0 -> 0
    assert metrics["label_macro_f1"] == pytest.approx((2 / 3) / 3)
    assert metrics["node_accuracy/pa"] == 0.75  # facets compared as sets; `broken` has no pa
    assert metrics["node_accuracy/ms"] == 1.0


def test_majority_baseline_by_hand():
    from training.validation import majority_baseline

    labels = LabelSet.load("wands")
    baseline = majority_baseline(["Exact", "Exact", "Partial"], ["Exact", "Partial", "Irrelevant"], labels)
    # always Exact: 1 of 3 right; Exact precision 1/3, recall 1 -> F1 1/2; the other labels 0
    assert baseline == {"label": "Exact", "label_accuracy": pytest.approx(1 / 3), "label_macro_f1": pytest.approx(0.5 / 3)}
    assert majority_baseline(["Partial", "Exact"], ["Exact"], labels)["label"] == "Exact"  # a tie goes to label set order


def test_config_errors_say_how_to_fix():
    with pytest.raises(ConfigError, match="p_mask"):
        SFTConfig(p_mask=1.5)
    with pytest.raises(ConfigError, match="no order 'sideways'"):
        SFTConfig(order="sideways")


def _config(world: Path, model: Path, out: Path, **overrides) -> SFTConfig:
    values = {
        "data": world, "model": model, "out": out, "prompt_tokens": 48, "batch_size": 8, "max_steps": 6,
        "warmup_steps": 1, "lr": 5e-3, "val_items": 4, "max_new_tokens": 8,
        "eval_batch_size": 4, "checkpoint_every": 0, "threads": 1,
    }
    return SFTConfig(**{**values, **overrides})


def _records(out: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record[key] for record in records if key in record]


def _losses(out: Path) -> list[float]:
    return _records(out, "loss")


def test_smoke_parameters_change_and_loss_goes_down(tiny_world, tiny_model, tmp_path):
    summary = run(_config(tiny_world, tiny_model, tmp_path / "run", max_steps=10))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 10 and losses[-1] < losses[0] - 0.5
    before, after = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(not torch.equal(before[name], after[name]) for name in before)
    assert 0.0 <= summary["val"]["parse_rate"] <= 1.0 and summary["val"]["n"] == 4


def test_resume_continues_bit_for_bit(tiny_world, tiny_model, tmp_path):
    whole = _config(tiny_world, tiny_model, tmp_path / "whole", checkpoint_every=3, p_mask=0.5, mask_input=True, grad_accum=2)
    run(whole)
    resumed = _config(tiny_world, tiny_model, tmp_path / "resumed", checkpoint_every=3, p_mask=0.5, mask_input=True, grad_accum=2)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    source = tmp_path / "whole" / "checkpoints" / "step-000003"
    (tmp_path / "resumed" / "checkpoints" / "step-000003").symlink_to(source)
    summary = run(resumed)
    assert summary["resumed_from"] == 3
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "whole")[3:]
    a, b = load_file(tmp_path / "whole" / "model" / "model.safetensors"), load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    # the same out with another masking rate is another run: refused, not continued from this one's state
    with pytest.raises(CheckpointError, match=r"step-000006/state.pt: refused to resume: written by a run with other settings \(p_mask 0.5 -> 0.3\)"):
        run(dataclasses.replace(resumed, p_mask=0.3))


def test_gradient_checkpointing_recomputes_the_same_steps(tiny_world, tiny_model, tmp_path):
    run(_config(tiny_world, tiny_model, tmp_path / "kept", max_steps=3))
    run(_config(tiny_world, tiny_model, tmp_path / "recomputed", max_steps=3, gradient_checkpointing=True))
    assert _losses(tmp_path / "recomputed") == _losses(tmp_path / "kept")
    a, b = load_file(tmp_path / "kept" / "model" / "model.safetensors"), load_file(tmp_path / "recomputed" / "model" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_length_split_passes_take_the_one_pass_steps(tiny_world, tiny_model, tmp_path):
    run(_config(tiny_world, tiny_model, tmp_path / "one_pass", max_steps=3, length_splits=1))
    run(_config(tiny_world, tiny_model, tmp_path / "split", max_steps=3, length_splits=3))
    assert _losses(tmp_path / "split") == pytest.approx(_losses(tmp_path / "one_pass"), rel=1e-5)  # one sum, added in another order
    assert _records(tmp_path / "split", "grad_norm") == pytest.approx(_records(tmp_path / "one_pass", "grad_norm"), rel=1e-5)
    one_pass, split = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("one_pass", "split"))
    # Adam divides by the root of the squared gradient, so an entry whose gradient is near zero moves on rounding noise:
    # after 3 steps of lr 5e-3 the worst weight was 1.8e-5 apart on an AMD EPYC, 1.4e-6 on the CPU before it
    assert all(torch.allclose(split[name], one_pass[name], atol=1e-4) for name in one_pass)


def test_compiled_training_takes_the_eager_steps(tiny_world, tiny_model, tmp_path):
    run(_config(tiny_world, tiny_model, tmp_path / "eager", max_steps=3))
    run(_config(tiny_world, tiny_model, tmp_path / "compiled", max_steps=3, compile=True))
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4)  # fused kernels round differently
    a, b = load_file(tmp_path / "eager" / "model" / "model.safetensors"), load_file(tmp_path / "compiled" / "model" / "model.safetensors")
    assert all(torch.allclose(a[name], b[name], atol=1e-4) for name in a)
    assert any(not torch.equal(a[name], load_file(tiny_model / "model.safetensors")[name]) for name in a)  # and it did train
    model, _ = load_model_to_train(tiny_model)
    with parallel_run(torch.device("cpu"), "ddp") as parallel:
        trained = Optimisation.create(model, _config(tiny_world, tiny_model, tmp_path / "unused", compile=True), parallel, None).trained
    assert trained._orig_mod is model  # the steps above went through torch.compile's wrapper, not the eager module


def test_lora_trains_only_the_adapted_modules(tiny_world, tiny_model, tmp_path):
    run(_config(tiny_world, tiny_model, tmp_path / "lora", lora=True, lora_rank=4, lora_targets=("q_proj", "v_proj"), max_steps=3,
                save_merged=True))
    before, after = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / "lora" / "model" / "model.safetensors")
    assert set(before) == set(after)  # merged back into a plain model
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"}


def test_left_padded_batches_decode_like_single_prompts(tiny_model):
    from training.decoding import generate as generations
    from training.model import load_model

    model, tokenizer = load_model(tiny_model)

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size):  # (text, ended) per prompt
        out = generations(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return list(zip(out.texts, out.ended))

    prompts = [[1, 5, 6, 7], [1, 8, 9, 10, 11, 12, 13, 14], [1, 20]]
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert batched == [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]


def test_pairs_are_the_split_rows_with_nodes_and_brand_as_a_facet(tiny_world):
    from training_world import VALIDATION_QUERIES

    from training.examples import load_pairs

    train = {(p["query_id"], p["product_id"]): p for p in load_pairs(tiny_world, "wands", "train")}
    validation = load_pairs(tiny_world, "wands", "validation")
    assert len(train) == 32 and len(validation) == 16  # the weak q7 row has no nodes: skipped
    assert {p["query_id"] for p in validation} == set(VALIDATION_QUERIES)
    gray_sofa = train[("q1", "p1")]
    assert gray_sofa["query"] == "gray sofa" and gray_sofa["title"] == "Gray wool sofa by Acme"
    assert gray_sofa["attributes"] == {"color": "gray", "material": "wool", "brand": "Acme"}
    assert gray_sofa["gold"]["pa"] == "brand=Acme; color=gray; material=wool" and gray_sofa["gold"]["y"] == "Exact"
    with pytest.raises(ValueError, match="no 'train' rows with label_set='esci'"):
        load_pairs(tiny_world, "esci", "train")


def test_device_and_precision_resolution_on_this_machine():
    import torch

    from training.loop import resolve_device

    assert resolve_device("cpu", "auto") == (torch.device("cpu"), None)
    assert resolve_device("cpu", "fp32") == (torch.device("cpu"), None)
    with pytest.raises(ConfigError, match="precision=bf16 needs a GPU"):
        resolve_device("cpu", "bf16")
    with pytest.raises(ConfigError, match="precision"):
        SFTConfig(precision="fp8")


def test_the_saved_policy_says_how_it_was_trained(tiny_world, tiny_model, tmp_path):
    from training.policy_format import PolicyFormat

    run(_config(tiny_world, tiny_model, tmp_path / "run", max_steps=1, order="reasoning_first", prompt_tokens=40))
    assert PolicyFormat.load(tmp_path / "run" / "model") == PolicyFormat(
        graph="relevance8", label_set="wands", order="reasoning_first", prompt_tokens=40
    )


def test_length_sorted_parts_keep_every_row_once_and_split_as_evenly_as_the_rows_allow():
    rows = [([0] * n, [0] * n, [1.0] * n) for n in (5, 2, 9, 3, 7)]
    parts = length_sorted_parts(rows, 2)
    assert [[len(ids) for ids, _, _ in part] for part in parts] == [[2, 3, 5], [7, 9]]
    assert [len(part) for part in length_sorted_parts(rows, 4)] == [2, 1, 1, 1]
    assert [len(part) for part in length_sorted_parts(rows[:2], 4)] == [1, 1]  # fewer rows than parts: no empty pass
