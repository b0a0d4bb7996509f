"""LoRA end to end on the real-shaped checkpoint (tests/sharded_checkpoint.py: a tiny Mistral, Mistral's tekken
tokenizer, weights in shards): SFT with LoRA saves an adapter folder naming its base, GRPO continues that adapter
against the base with adapters off, `relevance score` and the distillation teacher score the adapter unmerged under a
version that covers base and adapter, and `relevance model merge` writes one folder of full weights that scores as the adapter does."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from jobs.cli import app
from jobs.scoring.backends import HFScorer
from jobs.scoring.config import ScoreConfig
from jobs.scoring.spec import ScorerSpec, scorer_version
from schemas.config import ConfigError
from schemas.storage import read_table
from schemas.tables import RELEVANCE
from training.examples import load_pairs
from training.model_files import (
    ADAPTER_BASE_FILE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    ModelFolderError,
    adapter_base,
    model_version,
    weight_files,
)

DAY = dt.date(2024, 3, 2)
LORA = {"lora": True, "lora_rank": 4, "lora_targets": ("q_proj", "v_proj")}
MERGE_TOL = 1e-5  # merged weights = base + scale * B @ A, rounded once in float32


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir()) if path.is_file()}


def validation_pairs(world: Path) -> list[dict]:
    return [{**{key: value for key, value in pair.items() if key != "gold"}, "product_content_hash": "h"}
            for pair in load_pairs(world, "wands", "validation")]


@pytest.fixture(scope="module")
def sft_adapter(sharded_policy, tiny_world, tmp_path_factory) -> Path:
    """SFT with LoRA from the sharded base, saved as an adapter folder (the default for LoRA)."""
    from training.sft import SFTConfig
    from training.sft import run as sft

    out = tmp_path_factory.mktemp("lora_sft")
    sft(SFTConfig(data=tiny_world, model=sharded_policy, out=out, order="label_first", batch_size=4, max_steps=3, warmup_steps=1,
                  lr=2e-2, val_items=2, max_new_tokens=8, eval_batch_size=2, checkpoint_every=0, threads=1, **LORA))
    return out / "model"


def test_sft_with_lora_saves_an_adapter_folder_that_names_its_base(sft_adapter, sharded_policy):
    names = {path.name for path in sft_adapter.iterdir()}
    assert {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_BASE_FILE, "policy.json", "tokenizer.json"} <= names
    assert not names & {WEIGHTS_FILE, WEIGHTS_INDEX_FILE, "config.json"}
    assert adapter_base(sft_adapter) == sharded_policy.resolve()
    assert weight_files(sft_adapter) == (*weight_files(sharded_policy), sft_adapter / ADAPTER_CONFIG_FILE, sft_adapter / ADAPTER_WEIGHTS_FILE)
    assert json.loads((sft_adapter / ADAPTER_BASE_FILE).read_text()) == {"base_model_version": model_version(sharded_policy)}
    adapter = load_file(sft_adapter / ADAPTER_WEIGHTS_FILE)
    assert {name.split(".")[-3] for name in adapter} == {"q_proj", "v_proj"}  # ...q_proj.lora_A.weight: the adapter alone
    assert any(name.endswith("lora_B.weight") and bool(tensor.abs().sum()) for name, tensor in adapter.items())


def test_grpo_continues_the_adapter_and_scores_merge_to_the_same_labels(sft_adapter, sharded_policy, tiny_world, tmp_path):
    from training.distill import TEACHER_CACHE, DistillConfig
    from training.distill import run as distill
    from training.grpo.trainer import GRPOConfig
    from training.grpo.trainer import run as grpo

    base_before = digests(sharded_policy)
    config = GRPOConfig(data=tiny_world, model=sft_adapter, out=tmp_path / "grpo", steps=1, prompts_per_step=2, group_size=2,
                        max_new_tokens=12, lr=1e-2, warmup_steps=1, beta=0.5, val_items=2, eval_batch_size=2, checkpoint_every=0,
                        threads=1)
    assert (config.lora, config.lora_rank, config.lora_alpha, config.lora_targets) == (True, 4, 16.0, ("q_proj", "v_proj"))
    grpo(config)
    continued = tmp_path / "grpo" / "model"
    records = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    # the reference is the base with adapters off, so the SFT adapter alone puts the policy away from it
    assert next(record for record in records if "train/kl" in record)["train/kl"] > 1e-4
    before, after = load_file(sft_adapter / ADAPTER_WEIGHTS_FILE), load_file(continued / ADAPTER_WEIGHTS_FILE)
    assert set(before) == set(after) and any(not before[name].equal(after[name]) for name in before)
    assert adapter_base(continued) == sharded_policy.resolve() and digests(sharded_policy) == base_before
    assert len({model_version(sharded_policy), model_version(sft_adapter), model_version(continued)}) == 3

    pairs = validation_pairs(tiny_world)[:6]
    runner = CliRunner()
    file = tmp_path / "pairs.csv"
    pa_csv.write_csv(pa.Table.from_pylist([{"query": pair["query"], "product_id": pair["product_id"]} for pair in pairs]), file)
    result = runner.invoke(app, ["score", "--date", DAY.isoformat(), "--model", str(continued), "--pairs", str(file),
                                 "--catalog", str(tiny_world), "--out", str(tmp_path / "scores")])
    assert result.exit_code == 0, result.output
    rows = read_table(RELEVANCE, tmp_path / "scores", days=[DAY])
    assert rows.num_rows == len(pairs)
    assert set(rows["model_version"].to_pylist()) == {scorer_version(ScoreConfig(date=DAY.isoformat(), model=str(continued)).spec())}

    distill(DistillConfig(data=tiny_world, teacher=continued, out=tmp_path / "distill", max_steps=1, batch_size=4, warmup_steps=0,
                          max_length=48, val_items=2, teacher_batch_size=4, eval_batch_size=4, checkpoint_every=0, threads=1))
    assert set(pq.read_table(tmp_path / "distill" / TEACHER_CACHE)["model_version"].to_pylist()) == {model_version(continued)}

    result = runner.invoke(app, ["model", "merge", "--model", str(continued), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "merged"
    assert adapter_base(merged) is None and not (merged / ADAPTER_CONFIG_FILE).exists()
    assert json.loads((merged / "policy.json").read_text()) == json.loads((continued / "policy.json").read_text())
    adapter_rows = {(row["query"], row["product_id"]): [p for _, p in row["label_probs"]] for row in rows.to_pylist()}
    merged_rows = HFScorer(ScorerSpec(backend="hf", model=str(merged))).score(pairs, DAY).to_pylist()
    assert max(abs(p - q) for row in merged_rows for p, q in zip(adapter_rows[row["query"], row["product_id"]], [p for _, p in row["label_probs"]],
                                                                  strict=True)) < MERGE_TOL


def test_an_adapter_over_a_changed_base_is_refused(sft_adapter, sharded_policy, tmp_path):
    from training.model import load_model

    base = shutil.copytree(sharded_policy, tmp_path / "base")
    adapter = shutil.copytree(sft_adapter, tmp_path / "adapter")
    config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text())
    (adapter / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, "base_model_name_or_path": "../base"}))  # relative: to the adapter
    assert adapter_base(adapter) == base.resolve()
    model_version(adapter)  # the same weights: accepted
    shard = sorted(base.glob("model-*-of-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="was trained on version"):
        load_model(adapter)
    with pytest.raises(ConfigError, match="lora: .* is a LoRA adapter folder"):
        from training.grpo.trainer import GRPOConfig

        GRPOConfig(model=sft_adapter, lora=False)
    with pytest.raises(ConfigError, match="lora_rank=8 but the adapter"):
        from training.sft import SFTConfig

        SFTConfig(model=sft_adapter, lora_rank=8)
    with pytest.raises(ConfigError, match="is not an adapter folder"):
        from training.model import ModelMergeConfig

        ModelMergeConfig(model=sharded_policy, out=tmp_path / "merged")
