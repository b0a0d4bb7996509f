"""An SFT policy of the tiny world, so rollouts are partly well formed and rewards vary within groups."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sft_policy(tiny_world, tiny_model, tmp_path_factory) -> Path:
    from training.sft import SFTConfig, run

    out = tmp_path_factory.mktemp("sft_policy")
    run(SFTConfig(data=tiny_world, model=tiny_model, out=out, batch_size=8, max_steps=400, warmup_steps=10, lr=1e-2,
                  val_items=4, max_new_tokens=8, eval_batch_size=4, checkpoint_every=0, threads=1))
    return out / "model"
