"""Run-loop pieces: the validation subset, resume and saving a policy with its format."""

from __future__ import annotations

import torch

from training.loop import resume_state, validation_subsample
from training.model import save_policy
from training.policy_format import PolicyFormat
from training.run_folder import RunFolder


def test_validation_subsample_spreads_over_the_pairs():
    assert validation_subsample(list(range(10)), 3) == [0, 3, 6]
    assert validation_subsample(list(range(10)), 0) == list(range(10))
    assert validation_subsample(list(range(3)), 5) == [0, 1, 2]


def test_resume_loads_every_named_state_and_returns_its_step(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    folder = RunFolder(tmp_path, {})
    assert resume_state(folder, True, model=model, optimizer=optimizer) == 0  # nothing saved yet
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    folder.save_checkpoint(4, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    with torch.no_grad():
        model.weight.add_(1.0)
    assert resume_state(RunFolder(tmp_path, {}), True, model=model, optimizer=optimizer) == 4
    assert all(torch.equal(model.state_dict()[name], value) for name, value in saved.items())
    assert resume_state(RunFolder(tmp_path, {}), False, model=model) == 0


def test_save_policy_writes_weights_tokenizer_and_format(tiny_model, tmp_path):
    from training.model import load_model

    model, tokenizer = load_model(tiny_model)
    policy_format = PolicyFormat(order="reasoning_first", prompt_tokens=40)
    save_policy(model, tokenizer, tmp_path / "model", policy_format)
    assert PolicyFormat.load(tmp_path / "model") == policy_format
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()
