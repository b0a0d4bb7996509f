"""Which files of a model folder hold its weights, and the version they hash to: one file, an index and its
shards, a LoRA adapter beside them; pickles and broken indexes refused by name. The files here are bytes
standing in for weights (nothing is loaded); tests/jobs/test_sharded_checkpoints.py loads real ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from training import model_files
from training.model_files import ModelFolderError, model_version, refuse_adapter, weight_files

SHARDS = ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors")


def write_sharded(folder: Path, shards=SHARDS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(shards):
        (folder / name).write_bytes(f"shard {i}".encode())
    weight_map = {f"layers.{i}.weight": name for i, name in enumerate(shards)} | {"embed.weight": shards[0]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_adapter(folder: Path) -> Path:
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"adapter")
    return folder


def test_one_file_is_its_own_sha256_as_before_shards_were_read(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert weight_files(tmp_path) == (tmp_path / "model.safetensors",)
    assert model_version(tmp_path) == hashlib.sha256(b"weights").hexdigest()[:12]


def test_an_index_comes_first_then_each_shard_once_by_name(tmp_path):
    folder = write_sharded(tmp_path)
    assert [path.name for path in weight_files(folder)] == ["model.safetensors.index.json", *sorted(SHARDS)]


def test_an_adapter_counts_as_weights(tmp_path):
    folder = write_adapter(write_sharded(tmp_path))
    assert [path.name for path in weight_files(folder)][-2:] == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ModelFolderError, match="holds a LoRA adapter.*vLLM.*merge_and_unload"):
        refuse_adapter(folder, "vLLM would serve the base weights without it")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickled")
    with pytest.raises(ModelFolderError, match=r"adapter has no adapter_model.safetensors.*save_pretrained\(folder, safe_serialization=True\)"):
        weight_files(folder)


@pytest.mark.parametrize("changed", ["model.safetensors.index.json", *SHARDS, "adapter_config.json", "adapter_model.safetensors"])
def test_the_version_changes_with_any_weight_file(tmp_path, changed):
    folder = write_adapter(write_sharded(tmp_path))
    before = model_version(folder)
    path = folder / changed
    path.write_bytes(path.read_bytes() + b" ")
    assert model_version(folder) != before


def test_each_file_is_read_once_per_process_and_state(tmp_path):
    folder = write_adapter(write_sharded(tmp_path))
    model_files._file_digest.cache_clear()
    first = model_version(folder)
    assert model_version(folder) == first
    info = model_files._file_digest.cache_info()
    assert (info.misses, info.hits) == (5, 5)  # index, two shards, adapter config and weights: each read once
    (folder / SHARDS[0]).write_bytes(b"retrained")
    assert model_version(folder) != first and model_files._file_digest.cache_info().misses == 6  # only the changed shard again


@pytest.mark.parametrize("pickled", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "consolidated.pt"])
def test_a_folder_of_pickles_is_refused_with_how_to_convert_it(tmp_path, pickled):
    (tmp_path / pickled).write_bytes(b"never read")
    with pytest.raises(ModelFolderError) as refused:
        weight_files(tmp_path)
    message = str(refused.value)
    assert str(tmp_path) in message and pickled in message and "never loaded" in message
    assert "save_pretrained(folder, safe_serialization=True)" in message


def test_a_broken_index_or_a_mixed_folder_is_refused_by_name(tmp_path):
    folder = write_sharded(tmp_path / "missing")
    (folder / SHARDS[1]).unlink()
    with pytest.raises(ModelFolderError, match=f"lacks the shards {SHARDS[1]}"):
        weight_files(folder)

    folder = write_sharded(tmp_path / "outside", shards=("../elsewhere.safetensors",))
    with pytest.raises(ModelFolderError, match=r"in the folder itself, got \['../elsewhere.safetensors'\]"):
        weight_files(folder)

    folder = write_sharded(tmp_path / "not_json")
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ModelFolderError, match="not a safetensors index"):
        weight_files(folder)

    folder = write_sharded(tmp_path / "mixed")
    (folder / "model.safetensors").write_bytes(b"an older save")
    with pytest.raises(ModelFolderError, match="holds both model.safetensors and model.safetensors.index.json"):
        weight_files(folder)

    with pytest.raises(ModelFolderError, match="has no model.safetensors or model.safetensors.index.json"):
        weight_files(tmp_path / "empty")


def write_adapter_folder(folder: Path, base: Path | str) -> Path:
    """An adapter folder (no weights of its own) naming `base`, with the base's version recorded."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": str(base)}))
    (folder / "adapter_model.safetensors").write_bytes(b"adapter")
    model_files.record_adapter_base(folder, folder / base)
    return folder


def test_an_adapter_folder_is_its_base_files_then_its_adapter(tmp_path):
    base = write_sharded(tmp_path / "base")
    adapter = write_adapter_folder(tmp_path / "adapter", "../base")  # relative: read from the adapter folder
    assert model_files.adapter_base(adapter) == base.resolve() and model_files.adapter_base(base) is None
    assert weight_files(adapter) == (*weight_files(base.resolve()), adapter / "adapter_config.json", adapter / "adapter_model.safetensors")
    assert model_files.base_folder(adapter) == base.resolve() and model_files.base_folder(base) == base
    versions = {model_version(base), model_version(adapter)}
    (adapter / "adapter_model.safetensors").write_bytes(b"adapter, trained on")
    assert len(versions | {model_version(adapter)}) == 3
    refuse_adapter(adapter, "not beside full weights: nothing to refuse")


def test_an_adapter_over_another_base_or_no_base_is_refused(tmp_path):
    base = write_sharded(tmp_path / "base")
    adapter = write_adapter_folder(tmp_path / "adapter", base)
    (base / SHARDS[0]).write_bytes(b"retrained base")
    with pytest.raises(ModelFolderError, match=r"is now model version \w+, but the adapter was trained on version"):
        model_version(adapter)
    (adapter / "adapter_base.json").unlink()  # an adapter brought from elsewhere: taken as it is
    model_version(adapter)
    for named, refusal in [(tmp_path / "nowhere", "is not a folder of full weights"), ("", "names no base model folder")]:
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": str(named) if named else None}))
        with pytest.raises(ModelFolderError, match=refusal):
            weight_files(adapter)
    write_adapter(base)  # a base with an adapter of its own: no chains
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": str(base)}))
    with pytest.raises(ModelFolderError, match="holds an adapter of its own; merge that one first"):
        weight_files(adapter)


def test_remove_weights_leaves_a_folder_for_a_save_of_the_other_kind(tmp_path):
    folder = write_adapter(write_sharded(tmp_path))
    (folder / "adapter_base.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    model_files.remove_weights(folder)
    assert sorted(path.name for path in folder.iterdir()) == ["tokenizer.json"]
