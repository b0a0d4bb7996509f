"""Short runs of `relevance train grpo` on the tiny world: every estimator, the controller moving phi,
the metrics the issue asks for, LoRA with the adapters-off reference, and resume bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from schemas.config import ConfigError
from schemas.graph import ReasoningGraph
from training.examples import encode_example, load_pairs, token_node_map
from training.grpo.estimators import ESTIMATORS
from training.grpo.trainer import (
    GRPOConfig,
    advantages_for,
    rollout_batch,
    rollout_rewards,
    ruled_tokens,
    run,
    scored_batch,
    start_run,
    step_rollouts,
    uniform_groups,
)
from training.policy_format import PolicyFormat

GRAPH = ReasoningGraph.load("relevance7")


def _config(world: Path, model: Path, out: Path, **overrides) -> GRPOConfig:
    values = {
        "data": world, "model": model, "out": out, "steps": 2, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 48,
        "lr": 1e-3, "warmup_steps": 1, "val_items": 4, "eval_batch_size": 4, "checkpoint_every": 0, "threads": 1,
        "temperature": 1.2,
    }
    return GRPOConfig(**{**values, **overrides})


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_records(out: Path) -> list[dict]:
    return [record for record in _records(out) if "train/loss" in record]


def test_token_nodes_of_sampled_ids_match_the_renderer(sft_policy, tiny_world):
    from training.model import load_model

    _, tokenizer = load_model(sft_policy)
    for pair in load_pairs(tiny_world, "wands", "train")[:5]:
        example = encode_example(pair, tokenizer, GRAPH, "label_first", 48)
        assert tuple(token_node_map(tokenizer, example.target_ids, GRAPH)) == example.target_nodes


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_trains_and_logs(estimator, tiny_world, sft_policy, tmp_path):
    summary = run(_config(tiny_world, sft_policy, tmp_path / estimator, estimator=estimator, beta=0.05))
    records = _train_records(tmp_path / estimator)
    assert len(records) == 2
    for key in ("reward/outcome", "reward/format", "reward/verifier/ms", "adv/ms/mean", "adv/y/abs_mean", "train/kl",
                "train/clip_fraction", "train/entropy", "response/length", "groups/uniform_share"):
        assert key in records[-1], key
    before, after = load_file(sft_policy / "model.safetensors"), load_file(tmp_path / estimator / "model" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert summary["estimator"] == estimator and 0.0 <= summary["val"]["label_accuracy"] <= 1.0
    if estimator in ("graph_fixed", "graph_grpo"):
        assert set(summary["phi"]) == {f"{a}->{b}" for a, b in GRAPH.edges}
        assert all(f"phi/{a}->{b}" in records[-1] for a, b in GRAPH.edges)


def test_graph_grpo_moves_phi_and_graph_fixed_does_not(tiny_world, sft_policy, tmp_path):
    learned = run(_config(tiny_world, sft_policy, tmp_path / "learned", estimator="graph_grpo", steps=3, controller_lr=0.5, controller_ema=0.0))
    fixed = run(_config(tiny_world, sft_policy, tmp_path / "fixed", estimator="graph_fixed", steps=3))
    assert all(value == pytest.approx(0.5) for value in fixed["phi"].values())
    assert any(abs(value - 0.5) > 1e-3 for value in learned["phi"].values())
    assert any("phi_grad/ms->y" in record for record in _train_records(tmp_path / "learned"))


def test_class_balanced_advantages_are_the_uniform_ones_scaled_by_the_gold_labels_weight(tiny_world, sft_policy, tmp_path):
    batches, states = {}, {}
    for weighting in ("uniform", "class_balanced"):
        state = start_run(_config(tiny_world, sft_policy, tmp_path / weighting, estimator="graph_fixed", outcome_weighting=weighting))
        examples, rollouts = rollout_batch(state, 0)
        batches[weighting], states[weighting] = (examples, scored_batch(state, examples, rollouts)), state
    examples, balanced = batches["class_balanced"]
    gold = [examples[k].gold["y"] for k in balanced.rollouts.group]
    counts = {label: sum(pair["gold"]["y"] == label for pair in states["class_balanced"].train) for label in set(gold)}
    total = len(states["class_balanced"].train)
    n_classes = len({pair["gold"]["y"] for pair in states["class_balanced"].train})
    expected = torch.tensor([total / (n_classes * counts[label]) for label in gold])
    assert torch.allclose(balanced.weights, expected)
    assert torch.equal(batches["uniform"][1].weights, torch.ones(len(gold)))
    uniform_advantages, _ = advantages_for(states["uniform"], batches["uniform"][1])
    balanced_advantages, _ = advantages_for(states["class_balanced"], balanced)
    assert batches["uniform"][1].rollouts.texts == balanced.rollouts.texts  # same seed, same start: same rollouts
    assert torch.allclose(balanced_advantages, uniform_advantages * expected.unsqueeze(1))
    assert balanced_advantages.abs().sum() > 0
    assert _records(tmp_path / "class_balanced")[0]["class_weights"] == pytest.approx(states["class_balanced"].class_weights)


def test_resume_continues_bit_for_bit(tiny_world, sft_policy, tmp_path):
    whole = _config(tiny_world, sft_policy, tmp_path / "whole", steps=4, checkpoint_every=2, estimator="graph_grpo", beta=0.05, ppo_epochs=2,
                    mini_batches=2)
    run(whole)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    (tmp_path / "resumed" / "checkpoints" / "step-000002").symlink_to(tmp_path / "whole" / "checkpoints" / "step-000002")
    summary = run(_config(tiny_world, sft_policy, tmp_path / "resumed", steps=4, checkpoint_every=2, estimator="graph_grpo", beta=0.05,
                          ppo_epochs=2, mini_batches=2))
    assert summary["resumed_from"] == 2

    def curve(out):
        return [(r["train/loss"], r["reward/outcome"], r.get("phi/ms->y")) for r in _train_records(out)]

    assert curve(tmp_path / "resumed") == curve(tmp_path / "whole")[2:]
    a, b = load_file(tmp_path / "whole" / "model" / "model.safetensors"), load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_lora_trains_adapters_against_the_base_as_reference(tiny_world, sft_policy, tmp_path):
    run(_config(tiny_world, sft_policy, tmp_path / "lora", estimator="grpo", lora=True, lora_rank=4, lora_targets=("q_proj", "v_proj"),
                beta=0.1, lr=1e-2, save_merged=True))
    records = _train_records(tmp_path / "lora")
    assert records[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: policy == reference
    before, after = load_file(sft_policy / "model.safetensors"), load_file(tmp_path / "lora" / "model" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"} and changed


def test_config_errors_say_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="estimator.*graph_grpo"):
        GRPOConfig(estimator="ppo")
    with pytest.raises(ConfigError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match="mini_batches"):
        GRPOConfig(prompts_per_step=3, group_size=3, mini_batches=2)


def test_checked_rollouts_need_the_hf_backend_and_a_graph_with_checks(tmp_path):
    with pytest.raises(ConfigError, match="checked_verdicts: rollouts under checked decoding run on backend hf, not 'vllm'"):
        GRPOConfig(backend="vllm", checked_verdicts=True)
    with pytest.raises(ConfigError, match="ruled_token_credit=false needs checked_verdicts"):
        GRPOConfig(ruled_token_credit=False)
    from training_world import unruled_graph

    PolicyFormat(graph=str(unruled_graph(tmp_path)), label_set="wands", order="label_first", prompt_tokens=40).save(tmp_path)
    with pytest.raises(ConfigError, match="graph 'relevance7' declares no checks_node .* and no node with equal_parents"):
        GRPOConfig(model=tmp_path, checked_verdicts=True)


def test_checked_rollouts_never_write_a_wrong_verdict(vllm_checks_policy, tiny_world):
    """Hot samples of a relevance8 policy on queries it never saw: free, some say a wrong yes/no; checked, none does."""
    from training.cot import CheckedVerdicts, checked_rules, verdicts_follow_values
    from training.grpo.rollout import HFBackend, Sampling
    from training.model import load_model
    from training.predict import pair_prompts

    model, tokenizer = load_model(vllm_checks_policy)
    products = {pair["product_id"]: pair for pair in load_pairs(tiny_world, "wands", "train")}
    pairs = [{**product, "query": query} for query in ("blue sofa", "king bed frame", "white oak coffee table") for product in products.values()]
    prompts = pair_prompts(tokenizer, pairs, 48)
    sampling = Sampling(group_size=2, temperature=1.2, max_new_tokens=96)
    rules = checked_rules(ReasoningGraph.load("relevance8"))
    tag = rules.checks

    def wrong_verdicts(backend) -> int:
        texts = backend.generate(prompts, sampling, seed=0).texts
        return sum(not verdicts_follow_values(line, tag) for text in texts for line in text.split("\n"))

    assert wrong_verdicts(HFBackend(model, tokenizer)) > 0
    assert wrong_verdicts(HFBackend(model, tokenizer, chooser=CheckedVerdicts(tokenizer, rules))) == 0


def test_without_ruled_token_credit_the_tokens_the_rules_chose_take_no_advantage(vllm_checks_policy, tiny_world, tmp_path):
    """grpo's advantage is the group's normalised outcome on every token; with ruled_token_credit=false the same rollouts
    keep it everywhere but on the yes/no and subject-match tokens checked decoding chose."""
    advantages = {}
    for credit in (True, False):
        state = start_run(_config(tiny_world, vllm_checks_policy, tmp_path / str(credit), estimator="grpo", checked_verdicts=True,
                                  ruled_token_credit=credit, max_new_tokens=96, prompts_per_step=8, temperature=1.0))
        examples, rollouts = rollout_batch(state, 0)
        advantages[credit] = (rollouts, advantages_for(state, scored_batch(state, examples, rollouts))[0])
    (rollouts, credited), (same_rollouts, uncredited) = advantages[True], advantages[False]
    assert same_rollouts.texts == rollouts.texts
    ruled = ruled_tokens(rollouts, credited.shape[1])
    assert ruled.any() and credited[ruled].abs().sum() > 0
    assert uncredited[ruled].abs().sum() == 0 and torch.equal(uncredited[~ruled], credited[~ruled])


def test_start_policy_format_is_used_and_a_contradiction_is_refused(tmp_path):
    PolicyFormat(graph="relevance7", label_set="wands", order="reasoning_first", prompt_tokens=40).save(tmp_path)
    config = GRPOConfig(model=tmp_path)
    assert (config.graph, config.label_set, config.order, config.prompt_tokens) == ("relevance7", "wands", "reasoning_first", 40)
    with pytest.raises(ConfigError, match=r"order='label_first'.*order='reasoning_first'"):
        GRPOConfig(model=tmp_path, order="label_first")


def test_saved_policy_carries_the_start_policys_format(tiny_world, sft_policy, tmp_path):
    start = tmp_path / "start"
    shutil.copytree(sft_policy, start)
    start_format = PolicyFormat(graph="relevance7", label_set="wands", order="label_first", prompt_tokens=40)
    start_format.save(start)
    run(_config(tiny_world, start, tmp_path / "run", estimator="grpo", steps=1))
    assert PolicyFormat.load(tmp_path / "run" / "model") == start_format


def test_refill_swaps_groups_whose_outcomes_agree_for_later_groups_whose_outcomes_differ(tiny_world, sft_policy, tmp_path):
    config = _config(tiny_world, sft_policy, tmp_path / "refill", sampling_rounds=3, steps=1)
    state = start_run(config)
    draws = [rollout_batch(state, 0, draw) for draw in range(3)]  # the same weights and seeds: the batches the step draws
    uniform = [uniform_groups(rollout_rewards(state, examples, rollouts).outcome, config.group_size).tolist() for examples, rollouts in draws]
    assert any(uniform[0]) and not all(uniform[0]), "the tiny policy should give the first batch groups of both kinds"
    expected, used = [], 0
    while len(expected) < config.prompts_per_step and used < 3:
        expected += [(used, k) for k, agrees in enumerate(uniform[used]) if not agrees]
        used += 1
    padded = max(0, config.prompts_per_step - len(expected))
    expected = (expected + [(0, k) for k, agrees in enumerate(uniform[0]) if agrees])[:config.prompts_per_step]

    examples, rollouts, metrics = step_rollouts(state, 0)
    assert metrics["sampling/draws"] == used and metrics["sampling/padded"] == padded
    assert metrics["sampling/drawn_uniform_share"] == pytest.approx(sum(map(sum, uniform[:used])) / (used * config.prompts_per_step))
    assert [e.prompt_ids for e in examples] == [draws[d][0][k].prompt_ids for d, k in expected]
    assert rollouts.group == tuple(i for i in range(len(expected)) for _ in range(config.group_size))
    assert rollouts.texts == tuple(text for d, k in expected for text in draws[d][1].of_prompts([k]).texts)
    # the prompt stream advances sampling_rounds batches per step
    assert [e.prompt_ids for e in state.prompt_batch(3)] == [e.prompt_ids for e in rollout_batch(state, 1)[0]]


def test_a_refilled_run_logs_its_draws(tiny_world, sft_policy, tmp_path):
    run(_config(tiny_world, sft_policy, tmp_path / "run", sampling_rounds=2, estimator="graph_grpo", filter_uniform_groups=True))
    for record in _train_records(tmp_path / "run"):
        assert record["sampling/draws"] in (1, 2) and 0.0 <= record["sampling/drawn_uniform_share"] <= 1.0
        assert record["rollouts/kept"] == (4 - record["sampling/padded"]) * 4  # the filter drops exactly the padding
