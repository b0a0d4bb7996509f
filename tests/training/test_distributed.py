"""Training on several processes: the pieces on one process (shares of a split batch sum to the whole, the
checkpoint layout, the refusals), then `torchrun --nproc_per_node 2 -m jobs.cli train ...` on this CPU (gloo)
against one process with the same global batch.

Tolerance: two processes sum the same per-example terms in another order (each rank's share, then the
all-reduce) and pad their shares to other widths, so losses and weights agree to float rounding, not bit
for bit. The tests allow 1e-5 relative on losses and gradient norms (GRPO's PPO losses, sums of terms
that nearly cancel, also 1e-6 absolute) and 1e-6 absolute plus 1e-5 relative on weights and phi after a
few AdamW steps of lr 5e-3 or 1e-3: Adam divides each gradient by its running root mean square, so the
rounding of near-zero gradients moves weights by a small fraction of lr. Measured here: losses within
1.3e-7 relative (SFT, DDP and FSDP), 4e-8 (distillation), 5e-8 absolute (GRPO); weights within 3.1e-7
absolute (all), phi within 7e-7. A run resumed on the same world size continues bit for bit, as on one
process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from schemas.config import ConfigError, config_to_dict
from training.sft import SFTConfig
from training.sft import run as run_sft

REPO = Path(__file__).resolve().parents[2]
LOSS_RTOL = 1e-5
# Adam divides by the root of the squared gradient, so an entry whose gradient is near zero moves by up to the learning rate
# on summation-order noise: with the shares in length-sorted passes one weight of 2048 ended 1.4e-6 apart (lr 5e-3)
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 1e-5
# phi moves by the controller's estimate of how the main loss changed, a difference of two close losses: the
# summation order of two processes (1e-7 relative in a loss) reaches it as about 1e-4 relative on one CPU and 2.1e-3
# on an AMD EPYC (a phi of 0.5 moved by 1.1e-3)
PHI_RTOL = 1e-2
# from the second step on, a GRPO step's loss is weighted by phi, whose drift reaches the step's records as 2.1e-5
# relative on an AMD EPYC
PHI_WEIGHTED_RTOL = 1e-4



def torchrun(command: list[str], config, tmp_path: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """`relevance <command> --config <config as YAML>` under torchrun with `processes` CPU processes of one thread each."""
    path = tmp_path / f"{Path(config.out).name}.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                           "-m", "jobs.cli", *command, "--config", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def records(out: Path, key: str) -> list[float]:
    return [record[key] for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in record]


def assert_same_weights(a: Path, b: Path, exact: bool = False) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(first) == set(second)
    for name in first:
        if exact:
            assert torch.equal(first[name], second[name]), name
        else:
            torch.testing.assert_close(first[name], second[name], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


def link_checkpoint(source: Path, out: Path, step: int) -> None:
    """`out` starts as a run stopped at `step`: its checkpoint is `source`'s."""
    name = f"step-{step:06d}"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / name).symlink_to(source / "checkpoints" / name)


# ---------------------------------------------------------------- the pieces, on one process


def test_shares_cover_the_batch_in_order():
    from training.distributed import Parallel

    shares = [Parallel(device=None, rank=rank, world_size=3).part(7) for rank in range(3)]
    assert [list(range(7))[share] for share in shares] == [[0, 1], [2, 3], [4, 5, 6]]
    with pytest.raises(ConfigError, match="batch_size: 6 is the global batch, split over 4 processes"):
        Parallel(device=None, world_size=4).require_divisible("batch_size", 6)


def test_policy_loss_shares_of_a_split_mini_batch_sum_to_the_whole():
    from training.grpo.loss import StepParams, aggregation_weights, policy_loss, token_shares

    torch.manual_seed(0)
    mask = torch.rand(5, 6) > 0.3
    logprobs, sampling, ref = (-torch.rand(5, 6) for _ in range(3))
    advantages = torch.randn(5, 6)
    for aggregation in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        params = StepParams(beta=0.1, aggregation=aggregation)
        whole_loss, whole = policy_loss(logprobs, sampling, advantages, mask, params, ref)
        weights, shares = aggregation_weights(mask, aggregation), token_shares(mask)
        parts = [policy_loss(logprobs[rows], sampling[rows], advantages[rows], mask[rows], params, ref[rows], weights=weights[rows],
                             token_share=shares[rows]) for rows in (slice(0, 2), slice(2, 5))]
        assert float(sum(loss for loss, _ in parts)) == pytest.approx(float(whole_loss), rel=1e-6)
        for key, value in whole.items():
            assert float(sum(metrics[key] for _, metrics in parts)) == pytest.approx(float(value), rel=1e-6), (aggregation, key)


def test_distill_loss_shares_of_a_split_batch_sum_to_the_whole():
    from training.distill import IGNORE, distill_loss, target_counts

    torch.manual_seed(0)
    logits = {"y": torch.randn(6, 3), "ms": torch.randn(6, 3)}
    teacher_probs = torch.softmax(torch.randn(6, 3), dim=-1)
    teacher = {"y": torch.full((6,), IGNORE), "ms": torch.tensor([0, IGNORE, 2, 1, IGNORE, IGNORE])}
    gold = {"y": torch.tensor([0, 2, IGNORE, 1, 1, 0]), "ms": torch.tensor([1, 2, 0, IGNORE, 0, 1])}
    options = {"label_node": "y", "temperature": 2.0, "gold_weight": 0.3, "node_weight": 0.5}
    whole_loss, whole = distill_loss(logits, teacher_probs, teacher, gold, **options)
    counts = target_counts(teacher, gold, "y")
    assert counts == {"y_kl": 6.0, "y_gold": 5.0, "ms_teacher": 3.0, "ms_gold": 5.0}

    def part(rows: slice):
        return distill_loss({k: v[rows] for k, v in logits.items()}, teacher_probs[rows], {k: v[rows] for k, v in teacher.items()},
                            {k: v[rows] for k, v in gold.items()}, counts=counts, **options)

    parts = [part(slice(0, 4)), part(slice(4, 6))]  # the second share has no teacher target for ms
    assert float(sum(loss for loss, _ in parts)) == pytest.approx(float(whole_loss), rel=1e-6)
    for key, value in whole.items():
        assert sum(metrics[key] for _, metrics in parts) == pytest.approx(value, rel=1e-6), key


def test_a_gathered_optimizer_state_takes_the_single_process_layout():
    """What FSDP checkpoints write (torch.distributed.checkpoint's full optimizer state, keyed by name) re-keyed by
    index is `Optimizer.state_dict()`, so one-process runs load it and it loads into any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from training.distributed import _keyed_by_index

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    _, by_name = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    assert str(_keyed_by_index(by_name)) == str(optimizer.state_dict())


def test_torchrun_processes_take_the_gpu_of_their_local_rank_or_the_cpu(monkeypatch):
    from training.distributed import local_device

    assert local_device("cuda:1") == "cuda:1"  # one process: the setting as given
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("cuda") == "cuda:1"
    assert local_device("cpu") == "cpu"
    assert local_device("auto") == ("cuda:1" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        local_device("cuda:0")


def test_settings_a_sharded_run_cannot_take_are_refused(sft_policy, tmp_path):
    from training.distributed import Parallel
    from training.grpo.trainer import GRPOConfig, start_run

    with pytest.raises(ConfigError, match="parallel"):
        SFTConfig(parallel="zero3")
    with pytest.raises(ConfigError, match="bf16 with parallel=fsdp"):
        SFTConfig(parallel="fsdp", precision="fp16")
    sharded = Parallel(device=torch.device("cpu"), mode="fsdp", rank=0, world_size=2)  # refused before any collective
    with pytest.raises(ConfigError, match="graph_grpo's controller"):
        start_run(GRPOConfig(model=sft_policy, out=tmp_path, estimator="graph_grpo", parallel="fsdp"), sharded)
    with pytest.raises(ConfigError, match="prompts_per_step: 3"):
        start_run(GRPOConfig(model=sft_policy, out=tmp_path, prompts_per_step=3), sharded)


# ---------------------------------------------------------------- SFT


def sft_config(world: Path, model: Path, out: Path, **overrides) -> SFTConfig:
    # grad_accum 2 and p_mask 0.5: the shares cut micro-batches whose masks are drawn for the whole micro-batch; length_splits 2:
    # each process's share in two passes (as many on every process, which FSDP's collectives need)
    values = {"data": world, "model": model, "out": out, "batch_size": 8, "grad_accum": 2, "length_splits": 2, "max_steps": 4, "warmup_steps": 1, "lr": 5e-3,
              "p_mask": 0.5, "val_items": 4, "max_new_tokens": 8, "eval_batch_size": 4, "checkpoint_every": 2, "threads": 1}
    return SFTConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def sft_runs(tiny_world, tiny_model, tmp_path_factory) -> dict[str, Path]:
    """An SFT run on one process and the same run on two (DDP), 4 steps, checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("sft_runs")
    run_sft(sft_config(tiny_world, tiny_model, root / "one"))
    torchrun(["train", "sft"], sft_config(tiny_world, tiny_model, root / "two"), root)
    return {"one": root / "one", "two": root / "two", "root": root}


@pytest.mark.slow
def test_sft_on_two_processes_takes_the_steps_of_one(sft_runs):
    one, two = records(sft_runs["one"], "loss"), records(sft_runs["two"], "loss")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    # the gradient of the whole batch (Adam's steps barely see its scale; the norm does)
    assert records(sft_runs["two"], "grad_norm") == pytest.approx(records(sft_runs["one"], "grad_norm"), rel=LOSS_RTOL)
    assert records(sft_runs["two"], "tokens") == records(sft_runs["one"], "tokens")  # the whole step's tokens, not a share's
    assert_same_weights(sft_runs["one"] / "model", sft_runs["two"] / "model")
    assert json.loads((sft_runs["two"] / "metrics.jsonl").read_text().splitlines()[0])["processes"] == 2  # one writer, one log


@pytest.mark.slow
def test_sft_launches_its_own_processes_and_takes_the_steps_of_one(sft_runs, tiny_world, tiny_model, monkeypatch):
    """`processes=2` without torchrun: the command starts the two processes itself (torch's elastic launcher) and
    returns rank 0's summary; the run is the one torchrun's two processes take."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = sft_runs["root"] / "launched"
    summary = run_sft(sft_config(tiny_world, tiny_model, out, processes=2))
    assert summary["steps"] == 4 and summary["val"]["n"] == 4
    assert records(out, "loss") == records(sft_runs["two"], "loss")
    assert_same_weights(sft_runs["two"] / "model", out / "model", exact=True)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["processes"] == 2
    with pytest.raises(ConfigError, match="batch_size: 8 is the global batch, split over 3 processes"):
        run_sft(sft_config(tiny_world, tiny_model, sft_runs["root"] / "refused", processes=3))


@pytest.mark.slow
def test_a_two_process_sft_run_resumes_on_two_processes_or_one(sft_runs, tiny_world, tiny_model):
    root = sft_runs["root"]
    link_checkpoint(sft_runs["two"], root / "resumed_two", 2)
    torchrun(["train", "sft"], sft_config(tiny_world, tiny_model, root / "resumed_two"), root)
    assert records(root / "resumed_two", "loss") == records(sft_runs["two"], "loss")[2:]
    assert_same_weights(sft_runs["two"] / "model", root / "resumed_two" / "model", exact=True)

    link_checkpoint(sft_runs["two"], root / "resumed_one", 2)
    assert run_sft(sft_config(tiny_world, tiny_model, root / "resumed_one"))["resumed_from"] == 2
    assert records(root / "resumed_one", "loss") == pytest.approx(records(sft_runs["two"], "loss")[2:], rel=LOSS_RTOL)
    assert_same_weights(sft_runs["two"] / "model", root / "resumed_one" / "model")


@pytest.mark.slow
def test_fsdp_takes_the_steps_of_one_process_and_its_checkpoints_resume_anywhere(sft_runs, tiny_world, tiny_model):
    """FSDP2 (fully_shard) on two processes: the steps of one process; its checkpoint (gathered from the shards) resumes
    on one process, and a one-process checkpoint resumes sharded."""
    root = sft_runs["root"]
    torchrun(["train", "sft"], sft_config(tiny_world, tiny_model, root / "fsdp", parallel="fsdp"), root)
    assert records(root / "fsdp", "loss") == pytest.approx(records(sft_runs["one"], "loss"), rel=LOSS_RTOL)
    assert_same_weights(sft_runs["one"] / "model", root / "fsdp" / "model")

    link_checkpoint(root / "fsdp", root / "fsdp_then_one", 2)
    run_sft(sft_config(tiny_world, tiny_model, root / "fsdp_then_one"))
    assert_same_weights(sft_runs["one"] / "model", root / "fsdp_then_one" / "model")

    link_checkpoint(sft_runs["one"], root / "one_then_fsdp", 2)
    torchrun(["train", "sft"], sft_config(tiny_world, tiny_model, root / "one_then_fsdp", parallel="fsdp"), root)
    assert records(root / "one_then_fsdp", "loss") == pytest.approx(records(sft_runs["one"], "loss")[2:], rel=LOSS_RTOL)
    assert_same_weights(sft_runs["one"] / "model", root / "one_then_fsdp" / "model")


# ---------------------------------------------------------------- distillation


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A one-layer, 16-wide BERT with the MiniLM tokenizer (as in test_distill.py), without dropout (see below)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from training.student import default_encoder

    folder = tmp_path_factory.mktemp("tiny_encoder")
    tokenizer = AutoTokenizer.from_pretrained(default_encoder())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_distillation_on_two_processes_takes_the_steps_of_one(parallel, tiny_world, tiny_model, tiny_encoder, tmp_path):
    """Dropout 0 (the heads' and the encoder's): each process draws its own dropout masks, the one thing that differs from
    one process by design."""
    from training.distill import TEACHER_CACHE, DistillConfig
    from training.distill import run as run_distill

    def config(out: Path) -> DistillConfig:
        return DistillConfig(data=tiny_world, teacher=tiny_model, encoder=tiny_encoder, out=out, max_steps=4, batch_size=8, warmup_steps=1,
                             lr=1e-3, head_lr=1e-2, max_length=48, dropout=0.0, checkpoint_every=2, val_items=0, teacher_batch_size=16,
                             threads=1, parallel=parallel)

    one = run_distill(config(tmp_path / "one"))
    torchrun(["train", "distill"], config(tmp_path / "two"), tmp_path)
    assert records(tmp_path / "two", "loss") == pytest.approx(records(tmp_path / "one", "loss"), rel=LOSS_RTOL)
    for key in ("loss/ma_gold", "loss/y_kl", "grad_norm"):
        assert records(tmp_path / "two", key) == pytest.approx(records(tmp_path / "one", key), rel=LOSS_RTOL), key
    assert_same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["val"] == pytest.approx(one["val"])
    # the teacher targets were scored half by each process and written once, in the order one process writes them
    import pyarrow.parquet as pq

    one_rows, two_rows = (pq.read_table(tmp_path / run / TEACHER_CACHE).to_pylist() for run in ("one", "two"))
    assert [(r["query_id"], r["product_id"], r["node_decisions"]) for r in two_rows] == [
        (r["query_id"], r["product_id"], r["node_decisions"]) for r in one_rows]
    assert [p for r in two_rows for _, p in r["label_probs"]] == pytest.approx([p for r in one_rows for _, p in r["label_probs"]])
    if parallel == "ddp":  # `processes=2` without torchrun starts the two processes itself: torchrun's run
        launched = run_distill(dataclasses.replace(config(tmp_path / "launched"), processes=2))
        assert launched["steps"] == 4 and records(tmp_path / "launched", "loss") == records(tmp_path / "two", "loss")
        assert_same_weights(tmp_path / "two" / "model", tmp_path / "launched" / "model", exact=True)


# ---------------------------------------------------------------- GRPO


def grpo_values(world: Path, policy: Path, out: Path, **overrides) -> dict:
    values = {"data": str(world), "model": str(policy), "out": str(out), "steps": 2, "prompts_per_step": 4, "group_size": 4,
              "max_new_tokens": 48, "lr": 1e-3, "warmup_steps": 1, "val_items": 4, "eval_batch_size": 4, "checkpoint_every": 0, "threads": 1,
              "temperature": 1.2, "beta": 0.05, "device": "cpu"}
    return {**values, **overrides}


@pytest.fixture(scope="module")
def grpo_runs(tiny_world, sft_policy, tmp_path_factory) -> dict:
    """GRPO scenarios on two processes in one torchrun launch (tests/training/distributed_grpo.py), each process's
    policy and phi saved. `update`: the rollouts one process draws, the update split over the two (graph_grpo
    with its controller every step, the reference, 2 PPO epochs x 2 mini-batches, the uniform-group filter);
    `fsdp`: the same with FSDP2 and graph_fixed, one rollout per mini-batch (one process trains on a rollout
    that weighs 0); `sync`: as `relevance train grpo` runs (each process samples its prompts), graph_grpo,
    refilling groups whose outcomes agree from up to 3 prompt batches, a checkpoint after step 1; `resumed`: `sync` resumed from that checkpoint."""
    root = tmp_path_factory.mktemp("grpo_runs")
    controller = {"estimator": "graph_grpo", "controller_every": 1, "controller_lr": 0.5, "controller_ema": 0.0}
    configs = {
        "update": grpo_values(tiny_world, sft_policy, root / "update", **controller, ppo_epochs=2, mini_batches=2, filter_uniform_groups=True),
        "fsdp": grpo_values(tiny_world, sft_policy, root / "fsdp", estimator="graph_fixed", parallel="fsdp", mini_batches=16),
        "sync": grpo_values(tiny_world, sft_policy, root / "sync", **controller, checkpoint_every=1, sampling_rounds=3),
        "resumed": grpo_values(tiny_world, sft_policy, root / "resumed", **controller, checkpoint_every=1, sampling_rounds=3),
    }
    modes = {"update": "same_rollouts", "fsdp": "same_rollouts", "sync": "own_rollouts", "resumed": "own_rollouts"}
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    (root / "resumed" / "checkpoints" / "step-000001").symlink_to(root / "sync" / "checkpoints" / "step-000001")  # written by `sync`
    scenarios = [{"config": configs[name], "mode": modes[name], "dump": str(root / "dumps" / name)} for name in configs]
    (root / "scenarios.json").write_text(json.dumps(scenarios))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("distributed_grpo.py")), str(root / "scenarios.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    dumps = {name: [torch.load(root / "dumps" / name / f"rank-{rank}.pt", weights_only=True) for rank in (0, 1)] for name in configs}
    return {"root": root, "configs": configs, "dumps": dumps}


def assert_close_states(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["update", "fsdp"])
def test_grpo_update_split_over_two_processes_is_the_one_process_update(scenario, grpo_runs, tmp_path):
    from distributed_grpo import run_steps

    from training.grpo.trainer import GRPOConfig

    one = run_steps(GRPOConfig(**{**grpo_runs["configs"][scenario], "out": tmp_path / "one"}), "same_rollouts")
    two = grpo_runs["dumps"][scenario]
    for rank in (0, 1):
        assert_close_states(one["model"], two[rank]["model"])
        torch.testing.assert_close(one["phi"], two[rank]["phi"], rtol=PHI_RTOL, atol=WEIGHT_ATOL)
    out = grpo_runs["root"] / scenario
    for key in ("train/loss", "train/grad_norm", "train/kl", "train/clip_fraction", "train/entropy", "reward/outcome", "adv/y/abs_mean",
                "rollouts/kept"):
        assert records(out, key) == pytest.approx(records(tmp_path / "one", key), rel=PHI_WEIGHTED_RTOL, abs=1e-5), key
    if scenario == "update":
        assert any(abs(value - 0.5) > 1e-3 for value in one["phi"].tolist())  # the controller moved phi, the same way on both


@pytest.mark.slow
def test_grpo_processes_stay_in_sync_and_resume_bit_for_bit(grpo_runs):
    """Each process samples its own prompts' rollouts; the all-gathered batches (the refill's choice made from them),
    the summed controller gradient and DDP keep policies and phi identical on both, and a run resumed from a
    checkpoint continues bit for bit."""
    for name in ("sync", "resumed"):
        first, second = grpo_runs["dumps"][name]
        assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
        assert torch.equal(first["phi"], second["phi"])
    sync, resumed = grpo_runs["dumps"]["sync"][0], grpo_runs["dumps"]["resumed"][0]
    assert all(torch.equal(sync["model"][k], resumed["model"][k]) for k in sync["model"])
    assert torch.equal(sync["phi"], resumed["phi"]) and any(abs(value - 0.5) > 1e-3 for value in sync["phi"].tolist())
    out = grpo_runs["root"]
    assert records(out / "resumed", "train/loss") == records(out / "sync", "train/loss")[1:]
    assert records(out / "sync", "rollouts/kept") == [16, 16]  # the whole step's rollouts, written once
    assert records(out / "resumed", "sampling/draws") == records(out / "sync", "sampling/draws")[1:]
