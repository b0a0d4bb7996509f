"""Real checkpoint folders through the commands that load a model: a tiny Mistral on Mistral's production
tokenizer, its weights in shards (tests/sharded_checkpoint.py), trained by SFT, continued by Graph-GRPO,
distilled from and scored by `relevance score`, each from a sharded folder; its version covers every shard
and an adapter beside them; a truncated or missing shard is named before any work."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sharded_checkpoint import reshard
from typer.testing import CliRunner

from jobs.cli import app
from jobs.scoring.config import ScoreConfig
from jobs.scoring.spec import ScorerSpec, check_model_folder, scorer_version
from schemas.config import ConfigError
from schemas.graph import LabelSet
from schemas.storage import read_table, write_table
from schemas.tables import CANDIDATE_PAIRS, CATALOG, QUERIES, RELEVANCE
from training.model_files import WEIGHTS_FILE, WEIGHTS_INDEX_FILE, ModelFolderError, model_version, weight_files

DAY = dt.date(2024, 3, 2)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*-of-*.safetensors"))


def write_candidates(root: Path, world: Path) -> int:
    """Every (query, product) of the tiny world as DAY's candidate pairs; their count."""
    products = read_table(CATALOG, world)["product_id"].to_pylist()
    rows = [{"query": query["query"], "query_id": query["query_id"], "product_id": product, "product_content_hash": f"{product}-v1",
             "impressions": 1, "ds": DAY}
            for query in read_table(QUERIES, world).to_pylist() for product in products]
    write_table(CANDIDATE_PAIRS, pa.Table.from_pylist(rows, schema=CANDIDATE_PAIRS.arrow_schema()), root)
    return len(rows)


def test_the_folder_is_sharded_on_the_production_vocabulary(sharded_policy):
    from transformers import AutoTokenizer

    assert not (sharded_policy / WEIGHTS_FILE).exists() and len(shards(sharded_policy)) >= 2
    assert weight_files(sharded_policy) == (sharded_policy / WEIGHTS_INDEX_FILE, *shards(sharded_policy))
    tokenizer = AutoTokenizer.from_pretrained(sharded_policy)
    config = json.loads((sharded_policy / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"] == 131072  # tekken's vocabulary as shipped: nothing added
    # a label is several tokens after its tag, as in most production vocabularies (the label step reads the first)
    assert {name: tokenizer.tokenize(f" {name}") for name in LabelSet.load("wands").names} == {
        "Exact": ["ĠExact"], "Partial": ["ĠPartial"], "Irrelevant": ["ĠIr", "re", "levant"]}
    assert tokenizer.tokenize("qa: color=gray") == ["qa", ":", "Ġcolor", "=", "gray"]


def test_sft_grpo_distill_and_score_run_on_sharded_folders(sharded_policy, tiny_world, tmp_path):
    from training.distill import TEACHER_CACHE, DistillConfig
    from training.distill import run as distill
    from training.grpo.trainer import GRPOConfig
    from training.grpo.trainer import run as grpo
    from training.sft import SFTConfig
    from training.sft import run as sft

    sft(SFTConfig(data=tiny_world, model=sharded_policy, out=tmp_path / "sft", order="label_first", batch_size=4, max_steps=3, warmup_steps=1,
                  lr=1e-2, val_items=2, max_new_tokens=8, eval_batch_size=2, checkpoint_every=0, threads=1))
    sft_policy = reshard(tmp_path / "sft" / "model", tmp_path / "sft_sharded")
    grpo(GRPOConfig(data=tiny_world, model=sft_policy, out=tmp_path / "grpo", steps=1, prompts_per_step=2, group_size=2, max_new_tokens=12,
                    lr=1e-3, warmup_steps=1, val_items=2, eval_batch_size=2, checkpoint_every=0, threads=1))
    grpo_policy = reshard(tmp_path / "grpo" / "model", tmp_path / "grpo_sharded")
    assert len(shards(sft_policy)) >= 2 and len(shards(grpo_policy)) >= 2
    assert model_version(sft_policy) != model_version(sharded_policy)
    # three SFT steps do not teach the format, so every rollout scores 0 and the step leaves the weights; it ran and logged
    assert any("train/loss" in json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines())

    distill(DistillConfig(data=tiny_world, teacher=sft_policy, out=tmp_path / "distill", max_steps=1, batch_size=4, warmup_steps=0,
                          max_length=48, val_items=4, teacher_batch_size=4, eval_batch_size=4, checkpoint_every=0, threads=1))
    teacher = pq.read_table(tmp_path / "distill" / TEACHER_CACHE)
    assert set(teacher["model_version"].to_pylist()) == {model_version(sft_policy)}

    n = write_candidates(tmp_path / "prepared", tiny_world)
    result = CliRunner().invoke(app, ["score", "--date", DAY.isoformat(), "--model", str(grpo_policy), "--pairs", str(tmp_path / "prepared"),
                                      "--catalog", str(tiny_world), "--out", str(tmp_path / "scores"), "--set", "batch_size=16"])
    assert result.exit_code == 0, result.output
    rows = read_table(RELEVANCE, tmp_path / "scores", days=[DAY])
    assert rows.num_rows == n
    spec = ScoreConfig(date=DAY.isoformat(), model=str(grpo_policy)).spec()
    assert set(rows["model_version"].to_pylist()) == {scorer_version(spec)}


def test_an_adapter_beside_the_shards_is_applied_by_transformers_so_its_version_counts_it(sharded_policy, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from training.model import load_model, load_model_to_train
    from training.vllm_engine import check_servable

    folder = shutil.copytree(sharded_policy, tmp_path / "adapted")
    base, tokenizer = load_model(folder)
    ids = torch.tensor([tokenizer("query: gray sofa")["input_ids"]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would make the adapter a no-op
            torch.nn.init.normal_(parameter, std=0.5)
    adapted.save_pretrained(folder)

    assert model_version(folder) != model_version(sharded_policy)
    loaded, _ = load_model(folder)
    with torch.no_grad():
        assert not torch.allclose(loaded(input_ids=ids).logits, base_logits)  # transformers attached the adapter
    with pytest.raises(ModelFolderError, match="would be saved as the adapter alone"):
        load_model_to_train(folder)
    with pytest.raises(ModelFolderError, match="vLLM would serve the base weights without it"):
        check_servable(folder)


def test_a_truncated_or_missing_shard_is_named_before_any_work(sharded_policy, tmp_path):
    folder = shutil.copytree(sharded_policy, tmp_path / "model")
    last = shards(folder)[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ModelFolderError, match=f"{last}: unreadable weights .*truncated"):
        check_model_folder(ScorerSpec(backend="hf", model=str(folder)))
    last.unlink()
    with pytest.raises(ConfigError, match=f"lacks the shards {last.name} that {WEIGHTS_INDEX_FILE} names"):
        ScoreConfig(date=DAY.isoformat(), model=str(folder))
